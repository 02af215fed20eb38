"""`--optimizer adamw|sgd|muon` (train/step.py's `make_optimizer`, train/muon.py): each optimizer as
configured, Muon against torch's own Muon and AdamW, and the settings that do not fit refused.
Across processes and through checkpoints: tests/test_distributed.py."""

import pytest
import torch

from ditforge.config import OptimConfig, TrainConfig
from ditforge.errors import UserError
from ditforge.models import create_model
from ditforge.train.distributed import Dist
from ditforge.train.step import TrainStep, make_optimizer


def test_sgd_steps_by_the_learning_rate_times_the_gradient():
    """Plain SGD is p - lr (g + wd p); with momentum m, the buffer b = m b + g + wd p steps it."""
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0]))
    g = torch.tensor([0.5, 0.25, -1.0])
    opt = make_optimizer([p], OptimConfig(optimizer="sgd", lr=0.1, weight_decay=0.01), torch.device("cpu"))
    assert isinstance(opt, torch.optim.SGD) and opt.defaults["fused"]
    before = p.detach().clone()
    p.grad = g.clone()
    opt.step()
    torch.testing.assert_close(p.detach(), before - 0.1 * (g + 0.01 * before))

    p = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0]))
    opt = make_optimizer([p], OptimConfig(optimizer="sgd", lr=0.1, momentum=0.9), torch.device("cpu"))
    for _ in range(2):
        p.grad = g.clone()
        opt.step()
    torch.testing.assert_close(p.detach(), torch.tensor([1.0, -2.0, 3.0]) - 0.1 * g - 0.1 * (0.9 * g + g))
    torch.testing.assert_close(opt.state[p]["momentum_buffer"], 1.9 * g)


def test_adamw_is_the_default_and_keeps_its_settings():
    opt = make_optimizer([torch.nn.Parameter(torch.ones(2))], OptimConfig(lr=2e-4, betas=(0.9, 0.95)), torch.device("cpu"))
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["fused"]
    assert (opt.defaults["lr"], opt.defaults["betas"], opt.defaults["weight_decay"]) == (2e-4, (0.9, 0.95), 0.0)
    cfg = TrainConfig(optim=dict(optimizer="sgd", lr=0.05))  # the step, and REPA's projector, take the run's optimizer
    step = TrainStep(cfg, create_model("DiT-Ti/4", input_size=8, in_channels=1, num_classes=10), Dist(), "fp32")
    assert isinstance(step.opt, torch.optim.SGD) and step.opt.defaults["lr"] == 0.05
    assert TrainConfig.from_dict({"optim": {"lr": 1e-3}}).optim.optimizer == "adamw"  # configs written before the option


@pytest.mark.parametrize("optim, message", [
    (dict(optimizer="adam"), "unknown optimizer 'adam'; choose one of: adamw, sgd, muon"),
    (dict(optimizer="muon", momentum=0.9), "momentum 0.9 applies to --optimizer sgd only"),
    (dict(momentum=0.9), "momentum 0.9 applies to --optimizer sgd only"),
    (dict(optimizer="sgd", momentum=1.0), r"momentum must be in \[0, 1\), got 1.0"),
])
def test_settings_that_do_not_fit_the_optimizer_are_refused(optim, message):
    with pytest.raises(UserError, match=message):
        TrainConfig(optim=optim)


def _with_grads(seed: int = 0):
    torch.manual_seed(seed)
    model = create_model("DiT-Ti/4", input_size=8, in_channels=1, num_classes=10)
    return model


def _set_grads(models, step: int):
    g = torch.Generator().manual_seed(100 + step)
    for ps in zip(*(m.parameters() for m in models)):
        if not ps[0].requires_grad:  # the fixed sin-cos pos_embed
            continue
        grad = torch.randn(ps[0].shape, generator=g)
        for p in ps:
            p.grad = grad.clone()


