"""The two sides of `benchmarks/bench_sampling.py` compute the same thing: ours (`sample_batch`,
DDPM, as `ditforge sample --out X.npz`) and the official facebookresearch/DiT loop of
`sample_ddp.py` (`p_sample_loop` with `forward_with_cfg`) give the same samples for the same
weights, starting noise, per-step noise and steps.

Needs a copy of the official code in $DITFORGE_OFFICIAL_DIT or `.peers/DiT` (benchmarks/gpu_checks.sh's
header says how to get it); skipped without it. The official `models.py` needs timm: without it
the official `forward_with_cfg` is taken from the file's source (the function alone) and run on
our model; with it, the official model itself runs, loaded from our state dict with strict=True.
"""

import ast
import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

from ditforge.models import DiT
from ditforge.sampling.generate import choose_sampler, sample_batch
from ditforge.objectives import DiffusionObjective

ROOT = Path(__file__).resolve().parents[1]
OFFICIAL = Path(os.environ.get("DITFORGE_OFFICIAL_DIT", ROOT / ".peers" / "DiT"))
pytestmark = pytest.mark.skipif(
    not (OFFICIAL / "diffusion" / "__init__.py").is_file(),
    reason=f"no copy of facebookresearch/DiT at {OFFICIAL} (set DITFORGE_OFFICIAL_DIT; see benchmarks/gpu_checks.sh)",
)
TINY = dict(input_size=8, patch_size=4, in_channels=4, hidden_size=64, depth=2, num_heads=2, num_classes=10)
B, STEPS = 3, 6


def _bench():
    if "bench_sampling" not in sys.modules:
        spec = importlib.util.spec_from_file_location("bench_sampling", ROOT / "benchmarks" / "bench_sampling.py")
        sys.modules["bench_sampling"] = module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return sys.modules["bench_sampling"]


def _official_forward_with_cfg():
    """`DiT.forward_with_cfg` of the official models.py, compiled from its source alone (no timm)."""
    tree = ast.parse((OFFICIAL / "models.py").read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "DiT")
    fn = next(n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "forward_with_cfg")
    namespace = {"torch": torch}
    exec(compile(ast.Module(body=[fn], type_ignores=[]), str(OFFICIAL / "models.py"), "exec"), namespace)
    return namespace["forward_with_cfg"]


class _OursNoise:
    """torch, for the official gaussian_diffusion module, except that `randn_like(x)` draws the
    per-step noise ours draws (B rows from `generator`), repeated over the doubled batch (whose
    null half is dropped)."""

    def __init__(self, generator: torch.Generator):
        self.generator = generator

    def __getattr__(self, name):
        return getattr(torch, name)

    def randn_like(self, x):
        z = torch.randn((B, *x.shape[1:]), generator=self.generator, device=x.device, dtype=x.dtype)  # (B, C, H, W)
        return z.repeat(x.shape[0] // B, 1, 1, 1)  # (2B or B, C, H, W)


def _pair(monkeypatch, model, network, forward_with_cfg, cfg):
    """(ours, official) samples (B, C, H, W) from the same noise."""
    bench = _bench()
    official_diffusion, _, _ = bench.load_official(OFFICIAL)
    y = torch.tensor([0, 7, 3])
    noise = torch.randn(B, 4, 8, 8, generator=torch.Generator().manual_seed(1))  # (B, C, H, W)
    chosen = choose_sampler(model, DiffusionObjective(), STEPS, cfg, "ddpm")
    ours = sample_batch(model, chosen, y, noise, torch.Generator().manual_seed(2), cfg, legacy_three_channel=True)
    gd = sys.modules["dit_official_diffusion.gaussian_diffusion"]
    monkeypatch.setattr(gd, "th", _OursNoise(torch.Generator().manual_seed(2)))
    theirs = bench.peer_batch(official_diffusion.create_diffusion(str(STEPS)), network, forward_with_cfg, y, noise,
                              cfg, model.num_classes, "fp32")
    return ours, theirs


def _ours(model, cfg, steps=STEPS, legacy_three_channel=True):
    chosen = choose_sampler(model, DiffusionObjective(), steps, cfg, "ddpm")
    noise = torch.randn(B, 4, 8, 8, generator=torch.Generator().manual_seed(1))  # as in _pair
    return sample_batch(model, chosen, torch.tensor([0, 7, 3]), noise, torch.Generator().manual_seed(2), cfg,
                        legacy_three_channel=legacy_three_channel)


@pytest.mark.parametrize("cfg", [1.0, 4.0])
def test_ours_equals_the_official_loop_on_our_network(monkeypatch, cfg):
    model = _bench().randomize_(DiT(**TINY), seed=0).eval()
    fwc = _official_forward_with_cfg()
    ours, theirs = _pair(monkeypatch, model, model.forward, lambda x, t, y, cfg_scale: fwc(model, x, t, y, cfg_scale), cfg)
    assert ours.shape == theirs.shape == (B, 4, 8, 8)
    assert ours.abs().max() > 1  # random weights: not a trivially zero output
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)  # bit for bit on the CPU when written
    # the check can fail: one step less, or guiding all 4 channels, moves the samples by far more
    assert not torch.allclose(_ours(model, cfg, steps=STEPS - 1), theirs, rtol=1e-3, atol=1e-3)
    if cfg != 1.0:
        assert not torch.allclose(_ours(model, cfg, legacy_three_channel=False), theirs, rtol=1e-3, atol=1e-3)


def test_ours_equals_the_official_model_and_loop(monkeypatch):
    pytest.importorskip("timm", reason="the official models.py imports timm")
    _, models, why = _bench().load_official(OFFICIAL)
    if models is None:
        pytest.skip(why)
    model = _bench().randomize_(DiT(**TINY), seed=0).eval()
    peer = models.DiT(**TINY).eval()
    peer.load_state_dict(model.state_dict(), strict=True)  # the official keys and shapes are ours
    ours, theirs = _pair(monkeypatch, model, peer.forward, peer.forward_with_cfg, 4.0)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
