"""Tests of the DiT architecture (ditforge.models)."""

from __future__ import annotations

import io
import math
from pathlib import Path

import pytest
import torch

from ditforge.models import MODEL_NAMES, DiT, count_parameters, create_model
from ditforge.models.blocks import Attention, DiTBlock
from ditforge.models.layers import LabelEmbedder, TimestepEmbedder
from ditforge.models.positions import get_2d_sincos_pos_embed

DATA = Path(__file__).parent / "data"

# REFERENCE.md: parameters at input 32x32x4, 1000 classes, learned sigma (incl. pos_embed).
OFFICIAL_COUNTS = {
    "DiT-S/2": 32_963_360,
    "DiT-S/4": 32_945_024,
    "DiT-S/8": 33_148_160,
    "DiT-B/2": 130_512_416,
    "DiT-B/4": 130_475_648,
    "DiT-B/8": 130_881_536,
    "DiT-L/2": 458_102_816,
    "DiT-L/4": 458_053_760,
    "DiT-L/8": 458_594_816,
    "DiT-XL/2": 675_129_632,
    "DiT-XL/4": 675_074_432,
    "DiT-XL/8": 675_683_072,
}

TINY = dict(input_size=8, patch_size=2, in_channels=1, hidden_size=64, depth=2, num_heads=4, num_classes=10)


def tiny(**overrides) -> DiT:
    return DiT(**{**TINY, **overrides})


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every trainable parameter random values (the real init zeroes the output)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model


def tiny_inputs(n: int = 3, seed: int = 0, channels: int = 1, size: int = 8):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, channels, size, size, generator=g)
    t = torch.randint(0, 1000, (n,), generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return x, t, y


# ---------------------------------------------------------------------------------------
# The official family: counts, print, checkpoint layout (all on the meta device)
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(OFFICIAL_COUNTS))
def test_official_parameter_counts(name):
    with torch.device("meta"):
        model = create_model(name)
    assert count_parameters(model) == OFFICIAL_COUNTS[name]


def test_model_names():
    assert set(OFFICIAL_COUNTS) <= set(MODEL_NAMES)
    assert {"DiT-Ti/1", "DiT-Ti/2", "DiT-Ti/4"} <= set(MODEL_NAMES)
    assert len(MODEL_NAMES) == len(set(MODEL_NAMES)) == 15


def test_xl2_trainable_count_and_pos_embed_fixed():
    with torch.device("meta"):
        model = create_model("DiT-XL/2")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == 674_834_720
    assert model.pos_embed.numel() == 294_912
    assert not model.pos_embed.requires_grad


def test_xl2_repr_matches_reference_print():
    expected = (DATA / "dit_xl2_repr.txt").read_text().rstrip("\n")
    with torch.device("meta"):
        model = create_model("DiT-XL/2")
    assert repr(model) == expected


def _official_xl2_layout() -> list[tuple[str, tuple[int, ...]]]:
    D, depth = 1152, 28
    keys = [
        ("pos_embed", (1, 256, D)),
        ("x_embedder.proj.weight", (D, 4, 2, 2)),
        ("x_embedder.proj.bias", (D,)),
        ("t_embedder.mlp.0.weight", (D, 256)),
        ("t_embedder.mlp.0.bias", (D,)),
        ("t_embedder.mlp.2.weight", (D, D)),
        ("t_embedder.mlp.2.bias", (D,)),
        ("y_embedder.embedding_table.weight", (1001, D)),
    ]
    for n in range(depth):
        b = f"blocks.{n}."
        keys += [
            (b + "attn.qkv.weight", (3 * D, D)),
            (b + "attn.qkv.bias", (3 * D,)),
            (b + "attn.proj.weight", (D, D)),
            (b + "attn.proj.bias", (D,)),
            (b + "mlp.fc1.weight", (4 * D, D)),
            (b + "mlp.fc1.bias", (4 * D,)),
            (b + "mlp.fc2.weight", (D, 4 * D)),
            (b + "mlp.fc2.bias", (D,)),
            (b + "adaLN_modulation.1.weight", (6 * D, D)),
            (b + "adaLN_modulation.1.bias", (6 * D,)),
        ]
    keys += [
        ("final_layer.linear.weight", (32, D)),
        ("final_layer.linear.bias", (32,)),
        ("final_layer.adaLN_modulation.1.weight", (2 * D, D)),
        ("final_layer.adaLN_modulation.1.bias", (2 * D,)),
    ]
    return keys