def test_muon_steps_the_blocks_matrices_as_torch_muon_and_the_rest_as_torch_adamw():
    """One optimizer, two updates: the blocks' 2-D weights step as torch.optim.Muon with
    adjust_lr_fn="match_rms_adamw" (Nesterov momentum 0.95, five Newton-Schulz steps in bfloat16,
    lr 0.2 sqrt(max(A, B))), everything else (embedders, final layer, biases, 4-D patch
    projection) as torch.optim.AdamW (ours through its fused kernel), over three steps with weight
    decay; the fixed pos_embed not at all."""
    import copy

    from ditforge.train.muon import Muon

    if not hasattr(torch.optim, "Muon"):
        pytest.skip("the reference, torch.optim.Muon, is in torch >= 2.9 (ours runs on any torch)")

    mine = _with_grads()
    theirs = copy.deepcopy(mine)
    cfg = OptimConfig(optimizer="muon", lr=0.02, betas=(0.9, 0.95), weight_decay=0.1)
    opt = make_optimizer(mine, cfg, torch.device("cpu"))
    assert isinstance(opt, Muon) and [g["muon"] for g in opt.param_groups] == [True, False]
    assert opt.fused  # the AdamW part in torch's fused kernel, as --optimizer adamw
    names = dict((id(p), n) for n, p in mine.named_parameters())
    matrices = [names[id(p)] for p in opt.param_groups[0]["params"]]
    assert len(matrices) == 5 * len(mine.blocks) and all(n.startswith("blocks.") for n in matrices)
    assert "x_embedder.proj.weight" not in matrices and "t_embedder.mlp.0.weight" not in matrices
    named = dict(theirs.named_parameters())
    reference = [torch.optim.Muon([named[n] for n in matrices], lr=0.02, weight_decay=0.1, momentum=0.95, nesterov=True,
                                  adjust_lr_fn="match_rms_adamw"),
                 torch.optim.AdamW([p for n, p in named.items() if n not in matrices and p.requires_grad], lr=0.02, betas=(0.9, 0.95),
                                   weight_decay=0.1)]
    for k in range(3):
        _set_grads([mine, theirs], k)
        opt.step()
        for r in reference:
            r.step()
    moved = 0
    for (n, a), b, start in zip(mine.named_parameters(), theirs.parameters(), _with_grads().parameters()):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-6, atol=1e-7, msg=n)
        moved += not torch.equal(a.detach(), start.detach())
    assert moved == sum(p.requires_grad for p in mine.parameters())


def test_newton_schulz_orthogonalises_into_the_band_and_commutes_with_transposing():
    """NS5 of a matrix with singular values spread over 1e-1..1e1 returns every one in about
    [0.7, 1.2] with the same singular vectors; a tall matrix is the wide one transposed."""
    from ditforge.train.muon import orthogonalise

    g = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(48, 48, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(32, 32, generator=g, dtype=torch.float64))
    s = torch.logspace(-1, 1, 32, dtype=torch.float64)
    d = (u[:, :32] * s) @ v.T  # (48, 32), singular values s
    o = orthogonalise(d).double()
    sv = torch.linalg.svdvals(o)
    assert 0.6 < sv.min() and sv.max() < 1.25, sv
    assert (u[:, :32].T @ o @ v).diagonal().abs().min() > 0.6 and torch.linalg.matrix_rank(o) == 32
    torch.testing.assert_close(orthogonalise(d.T.contiguous()), orthogonalise(d).T)


def test_muon_is_refused_under_fsdp_and_taken_by_the_step():
    with pytest.raises(UserError, match="--optimizer muon orthogonalises whole weight matrices.*--parallel ddp"):
        TrainConfig(optim=dict(optimizer="muon"), parallel="fsdp")
    cfg = TrainConfig(optim=dict(optimizer="muon", lr=1e-3))
    step = TrainStep(cfg, create_model("DiT-Ti/4", input_size=8, in_channels=1, num_classes=10), Dist(), "fp32")
    from ditforge.train.muon import Muon

    assert isinstance(step.opt, Muon) and step.opt.defaults["lr"] == 1e-3


def test_muon_under_the_fp16_grad_scaler_steps_as_without_it_and_skips_an_overflow():
    """The fp16 path on a GPU (train/step.py: scaler.step(opt) after a scaled backward), run with
    the CPU's GradScaler: the scaled step runs the plain one's update (Muon and AdamW barely depend
    on the gradient's scale, so this checks the path, not the unscaling), and a step whose
    gradients overflowed leaves every weight as it was (without the scaler: NaN weights)."""
    import copy

    model = _with_grads()
    plain, scaled = copy.deepcopy(model), copy.deepcopy(model)
    cfg = OptimConfig(optimizer="muon", lr=1e-3)
    opts = [make_optimizer(m, cfg, torch.device("cpu")) for m in (plain, scaled)]
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    x, y = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([1, 2, 3, 4])
    t = torch.full((4,), 10)
    plain(x, t, y).square().mean().backward()
    opts[0].step()
    scaler.scale(scaled(x, t, y).square().mean()).backward()
    scaler.step(opts[1])
    scaler.update()
    for (n, a), b in zip(plain.named_parameters(), scaled.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=n)
    before = [p.detach().clone() for p in scaled.parameters()]
    for p in scaled.parameters():
        if p.requires_grad:
            p.grad = torch.full_like(p, float("inf"))
    scaler.step(opts[1])
    assert all(torch.equal(a, b.detach()) for a, b in zip(before, scaled.parameters()))
