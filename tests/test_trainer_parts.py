"""The named parts of the training loop on their own: Reporter, Checkpointer, resume_or_start."""

import copy
import logging
import math

import pytest
import torch

from ditforge.config import TrainConfig
from ditforge.data.training_data import open_training_data
from ditforge.errors import NonFiniteLossError
from ditforge.models import create_model
from ditforge.train.checkpointer import Checkpointer
from ditforge.train.distributed import Dist
from ditforge.train.reporter import Reporter
from ditforge.train.resume import resume_or_start
from ditforge.train.step import TrainStep


def test_reporter_logs_the_mean_loss_and_stops_on_nan_naming_the_last_good_checkpoint(tmp_path, caplog):
    r = Reporter(tmp_path, Dist(), step=0, total=4, global_batch=8, progress=False)
    try:
        for loss in (1.0, 2.0, 3.0):
            r.add(torch.tensor(loss))
        r.check_finite(3, None)
        with caplog.at_level(logging.INFO, logger="ditforge.train"):
            r.log(3)
        assert r.last_loss == pytest.approx(2.0)
        assert any(m.startswith("step 3/4 | loss 2.0000 |") for m in caplog.messages), caplog.messages
        r.add(torch.tensor(math.nan))
        with pytest.raises(NonFiniteLossError, match="before step 4; stopped. The last good checkpoint is /x/step-3"):
            r.check_finite(4, "/x/step-3")
        with pytest.raises(NonFiniteLossError, match="No checkpoint had been written"):
            r.check_finite(4, None)
    finally:
        r.close()
    assert list((tmp_path / "tensorboard").iterdir())  # the event file


def _run(tmp_path):
    cfg = TrainConfig(run_dir=str(tmp_path / "run"), steps=4, global_batch=8, keep_last=1)
    data = open_training_data(cfg)
    torch.manual_seed(0)
    args = dict(name=cfg.model.name, input_size=data.shape[1], in_channels=data.shape[0], num_classes=data.num_classes)
    model = create_model(**args)
    return cfg, data, model, TrainStep(cfg, model, Dist(), "fp32")


def test_checkpointer_keeps_the_last_and_resume_restores_it(tmp_path):
    cfg, data, model, stepper = _run(tmp_path)
    start = resume_or_start(cfg, Dist(), model, stepper, data, "fp32")
    assert (start.step, start.position, start.checkpoint) == (0, 0, None)
    ck = Checkpointer(tmp_path / "run", Dist(), model, stepper.ema.module, stepper.opt, {"note": "x"}, cfg.keep_last)
    first = ck.save(1, 8)
    with torch.no_grad():
        model.final_layer.linear.bias.add_(1.0)
    second = ck.save(2, 16)
    assert ck.last == second and not first.exists()  # keep_last = 1
    saved = copy.deepcopy(model.state_dict())

    _, _, model2, stepper2 = _run(tmp_path)  # a fresh process: the initial weights, without the change
    start = resume_or_start(cfg, Dist(), model2, stepper2, data, "fp32")
    assert (start.step, start.position, start.checkpoint) == (2, 16, second)
    assert all(torch.equal(v, model2.state_dict()[k]) for k, v in saved.items())


@pytest.mark.parametrize("max_norm", [0.1, 1e3])
def test_clip_over_groups_is_one_global_norm(max_norm):
    """clip_grad_norm over groups: the L2 norm of all gradients together, sqrt(|g1|^2 + |g2|^2),
    and every gradient times min(1, max_norm / (norm + 1e-6)), as if the groups were one list."""
    from ditforge.train.distributed import clip_grad_norm

    gen = torch.Generator().manual_seed(0)
    groups = [[torch.nn.Parameter(torch.zeros(3, 4, dtype=torch.float64)) for _ in range(2)],
              [torch.nn.Parameter(torch.zeros(5, dtype=torch.float64))]]
    for p in (p for g in groups for p in g):
        p.grad = torch.randn(p.shape, generator=gen, dtype=torch.float64)
    before = [p.grad.clone() for g in groups for p in g]
    expected = math.sqrt(sum(float((g ** 2).sum()) for g in before))
    norm = clip_grad_norm(groups, max_norm)
    assert norm.item() == pytest.approx(expected, rel=1e-12)
    scale = min(1.0, max_norm / (expected + 1e-6))
    for p, g in zip((p for grp in groups for p in grp), before):
        torch.testing.assert_close(p.grad, g * scale, rtol=1e-12, atol=0)
