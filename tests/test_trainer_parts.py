"""The named parts of the training loop on their own: Reporter, Checkpointer, resume_or_start."""

import copy
import json
import logging
import math
import re

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


def test_checkpointer_refuses_non_finite_weights_naming_the_last_finite_checkpoint(tmp_path):
    """The losses are computed before each update, so only the weights tell whether the update of
    a checkpoint step diverged: a NaN in the model or in the EMA writes no checkpoint, and the
    error names the last one written, whose weights were finite."""
    cfg, data, model, stepper = _run(tmp_path)
    ck = Checkpointer(tmp_path / "run", Dist(), model, stepper.ema.module, stepper.opt, {"position": 0}, keep_last=0)
    first = ck.save(1, 8)
    for module in (stepper.ema.module, model):  # the EMA alone, then the model alone
        weight = next(module.blocks[0].parameters()).view(-1)
        kept = weight[0].item()
        with torch.no_grad():
            weight[0] = math.nan
        with pytest.raises(NonFiniteLossError, match=f"weights .*NaN or Inf.* The last good checkpoint is {re.escape(str(first))}\\."):
            ck.save(2, 16)
        assert not (tmp_path / "run" / "checkpoints" / "step-0000002").exists() and ck.last == first
        with torch.no_grad():
            weight[0] = kept
    assert ck.save(2, 16) == ck.last  # finite again: written


def test_every_rank_knows_the_last_checkpoint_and_only_rank_0_reports(tmp_path):
    """Under torchrun rank 0 alone writes a checkpoint, but every rank names it (its folder name is
    a function of the step), so a diverged run's message is the same on every rank; and only
    rank 0's error is printed (`errors.is_quiet`): one message, not one per process."""
    from ditforge.errors import is_quiet

    cfg, data, model, stepper = _run(tmp_path)
    rank1 = Dist(rank=1)  # world size 1: no process group, but not the main process
    ck = Checkpointer(tmp_path / "run", rank1, model, stepper.ema.module, stepper.opt, {"position": 0}, keep_last=0)
    assert ck.save(3, 24) is None and not (tmp_path / "run" / "checkpoints").exists()  # rank 1 writes nothing
    assert ck.last == tmp_path / "run" / "checkpoints" / "step-0000003"
    for d, quiet in ((Dist(), False), (rank1, True)):
        r = Reporter(tmp_path, d, step=0, total=4, global_batch=8, progress=False)
        r.add(torch.tensor(math.nan))
        with pytest.raises(NonFiniteLossError, match="step-0000003") as e:
            r.check_finite(4, ck.last)
        r.close()
        assert is_quiet(e.value) == quiet


def test_config_json_is_replaced_whole_and_only_when_it_changes(tmp_path):
    """Every start saves the run's config.json and every rank may read it: written in place, a kill
    (or a reader) in the middle saw a truncated file. Now a new file is renamed over it, and an
    unchanged config is not written at all."""
    path = tmp_path / "config.json"
    TrainConfig(run_dir=str(tmp_path)).save(path)
    first = path.stat()
    TrainConfig(run_dir=str(tmp_path)).save(path)
    assert (path.stat().st_ino, path.stat().st_mtime_ns) == (first.st_ino, first.st_mtime_ns)  # not written again
    TrainConfig(run_dir=str(tmp_path), steps=900).save(path)
    assert path.stat().st_ino != first.st_ino  # another file, complete before it took the name
    assert TrainConfig.load(path).steps == 900 and [p.name for p in tmp_path.iterdir()] == ["config.json"]


def test_resumed_precision_is_the_recorded_one_where_the_device_runs_it():
    """`--precision auto` resumes in the precision the checkpoint was trained in, so the math stays
    the same on another device; fp16 (GPU-only loss scaling) continues in bf16 on a CPU."""
    from ditforge.train.device import resolve_precision

    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == "fp32"  # a new run
    assert resolve_precision("auto", cpu, recorded="bf16") == "bf16"  # a GPU run continued on a CPU
    assert resolve_precision("auto", cpu, recorded="fp16") == "bf16"
    assert resolve_precision("auto", cpu, recorded="fp32") == "fp32"
    assert resolve_precision("fp32", cpu, recorded="bf16") == "fp32"  # a precision given is the run's (config.json)


def test_a_run_resumed_on_another_device_keeps_its_precision_and_says_so(tmp_path, caplog):
    """A checkpoint records the precision and the device type it was trained with. One that says
    bf16 on cuda (a GPU run; edited here) resumes on this CPU in bf16, and the log says that the
    run moved and why it is no longer bit-identical: the noise generator runs on the device."""
    from ditforge.train.checkpoint import dump_state
    from ditforge.train.trainer import train

    args = dict(run_dir=str(tmp_path / "run"), global_batch=8, ckpt_every=1, log_every=1, sample_steps="2",
                model=dict(name="DiT-Ti/4"))
    train(TrainConfig(**args, steps=1), progress=False)
    path = tmp_path / "run" / "checkpoints" / "step-0000001" / "state.json"
    state = json.loads(path.read_text())
    assert (state["precision"], state["device"]) == ("fp32", "cpu")
    path.write_text(dump_state(dict(state, precision="bf16", device="cuda")))  # as a GPU run writes it, its checksum too
    with caplog.at_level(logging.INFO, logger="ditforge.train"):
        train(TrainConfig(**args, steps=2), progress=False)
    resumed = [m for m in caplog.messages if m.startswith("resumed from")]
    assert len(resumed) == 1 and "bf16 on cpu" in resumed[0], caplog.messages
    moved = [m for m in caplog.messages if "from cuda to cpu" in m]
    assert len(moved) == 1 and "no longer bit-identical" in moved[0], caplog.messages
    after = json.loads((tmp_path / "run" / "checkpoints" / "step-0000002" / "state.json").read_text())
    assert (after["precision"], after["device"]) == ("bf16", "cpu")  # what step 2 was trained with


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
