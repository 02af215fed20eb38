"""The block options of LightningDiT (RMSNorm, SwiGLU, 2-D RoPE, qk-norm) against closed forms,
their parameter and FLOP counts, and a real training run with all of them."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from conftest import TINY_TRAIN, run_cli
from ditforge.bench import forward_macs, parameter_count
from ditforge.config import ModelConfig
from ditforge.errors import UserError
from ditforge.models import DiT, count_parameters, create_model
from ditforge.models.blocks import Attention, SwiGLUMlp, swiglu_hidden
from ditforge.models.dit import MODEL_SIZES
from ditforge.models.layers import RMSNorm
from ditforge.models.positions import RotaryEmbedding2D, apply_rope, rope_tables

ALL_OPTIONS = dict(norm="rms", mlp="swiglu", rope=True, qk_norm=True)
COMBINATIONS = [
    dict(norm=n, mlp=m, rope=r, qk_norm=q)
    for n, m, r, q in itertools.product(("layer", "rms"), ("gelu", "swiglu"), (False, True), (False, True))
]
TINY = dict(input_size=8, patch_size=2, in_channels=1, hidden_size=64, depth=2, num_heads=4, num_classes=10)


def _randomize(model: torch.nn.Module, seed: int = 0, scale: float = 0.2) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)
    return model


# -- RoPE -----------------------------------------------------------------------------------


def _rotate(x: torch.Tensor, row: float, col: float) -> torch.Tensor:
    cos, sin = rope_tables(x.shape[-1], torch.tensor([row], dtype=torch.float64), torch.tensor([col], dtype=torch.float64))
    return apply_rope(x[None], cos, sin)[0]  # (d,)


def test_rope_scores_depend_only_on_the_position_difference():
    """RoFormer Eq. 16: <R(p) q, R(p') k> = <q, R(p' - p) k>, so shifting both positions by the
    same 2-D offset leaves every score unchanged; another difference changes it."""
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 16, generator=g, dtype=torch.float64)
    for (r1, c1), (r2, c2), (dr, dc) in [((0, 0), (3, 5), (7, 2)), ((4, 1), (1, 6), (-3, 11)), ((2, 2), (2, 2), (100, 50))]:
        base = _rotate(q, r1, c1) @ _rotate(k, r2, c2)
        shifted = _rotate(q, r1 + dr, c1 + dc) @ _rotate(k, r2 + dr, c2 + dc)
        assert shifted.item() == pytest.approx(base.item(), abs=1e-10)
        assert base.item() == pytest.approx((q @ _rotate(k, r2 - r1, c2 - c1)).item(), abs=1e-10)
    same = _rotate(q, 0, 0) @ _rotate(k, 1, 0)
    assert abs(same - _rotate(q, 0, 0) @ _rotate(k, 0, 1)) > 1e-3  # rows and columns are told apart
    assert abs(same - q @ k) > 1e-3


def test_rope_identity_at_origin_and_norm_preserving():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 24, generator=g, dtype=torch.float64)
    torch.testing.assert_close(apply_rope(x, *rope_tables(24, torch.zeros(5, dtype=torch.float64), torch.zeros(5, dtype=torch.float64))), x, atol=0, rtol=0)
    rows, cols = torch.tensor([1.0, 2, 7, 0, 15], dtype=torch.float64), torch.tensor([3.0, 0, 7, 9, 15], dtype=torch.float64)
    y = apply_rope(x, *rope_tables(24, rows, cols))
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1), atol=1e-12, rtol=0)
    pairs_x, pairs_y = x.unflatten(-1, (-1, 2)).norm(dim=-1), y.unflatten(-1, (-1, 2)).norm(dim=-1)
    torch.testing.assert_close(pairs_y, pairs_x, atol=1e-12, rtol=0)  # each pair turns in its own plane


def test_rope_angles_closed_form_and_grid_layout():
    """d = 8: 4 channels per axis, omega = (1, 10000^-1/2); row angles on channels 0-3, column
    angles on 4-7, each pair sharing one angle. Token i * G + j sits at row i, column j."""
    cos, sin = rope_tables(8, torch.tensor([3.0], dtype=torch.float64), torch.tensor([5.0], dtype=torch.float64))
    angles = torch.tensor([3, 3, 0.03, 0.03, 5, 5, 0.05, 0.05], dtype=torch.float64)
    torch.testing.assert_close(cos[0], angles.cos(), atol=1e-15, rtol=0)
    torch.testing.assert_close(sin[0], angles.sin(), atol=1e-15, rtol=0)
    rope = RotaryEmbedding2D(8, grid_size=4).double()
    rope.reset()
    i, j = 3, 1
    cos_ij, sin_ij = rope_tables(8, torch.tensor([float(i)], dtype=torch.float64), torch.tensor([float(j)], dtype=torch.float64))
    torch.testing.assert_close(rope.cos[i * 4 + j], cos_ij[0], atol=1e-15, rtol=0)
    torch.testing.assert_close(rope.sin[i * 4 + j], sin_ij[0], atol=1e-15, rtol=0)
    with pytest.raises(ValueError, match="divisible by 4"):
        RotaryEmbedding2D(6, grid_size=4)


def test_rope_model_shares_one_table_and_uses_it():
    model = _randomize(DiT(**TINY, rope=True)).double().eval()
    assert all(block.attn.rope is model.rope for block in model.blocks)
    plain = DiT(**TINY).double().eval()
    assert set(plain.state_dict()) == set(model.state_dict())  # no weights, no buffers in the state dict
    plain.load_state_dict(model.state_dict(), strict=True)
    x, t, y = torch.randn(2, 1, 8, 8, dtype=torch.float64), torch.tensor([3, 500]), torch.tensor([0, 9])
    with torch.no_grad():
        assert (model(x, t, y) - plain(x, t, y)).abs().max() > 1e-3


# -- RMSNorm, SwiGLU, qk-norm ---------------------------------------------------------------


def test_rmsnorm_formula_float64():
    """Zhang & Sennrich 2019, Eq. 4: x / sqrt(mean(x^2) + eps) * g; no mean is subtracted."""
    g = torch.Generator().manual_seed(2)
    norm = RMSNorm(6, eps=1e-6).double()
    with torch.no_grad():
        norm.weight.copy_(torch.randn(6, generator=g, dtype=torch.float64))
    x = torch.randn(3, 4, 6, generator=g, dtype=torch.float64) + 2.0
    ref = x / torch.sqrt((x * x).sum(-1, keepdim=True) / 6 + 1e-6) * norm.weight
    torch.testing.assert_close(norm(x), ref, atol=1e-14, rtol=0)
    assert RMSNorm(6)(torch.randn(2, 6, dtype=torch.bfloat16)).dtype == torch.bfloat16  # x's dtype out


@pytest.mark.parametrize("side", [8, 36])  # 16 tokens: explicit products; 324: SDPA (models/attention.py)
def test_all_options_under_bf16_autocast_on_cpu(side):
    """qk-norm and RoPE keep q and k in bf16 under autocast, so every kernel gets one dtype;
    the result is within bf16 error of float64."""
    torch.manual_seed(0)
    model = _randomize(DiT(**{**TINY, "input_size": side}, **ALL_OPTIONS), scale=0.05).eval()
    x, t, y = torch.randn(2, 1, side, side), torch.tensor([10, 700]), torch.tensor([2, 3])
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x, t, y)
        ref = model.double()(x.double(), t, y)
    err = (out.double() - ref).abs().max() / ref.abs().max()
    assert 1e-4 < err < 5e-2, err  # bf16 was used, and rounded no worse than bf16 does


def test_swiglu_formula_and_width():
    """Shazeer 2020, Eq. 6: (SiLU(x W) * (x V)) W2 with SiLU(z) = z sigmoid(z)."""
    torch.manual_seed(0)
    mlp = SwiGLUMlp(8, 5).double()
    x = torch.randn(2, 3, 8, dtype=torch.float64)
    w, v = mlp.w12.weight[:5], mlp.w12.weight[5:]
    bw, bv = mlp.w12.bias[:5], mlp.w12.bias[5:]
    a, b = x @ w.T + bw, x @ v.T + bv
    ref = (a * torch.sigmoid(a) * b) @ mlp.w3.weight.T + mlp.w3.bias
    torch.testing.assert_close(mlp(x), ref, atol=1e-13, rtol=0)
    # LightningDiT's width int(2/3 * 4 D) for every registry size: 3072 for XL, 512 for Ti
    for depth, hidden, heads in MODEL_SIZES.values():
        assert swiglu_hidden(4 * hidden) == int(2 / 3 * (4 * hidden))
    assert swiglu_hidden(4 * 1152) == 3072 and swiglu_hidden(4 * 192) == 512


def test_qk_norm_is_rmsnorm_per_head():
    torch.manual_seed(0)
    attn = _randomize(Attention(16, num_heads=2, qk_norm=True)).double().eval()
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    with torch.no_grad():
        q, k, v = attn.qkv(x).split(16, dim=-1)  # (N, T, D) each
        heads = lambda z: z.reshape(2, 5, 2, 8).transpose(1, 2)  # noqa: E731 - (N, h, T, d)
        rms = lambda z, g: z / torch.sqrt(z.pow(2).mean(-1, keepdim=True) + 1e-6) * g  # noqa: E731
        q, k, v = rms(heads(q), attn.q_norm.weight), rms(heads(k), attn.k_norm.weight), heads(v)
        w = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(8), dim=-1)
        ref = attn.proj((w @ v).transpose(1, 2).reshape(2, 5, 16))
        torch.testing.assert_close(attn(x), ref, atol=1e-12, rtol=0)
    assert attn.q_norm.weight.shape == (8,) and attn.k_norm.weight.shape == (8,)


# -- the state dict, the config ------------------------------------------------------------


def test_defaults_keep_the_official_keys_and_each_option_changes_only_its_own():
    with torch.device("meta"):
        official = set(create_model("DiT-XL/2").state_dict())
        explicit = set(create_model("DiT-XL/2", norm="layer", mlp="gelu", rope=False, qk_norm=False).state_dict())
        keys = {name: set(create_model("DiT-XL/2", **{name: value}).state_dict()) for name, value in ALL_OPTIONS.items()}
    assert explicit == official and len(official) == 1 + 2 + 4 + 1 + 28 * 10 + 4  # REFERENCE.md layout
    per_block = lambda *names: {f"blocks.{i}.{n}" for i in range(28) for n in names}  # noqa: E731
    assert keys["norm"] - official == per_block("norm1.weight", "norm2.weight") | {"final_layer.norm_final.weight"}
    assert keys["norm"] >= official
    assert official - keys["mlp"] == per_block("mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias")
    assert keys["mlp"] - official == per_block("mlp.w12.weight", "mlp.w12.bias", "mlp.w3.weight", "mlp.w3.bias")
    assert keys["rope"] == official  # the tables follow from the grid; pos_embed is kept
    assert keys["qk_norm"] - official == per_block("attn.q_norm.weight", "attn.k_norm.weight")


def test_model_config_validates_the_options():
    cfg = ModelConfig(**ALL_OPTIONS)
    assert cfg.block_options() == ALL_OPTIONS
    assert ModelConfig().block_options() == {}  # default runs record the same model args as before
    for bad, match in [(dict(norm="batch"), "norm 'batch'.*layer, rms"), (dict(mlp="relu"), "mlp 'relu'.*gelu, swiglu"),
                       (dict(rope="yes"), "rope must be true or false"), (dict(qk_norm=1), "qk_norm must be")]:
        with pytest.raises(UserError, match=match):
            ModelConfig(**bad)
    with pytest.raises(ValueError, match="norm 'batch'"):
        DiT(**TINY, norm="batch")


# -- parameter and FLOP counts -------------------------------------------------------------


@pytest.mark.parametrize("options", COMBINATIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_analytic_counts_match_the_model(options):
    """parameter_count = sum of numel; 2 x forward_macs = the FLOPs torch's FlopCounterMode
    counts (with the ``math`` kernel, whose two products it sees; RoPE, norms: elementwise)."""
    model = DiT(**{**TINY, "mlp_ratio": 4.0}, **options).eval()
    assert parameter_count(model) == count_parameters(model) == sum(p.numel() for p in model.parameters())
    for block in model.blocks:
        block.attn.backend = "math"
    n = 3
    x, t, y = torch.randn(n, 1, 8, 8), torch.randint(0, 1000, (n,)), torch.randint(0, 10, (n,))
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x, t, y)
    assert counter.get_total_flops() == 2 * n * forward_macs(model)


def test_options_keep_parameters_and_flops_near_the_paper_model():
    with torch.device("meta"):
        paper, modern = create_model("DiT-XL/2"), create_model("DiT-XL/2", **ALL_OPTIONS)
    assert parameter_count(modern) == count_parameters(modern)
    assert parameter_count(modern) / parameter_count(paper) == pytest.approx(1.0, abs=1e-3)
    assert forward_macs(modern) == forward_macs(paper)  # 3 x (2/3 x 4608) = 2 x 4608: same products


# -- training with every option --------------------------------------------------------------


def test_all_options_train_and_grads_flow():
    from ditforge.diffusion.gaussian import create_diffusion

    torch.manual_seed(0)
    model = _randomize(DiT(**TINY, **ALL_OPTIONS), scale=0.1).train()
    diffusion = create_diffusion("")
    x0, y = torch.randn(4, 1, 8, 8), torch.randint(0, 10, (4,))
    t = torch.randint(0, 1000, (4,))
    loss = diffusion.training_losses(model, x0, t, y)["loss"].mean()
    assert torch.isfinite(loss)
    loss.backward()
    for name, p in model.named_parameters():
        if name == "pos_embed":
            assert p.grad is None
            continue
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name  # the gains of RMSNorm and qk-norm learn too


def test_trained_with_options_samples_from_its_checkpoint(tmp_path):
    """`train --norm rms --mlp swiglu --rope --qk-norm` records the options; `sample` rebuilds
    the same network from the checkpoint (strict load) and draws."""
    from ditforge.sampling.load import load_for_sampling
    from ditforge.train.checkpoint import read_tensors

    run = tmp_path / "modern"
    run_cli("train", "--run-dir", str(run), "--steps", "3", "--ckpt-every", "3", "--sample-steps", "2",
            "--norm", "rms", "--mlp", "swiglu", "--rope", "--qk-norm", *TINY_TRAIN)
    ckpt = run / "checkpoints" / "step-0000003"
    state = json.loads((ckpt / "state.json").read_text())
    assert {k: state["model_args"][k] for k in ALL_OPTIONS} == ALL_OPTIONS
    assert {k: state["config"]["model"][k] for k in ALL_OPTIONS} == ALL_OPTIONS
    loaded = load_for_sampling(run)
    assert loaded.model.options.mlp == "swiglu" and loaded.model.rope is not None
    saved = read_tensors(ckpt / "ema.safetensors")
    assert any(k.endswith("mlp.w12.weight") for k in saved) and any(k.endswith("q_norm.weight") for k in saved)
    for k, v in loaded.model.state_dict().items():
        assert torch.equal(v, saved[k]), k
    run_cli("sample", str(run), "--classes", "1", "2", "--per-class", "2", "--steps", "2", "--out", str(tmp_path / "g.png"))
    assert (tmp_path / "g.png").is_file()
