"""`--optimizer adamw|sgd` (train/step.py's `make_optimizer`): each optimizer as configured, and the
settings that do not fit it refused. Across processes and through checkpoints: tests/test_distributed.py."""

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
    (dict(optimizer="adam"), "unknown optimizer 'adam'; choose one of: adamw, sgd"),
    (dict(momentum=0.9), "momentum 0.9 applies to --optimizer sgd only"),
    (dict(optimizer="sgd", momentum=1.0), r"momentum must be in \[0, 1\), got 1.0"),
])
def test_settings_that_do_not_fit_the_optimizer_are_refused(optim, message):
    with pytest.raises(UserError, match=message):
        TrainConfig(optim=optim)