def test_xl2_state_dict_matches_official_layout():
    with torch.device("meta"):
        model = create_model("DiT-XL/2")
    ours = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    assert ours == _official_xl2_layout()


def test_state_dict_round_trip_strict():
    src = randomize_(tiny(), seed=1).eval()
    buf = io.BytesIO()
    torch.save(src.state_dict(), buf)
    buf.seek(0)
    dst = tiny().eval()
    result = dst.load_state_dict(torch.load(buf, weights_only=True), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    x, t, y = tiny_inputs()
    with torch.no_grad():
        a, b = src(x, t, y), dst(x, t, y)
    assert a.abs().sum() > 0
    assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------
# Forward pass
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("learn_sigma,channels", [(True, 2), (False, 1)])
def test_forward_shape(learn_sigma, channels):
    model = randomize_(tiny(learn_sigma=learn_sigma)).eval()
    assert model.out_channels == channels
    x, t, y = tiny_inputs(n=5)
    with torch.no_grad():
        out_long = model(x, t, y)
        out_float = model(x, t.float(), y)
    assert out_long.shape == (5, channels, 8, 8)
    assert torch.allclose(out_long, out_float)
    assert torch.isfinite(out_long).all()


def test_output_is_exactly_zero_at_init():
    torch.manual_seed(0)
    model = tiny()
    x, t, y = tiny_inputs(n=4)
    out = model(x, t, y)
    assert out.shape == (4, 2, 8, 8)
    assert torch.equal(out, torch.zeros_like(out))
    for block in model.blocks:  # adaLN-Zero
        assert torch.count_nonzero(block.adaLN_modulation[1].weight) == 0
        assert torch.count_nonzero(block.adaLN_modulation[1].bias) == 0


def test_backward_leaves_pos_embed_alone():
    model = randomize_(tiny()).train()
    x, t, y = tiny_inputs()
    model(x, t, y).square().mean().backward()
    assert model.pos_embed.grad is None
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_unpatchify_matches_reference_einsum():
    model = tiny()
    N, p, c, h = 2, 2, model.out_channels, 4
    tokens = torch.randn(N, h * h, p * p * c)
    ref = torch.einsum("nhwpqc->nchpwq", tokens.reshape(N, h, h, p, p, c)).reshape(N, c, h * p, h * p)
    assert torch.equal(model.unpatchify(tokens), ref)


def test_wrong_input_shape_is_reported():
    model = tiny()
    with pytest.raises(ValueError, match="expected x of shape"):
        model(torch.randn(2, 1, 16, 16), torch.zeros(2), torch.zeros(2, dtype=torch.long))


# ---------------------------------------------------------------------------------------
# Parts against their formulas
# ---------------------------------------------------------------------------------------


def test_attention_sdpa_equals_explicit_softmax():
    torch.manual_seed(0)
    dim, heads, T, N = 32, 4, 7, 3
    block = DiTBlock(dim, heads).double().eval()
    attn: Attention = block.attn
    x = torch.randn(N, T, dim, dtype=torch.float64)
    with torch.no_grad():
        out = attn(x)
        q, k, v = attn.qkv(x).split(dim, dim=-1)  # (N, T, D) each

        def heads_(z):  # (N, T, D) -> (N, h, T, d)
            return z.reshape(N, T, heads, dim // heads).transpose(1, 2)

        q, k, v = heads_(q), heads_(k), heads_(v)
        weights = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(dim // heads), dim=-1)
        ref = attn.proj((weights @ v).transpose(1, 2).reshape(N, T, dim))
    assert torch.allclose(out, ref, atol=1e-12, rtol=0)


@pytest.mark.parametrize("tokens", [16, 324])  # explicit bf16 products on CPU / SDPA above the threshold
def test_attention_bf16_on_cpu_within_bf16_error(tokens):
    """The bf16 path (autocast on CPU, as in training) against the same weights in float64:
    errors of the order of bf16 rounding (2^-8 relative), with and without explicit scores."""
    from ditforge.models.attention import CPU_EXPLICIT_ATTENTION_MAX_TOKENS

    assert (tokens <= CPU_EXPLICIT_ATTENTION_MAX_TOKENS) == (tokens == 16)
    torch.manual_seed(0)
    attn = Attention(64, num_heads=4).eval()
    x = torch.randn(2, tokens, 64)
    with torch.no_grad():
        ref = attn.double()(x.double())
        attn.float()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = attn(x)
    assert out.dtype == torch.bfloat16
    err = (out.double() - ref).abs().max() / ref.abs().max()
    assert 1e-4 < err < 2e-2, err  # bf16 was used, and rounded no worse than bf16 does


def test_block_adaln_formula():
    torch.manual_seed(0)
    D = 16
    block = randomize_(DiTBlock(D, 2)).double().eval()
    x = torch.randn(2, 5, D, dtype=torch.float64)
    c = torch.randn(2, D, dtype=torch.float64)
    with torch.no_grad():
        sh1, sc1, g1, sh2, sc2, g2 = block.adaLN_modulation(c).chunk(6, dim=1)
        ln = lambda z: torch.nn.functional.layer_norm(z, (D,), eps=1e-6)  # noqa: E731
        ref = x + g1[:, None] * block.attn(ln(x) * (1 + sc1[:, None]) + sh1[:, None])
        ref = ref + g2[:, None] * block.mlp(ln(ref) * (1 + sc2[:, None]) + sh2[:, None])
        out = block(x, c)
    assert torch.allclose(out, ref, atol=1e-12, rtol=0)


def test_pos_embed_formula():
    D, G = 16, 4
    pos = get_2d_sincos_pos_embed(D, G)
    assert pos.shape == (G * G, D) and pos.dtype == torch.float64
    ref = torch.empty(G * G, D, dtype=torch.float64)
    quarter = D // 4
    for i in range(G):  # row
        for j in range(G):  # column
            for f in range(quarter):
                omega = 1.0 / 10000 ** (f / quarter)
                # first half embeds grid[0] of meshgrid(grid_w, grid_h): the column j
                ref[i * G + j, f] = math.sin(j * omega)
                ref[i * G + j, quarter + f] = math.cos(j * omega)
                # second half embeds grid[1]: the row i
                ref[i * G + j, 2 * quarter + f] = math.sin(i * omega)
                ref[i * G + j, 3 * quarter + f] = math.cos(i * omega)
    assert torch.allclose(pos, ref, atol=1e-12, rtol=0)

    model = DiT(input_size=8, patch_size=2, in_channels=1, hidden_size=D, depth=1, num_heads=2, num_classes=3)
    assert model.pos_embed.shape == (1, G * G, D)
    assert torch.equal(model.pos_embed[0], ref.float())
    assert not model.pos_embed.requires_grad
    assert all(p is not model.pos_embed for p in model.parameters() if p.requires_grad)
    assert "pos_embed" in model.state_dict()


def test_timestep_embedding_formula():
    dim = 256
    t = torch.tensor([0.0, 1.0, 17.5, 500.0, 999.0], dtype=torch.float64)
    half = dim // 2
    ref = torch.empty(len(t), dim, dtype=torch.float64)
    for n, tn in enumerate(t.tolist()):
        for i in range(half):
            freq = math.exp(-math.log(10000) * i / half)
            ref[n, i] = math.cos(tn * freq)  # cos first
            ref[n, half + i] = math.sin(tn * freq)  # then sin
    emb64 = TimestepEmbedder.timestep_embedding(t, dim)
    assert emb64.dtype == torch.float64
    assert torch.allclose(emb64, ref, atol=1e-10, rtol=0)
    emb32 = TimestepEmbedder.timestep_embedding(t.float(), dim)  # float32 path (as the reference)
    assert emb32.dtype == torch.float32
    assert torch.allclose(emb32.double(), ref, atol=1e-4, rtol=0)
    whole = torch.tensor([0, 1, 500, 999])
    emb_long = TimestepEmbedder.timestep_embedding(whole, dim)  # integer timesteps
    assert emb_long.dtype == torch.float32
    assert torch.allclose(emb_long.double(), ref[[0, 1, 3, 4]], atol=1e-4, rtol=0)
    odd = TimestepEmbedder.timestep_embedding(t, 7)
    assert odd.shape == (5, 7) and torch.all(odd[:, -1] == 0)


def test_label_dropout():
    torch.manual_seed(0)
    emb = LabelEmbedder(num_classes=10, hidden_size=8, dropout_prob=1.0)
    table = emb.embedding_table.weight
    assert table.shape == (11, 8)
    labels = torch.arange(10)
    null = table[10].expand(10, 8)
    assert torch.equal(emb(labels, train=True), null)  # train: all dropped
    assert torch.equal(emb(labels, train=False), table[labels])  # eval: none dropped
    force = torch.tensor([1, 0] * 5)
    out = emb(labels, train=False, force_drop_ids=force)
    assert torch.equal(out[force == 1], table[10].expand(5, 8))
    assert torch.equal(out[force == 0], table[labels[force == 0]])

    half = LabelEmbedder(num_classes=10, hidden_size=8, dropout_prob=0.5)
    dropped = half.token_drop(torch.zeros(4000, dtype=torch.long))
    assert 0.45 < (dropped == 10).float().mean().item() < 0.55

    no_null = LabelEmbedder(num_classes=10, hidden_size=8, dropout_prob=0.0)
    assert no_null.embedding_table.num_embeddings == 10
    assert torch.equal(no_null(labels, train=True), no_null.embedding_table.weight[labels])
    with pytest.raises(ValueError, match="null class"):
        no_null(labels, train=False, force_drop_ids=force)


def test_dit_force_drop_equals_null_class():
    model = randomize_(tiny()).eval()
    x, t, y = tiny_inputs(n=4)
    with torch.no_grad():
        dropped = model(x, t, y, force_drop_ids=torch.ones(4, dtype=torch.long))
        null = model(x, t, torch.full_like(y, 10))
        kept = model(x, t, y, force_drop_ids=torch.zeros(4, dtype=torch.long))
        plain = model(x, t, y)
    assert torch.equal(dropped, null)
    assert torch.equal(kept, plain)
    assert not torch.equal(dropped, plain)


# ---------------------------------------------------------------------------------------
# Registry and validation
# ---------------------------------------------------------------------------------------


def test_tiny_model_size():
    model = create_model("DiT-Ti/2", input_size=8, in_channels=1, num_classes=10)
    assert (len(model.blocks), model.hidden_size, model.num_heads, model.patch_size) == (6, 192, 3, 2)
    assert 4.1e6 < count_parameters(model) < 4.3e6
    assert (model.num_classes, model.in_channels, model.input_size, model.learn_sigma) == (10, 1, 8, True)


def test_unknown_model_name():
    with pytest.raises(ValueError, match=r"unknown model 'DiT-XXL/2'.*DiT-XL/2"):
        create_model("DiT-XXL/2")


def test_a_model_option_this_version_lacks_is_a_one_line_error_naming_it():
    """model_args of a checkpoint or hub folder written by a newer version (sample, eval, export and
    --init-from build the model from them): a UserError naming the key and what this DiT takes, not
    DiT's TypeError (an internal error); every option it does take still builds."""
    from ditforge.errors import UserError

    with pytest.raises(UserError) as e:
        create_model("DiT-Ti/2", input_size=8, in_channels=1, num_classes=10, sink_tokens=4)
    said = str(e.value)
    assert said.startswith("model settings: 'sink_tokens' is not an option") and "newer version" in said
    assert "qk_norm" in said and "depth" not in said and "\n" not in said
    create_model("DiT-Ti/2", input_size=8, in_channels=1, num_classes=10, learn_sigma=False, mlp_ratio=4.0, norm="rms",
                 mlp="swiglu", rope=True, qk_norm=True, class_dropout_prob=0.1, interval_embedding=True,
                 guidance_embedding=True)


def test_name_fixed_arguments_cannot_be_overridden():
    with pytest.raises(TypeError, match="depth"):
        create_model("DiT-Ti/2", depth=3)


@pytest.mark.parametrize(
    "overrides,match",
    [
        (dict(input_size=9), r"input_size \(9\).*divisible by patch_size \(2\)"),
        (dict(num_heads=3), r"hidden_size \(64\).*divisible by num_heads \(3\)"),
        (dict(depth=0), r"depth must be a positive int, got 0"),
        (dict(hidden_size=-8), r"hidden_size must be a positive int, got -8"),
        (dict(patch_size=2.0), r"patch_size must be a positive int, got 2.0"),
        (dict(hidden_size=66, num_heads=3), r"hidden_size \(66\).*divisible by 4"),
        (dict(class_dropout_prob=1.5), r"class_dropout_prob must be in \[0, 1\], got 1.5"),
    ],
)
def test_bad_sizes(overrides, match):
    with pytest.raises(ValueError, match=match):
        tiny(**overrides)
