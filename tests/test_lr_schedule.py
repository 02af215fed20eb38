"""`--lr-schedule` and `--lr-warmup` (train/lr_schedule.py): the rates against PyTorch's own
schedulers, the rate each update is taken with, and a resumed run's rates."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from conftest import run_cli
from ditforge.config import TrainConfig
from ditforge.errors import UserError
from ditforge.models import create_model
from ditforge.train.distributed import Dist
from ditforge.train.lr_schedule import lr_at
from ditforge.train.step import TrainStep


def _torch_rates(scheduler_of, lr: float, steps: int) -> list[float]:
    """The rate PyTorch's scheduler gives each of `steps` optimizer steps."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    sched = scheduler_of(opt)
    rates = []
    for _ in range(steps):
        rates.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return rates


@pytest.mark.parametrize("schedule, scheduler_of", [
    ("constant", lambda opt: torch.optim.lr_scheduler.ConstantLR(opt, factor=1.0)),
    ("linear", lambda opt: torch.optim.lr_scheduler.LinearLR(opt, start_factor=1.0, end_factor=0.0, total_iters=10)),
    ("cosine", lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10, eta_min=0.0)),
])
def test_the_rates_are_pytorchs_schedulers(schedule, scheduler_of):
    ours = [lr_at(k, 0.3, 10, schedule) for k in range(10)]
    torch.testing.assert_close(torch.tensor(ours, dtype=torch.float64),
                               torch.tensor(_torch_rates(scheduler_of, 0.3, 10), dtype=torch.float64), rtol=1e-12, atol=1e-12)


def test_a_warmup_rises_to_the_rate_then_the_decay_runs_over_the_steps_after_it():
    lr, steps, warmup = 0.2, 12, 4
    assert [lr_at(k, lr, steps, "cosine", warmup) for k in range(warmup)] == pytest.approx([0.05, 0.1, 0.15, 0.2])
    decay = [lr_at(k, lr, steps, "linear", warmup) for k in range(warmup, steps)]
    assert decay == pytest.approx([lr * (1 - j / 8) for j in range(8)])  # full rate after the warm-up, lr/8 at the last
    assert lr_at(steps - 1, lr, steps, "cosine", warmup) == pytest.approx(lr * (1 + torch.cos(torch.tensor(7 / 8 * torch.pi)).item()) / 2)
    assert [lr_at(k, lr, steps, "constant", warmup) for k in (3, 4, 11)] == pytest.approx([0.2, 0.2, 0.2])


def test_each_update_is_taken_at_its_steps_rate():
    """Plain SGD moves the weights by lr x gradient: the same step from the same weights moves them
    lr_at(k) / lr as far under the schedule as without it."""
    moves = {}
    for schedule in ("constant", "linear", "cosine"):
        torch.manual_seed(0)
        model = create_model("DiT-Ti/4", input_size=8, in_channels=1, num_classes=10)
        cfg = TrainConfig(objective="flow", steps=8, global_batch=4, optim=dict(optimizer="sgd", lr=0.5, lr_schedule=schedule, lr_warmup=2))
        step = TrainStep(cfg, model, Dist(), "fp32")
        before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
        x, y = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 1, 2, 3])
        step(5, [(x, y)], [0])
        moves[schedule] = torch.cat([p.detach().flatten() for p in model.parameters()]) - before
        assert step.opt.param_groups[0]["lr"] == lr_at(5, 0.5, 8, schedule, 2)
    for schedule in ("linear", "cosine"):
        ratio = lr_at(5, 0.5, 8, schedule, 2) / 0.5  # linear 0.5, cosine 0.25
        torch.testing.assert_close(moves[schedule], moves["constant"] * ratio, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("optim, steps, message", [
    (dict(lr_schedule="step"), 10, "unknown lr schedule 'step'; choose one of: constant, linear, cosine"),
    (dict(lr_warmup=-1), 10, "lr_warmup must be a whole number of steps >= 0"),
    (dict(lr_schedule="cosine", lr_warmup=10), 10, "lr_warmup 10 leaves none of the 10 steps to the cosine decay"),
])
def test_a_schedule_that_cannot_run_is_refused(optim, steps, message):
    with pytest.raises(UserError, match=message):
        TrainConfig(steps=steps, optim=optim)
    assert TrainConfig.from_dict({"optim": {"lr": 1e-3}}).optim.lr_schedule == "constant"  # configs written before it


TRAIN = ["--objective", "flow", "--data", "digits", "--model", "DiT-Ti/2", "--batch-size", "16", "--ckpt-every", "2",
         "--keep-last", "0", "--log-every", "1", "--no-progress", "--optimizer", "sgd", "--lr", "0.05",
         "--lr-schedule", "cosine", "--lr-warmup", "1", "--sample-steps", "2"]


def _weights(run, step, name="model"):
    return load_file(str(run / "checkpoints" / f"step-{step:07d}" / f"{name}.safetensors"))


@pytest.mark.slow
def test_a_scheduled_run_logs_its_rates_and_resumes_bit_exactly(tmp_path):
    """With plain SGD, which keeps no optimizer state (such a run failed to resume before: torch's
    loader of a full optimizer state found no tensor to take a device from)."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    out = run_cli("train", "--run-dir", str(straight), "--steps", "4", *TRAIN)
    text = out.stdout + out.stderr
    for k in range(4):
        assert f"step {k + 1}/4 | loss" in text and f"| lr {lr_at(k, 0.05, 4, 'cosine', 1):.3g} |" in text
    shutil.copytree(straight, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step-0000004")
    assert "resumed from" in run_cli("train", "--run-dir", str(resumed), "--steps", "4", *TRAIN).stdout
    for name in ("model", "ema", "optimizer"):
        a, b = _weights(straight, 4, name), _weights(resumed, 4, name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    state = json.loads((straight / "checkpoints" / "step-0000004" / "state.json").read_text())
    assert state["config"]["optim"]["lr_schedule"] == "cosine" and state["config"]["optim"]["lr_warmup"] == 1

    longer = run_cli("train", "--run-dir", str(resumed), "--steps", "6", *TRAIN)
    assert "the cosine learning rate decays to 0 at step 6 now, not at 4" in longer.stdout + longer.stderr
    assert "step 5/6 | loss" in longer.stdout + longer.stderr
    assert f"| lr {lr_at(4, 0.05, 6, 'cosine', 1):.3g} |" in longer.stdout + longer.stderr
