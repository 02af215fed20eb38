"""Activation recomputation (models/recompute.py) and its measurement (train/activation_memory.py):
every mode gives the gradients of plain autograd, and keeps the bytes its accounting says."""

import json

import pytest
import torch

from ditforge.config import TrainConfig
from ditforge.diffusion import create_diffusion
from ditforge.objectives import DiffusionObjective
from ditforge.models import DiT
from ditforge.models.recompute import MODES, block_groups, parse_spec
from ditforge.train.activation_memory import saved_bytes
from ditforge.train.device import autocast

SMALL = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=3, num_heads=4, num_classes=10)
SPECS = ["ops", "mlp", "attn", "full", "full:0.5", "attn:0.34", True]


def _model(seed=0, **overrides) -> DiT:
    torch.manual_seed(seed)
    model = DiT(**{**SMALL, **overrides})
    with torch.no_grad():  # leave the zero init (adaLN-Zero) so every weight gets a gradient
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    return model


def _loss_and_grads(model, spec, precision="fp32"):
    model.grad_checkpointing = spec
    model.train()
    diffusion = create_diffusion("", "linear", True, 1000)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([0, 500, 999])  # the decoder term (t = 0) and two KL terms
    y = torch.tensor([1, 2, 10])  # 10 = the null class
    noise = torch.randn(3, 4, 8, 8, generator=g)
    torch.manual_seed(2)  # the same label dropout in every call
    with autocast(precision, torch.device("cpu")):
        losses = diffusion.training_losses(lambda *a: model(*a), x, t, y, noise=noise)
        loss = losses["loss"].mean()
    model.zero_grad(set_to_none=True)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("options", [{}, dict(norm="rms", mlp="swiglu", rope=True, qk_norm=True)], ids=["paper", "modern"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_every_mode_gives_the_gradients_of_plain_autograd(precision, options):
    """Recomputation reruns the same operations on the same inputs: equal bit for bit (also
    with the block options, whose RoPE tables every block shares)."""
    model = _model(**options)
    loss0, grads0 = _loss_and_grads(model, "none", precision)
    assert all(g.abs().sum() > 0 for g in grads0.values())
    for spec in SPECS:
        loss, grads = _loss_and_grads(model, spec, precision)
        assert torch.equal(loss, loss0), spec
        for name, g in grads.items():
            assert torch.equal(g, grads0[name]), (spec, name)


def test_eval_forward_ignores_the_mode():
    model = _model().eval()
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([3, 700]), torch.tensor([0, 4])
    with torch.no_grad():
        ref = model(x, t, y)
        for spec in SPECS:
            model.grad_checkpointing = spec
            assert torch.equal(model(x, t, y), ref)


def test_block_groups_and_specs():
    assert block_groups("ops", 5) == [((0, 1), "ops"), ((2, 3), "ops"), ((4,), "ops")]
    assert block_groups("full:0.5", 4) == [((0,), "full"), ((1,), "full"), ((2, 3), "ops")]
    assert block_groups("attn", 2) == [((0,), "attn"), ((1,), "attn")]
    assert block_groups(False, 2) == [((0,), "none"), ((1,), "none")]
    assert parse_spec(True) == ("full", 1.0) and parse_spec("mlp:0.25") == ("mlp", 0.25)
    for bad, needle in (("half", "'half'"), ("full:0", "(0, 1]"), ("full:x", "(0, 1]"), ("ops:1.5", "(0, 1]")):
        with pytest.raises(ValueError, match=None) as err:
            parse_spec(bad)
        assert needle in str(err.value)


def test_config_of_earlier_versions_still_loads(tmp_path):
    """config.json files written before the modes hold true/false."""
    for old, new in ((True, "full"), (False, "none")):
        path = tmp_path / f"{old}.json"
        path.write_text(json.dumps({"grad_checkpoint": old}))
        assert TrainConfig.load(path).grad_checkpoint == new
    assert TrainConfig().grad_checkpoint == "none"
    assert TrainConfig(grad_checkpoint="attn:1").grad_checkpoint == "attn"
    with pytest.raises(ValueError, match="'sometimes'"):
        TrainConfig(grad_checkpoint="sometimes")


def _measure(spec, precision="fp32", **overrides):
    model = _model(**overrides)
    model.grad_checkpointing = spec
    cfg = TrainConfig.from_dict(dict(global_batch=2))
    return saved_bytes(model, DiffusionObjective(), cfg, precision, torch.device("cpu"))


def test_saved_bytes_follow_the_accounting():
    """fp32, per image and block: T tokens of D values, h heads. `full` keeps each block's output
    (the next region's input); `ops` keeps every product's output (qkv 3TD, attention TD and its
    log-sum-exp hT, proj TD, fc1 4TD, fc2 TD, adaLN 6D) and the output of the last block of a pair."""
    T, D, h = (SMALL["input_size"] // SMALL["patch_size"]) ** 2, SMALL["hidden_size"], SMALL["num_heads"]
    full = _measure("full")
    assert full.per_block() == [4 * T * D] * 3
    ops = _measure("ops")
    products = 4 * (10 * T * D + h * T + 6 * D)
    assert ops.per_block() == [products, products + 4 * T * D, products + 4 * T * D]  # pairs (0, 1), (2,)
    none = _measure("none")
    attn, mlp = _measure("attn"), _measure("mlp")
    assert none.hooks_per_image == none.per_image  # plain autograd: its saved-tensor hooks see it all
    assert none.per_image > ops.per_image > max(attn.per_image, mlp.per_image) > full.per_image
    # none keeps, besides the products: LayerNorm's two outputs and their means and 1/std (2T each),
    # modulate's two outputs and (1 + scale) vectors, GELU's output (4TD), SiLU(c) (D), the
    # mid-block residual and the block output
    assert none.per_block() == [products + 4 * (T * D * (2 + 2 + 4 + 1 + 1) + 2 * 2 * T + 3 * D)] * 3


def test_modes_cover_the_documented_choices():
    assert MODES == ("none", "ops", "mlp", "attn", "full")


def test_bad_mode_on_the_command_line_is_one_line():
    from conftest import run_cli

    proc = run_cli("train", "--grad-checkpoint", "full:2", "--run-dir", "unused", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "'full:2'" in proc.stderr and "(0, 1]" in proc.stderr
