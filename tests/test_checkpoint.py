"""Checkpoint folders: round trip, atomic rename, keep-last-k, clear errors on damage, and the
folders a kill leaves at any point of a save or a deletion."""

import json
import os
import shutil

import pytest
import torch

from ditforge.errors import CheckpointError
from ditforge.models import create_model
from ditforge.train.checkpoint import (
    latest_checkpoint,
    list_checkpoints,
    load_weights,
    read_training_state,
    save_checkpoint,
)
from ditforge.train.distributed import full_model_state, full_optimizer_state, load_full_state
from ditforge.train.ema import EMA, ema_decay_at


def _setup(seed=0):
    torch.manual_seed(seed)
    model = create_model("DiT-Ti/4", input_size=8, in_channels=1, num_classes=3)
    ema = EMA(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    return model, ema, opt


def _save(tmp_path, step, model, ema, opt, meta, keep_last=0):
    states = full_model_state(model), full_model_state(ema.module), full_optimizer_state(model, opt)
    return save_checkpoint(tmp_path, step, *states, meta, keep_last=keep_last)


def _load(ckpt, model, ema, opt):
    model_sd, ema_sd, opt_sd, state = read_training_state(ckpt)
    load_full_state(model, model_sd, opt, opt_sd)
    load_full_state(ema.module, ema_sd)
    return state


def _one_step(model, opt, step):
    """One AdamW step on a regression loss with a real gradient (at DiT's zero initialisation the
    output is 0, so the gradient of `out.square()` would be 0 and so would the Adam moments).
    The batch and the label dropout are a function of `step`: two copies of a run take the same steps."""
    with torch.random.fork_rng():
        torch.manual_seed(step)
        x, target = torch.randn(4, 1, 8, 8), torch.randn(4, 2, 8, 8)  # 2C: learned sigma
        out = model(x, torch.tensor([1, 2, 3, 4]), torch.tensor([0, 1, 2, 0]))  # drops labels with torch.rand
    (out - target).square().mean().backward()
    opt.step()
    opt.zero_grad()


def test_round_trip_restores_everything(tmp_path):
    model, ema, opt = _setup()
    for step in range(3):  # from the third step on every parameter has had a gradient
        _one_step(model, opt, step)
        ema.update(model, 0.5)
    moments = [s[k] for s in opt.state.values() for k in ("exp_avg", "exp_avg_sq")]
    trained = [p for p in model.parameters() if p.requires_grad]  # all but the fixed sin-cos pos_embed
    assert len(moments) == 2 * len(trained) and all(m.any() for m in moments)  # nothing to swap unseen
    torch.manual_seed(123)
    ckpt = _save(tmp_path, 3, model, ema, opt, {"position": 16, "config": {"a": 1}})
    expected_rand = torch.rand(3)

    model2, ema2, opt2 = _setup(seed=1)
    state = _load(ckpt, model2, ema2, opt2)
    assert state["step"] == 3 and state["position"] == 16 and state["config"] == {"a": 1}
    for a, b in zip(model.state_dict().values(), model2.state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(ema.state_dict().values(), ema2.state_dict().values()):
        assert torch.equal(a, b)
    assert torch.equal(torch.rand(3), expected_rand)  # RNG state restored
    # the optimizer continues identically: the resumed copy's next steps equal the uninterrupted ones, bit for bit
    for step in (3, 4):
        _one_step(model, opt, step)
        _one_step(model2, opt2, step)
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)
    for s, s2 in zip(opt.state.values(), opt2.state.values()):
        assert all(torch.equal(s[k], s2[k]) for k in ("step", "exp_avg", "exp_avg_sq"))
    # no pickle anywhere: every file is safetensors or JSON
    assert sorted(p.suffix for p in ckpt.iterdir()) == [".json"] + [".safetensors"] * 4
    json.loads((ckpt / "state.json").read_text())


def test_latest_is_highest_complete_step_and_keep_last(tmp_path):
    model, ema, opt = _setup()
    for step in (5, 10, 100, 20):
        _save(tmp_path, step, model, ema, opt, {"position": 0}, keep_last=0)
    # a save killed half-way leaves only a hidden temporary folder: never "latest"
    (tmp_path / "checkpoints" / ".step-0000200.tmp").mkdir()
    assert latest_checkpoint(tmp_path).name == "step-0000100"
    _save(tmp_path, 200, model, ema, opt, {"position": 0}, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-0000100", "step-0000200"]
    assert not (tmp_path / "checkpoints" / ".step-0000200.tmp").exists()


def test_a_step_folder_missing_a_file_is_not_complete(tmp_path):
    """What an interrupted `rmtree` of an earlier version left: state.json still there, a tensor
    file gone. Such a folder is never `latest` (resume would fail on it, or worse, pass)."""
    model, ema, opt = _setup()
    for step in (1, 2):
        _save(tmp_path, step, model, ema, opt, {"position": 0})
    (tmp_path / "checkpoints" / "step-0000002" / "model.safetensors").unlink()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-0000001"]
    assert latest_checkpoint(tmp_path).name == "step-0000001"


class _Killed(BaseException):
    """A kill at a chosen point: raised by a patched file operation, caught by no `except Exception`."""


def test_a_save_of_the_same_step_killed_between_its_renames_loses_nothing(tmp_path, monkeypatch):
    """Re-saving step 2 (a resumed run saves the step it resumed at again) killed just before the
    new folder is renamed into place: the old step-2 folder is still a checkpoint (after the
    startup's `tidy_checkpoints`), and its tensors read whole."""
    from ditforge.train.checkpoint import tidy_checkpoints

    model, ema, opt = _setup()
    first = _save(tmp_path, 2, model, ema, opt, {"position": 16})
    rename = os.rename

    def killed_before_tmp_is_in_place(src, dst):
        if str(src).endswith(".tmp"):
            raise _Killed
        rename(src, dst)

    monkeypatch.setattr(os, "rename", killed_before_tmp_is_in_place)
    with pytest.raises(_Killed):
        _save(tmp_path, 2, model, ema, opt, {"position": 32})
    monkeypatch.setattr(os, "rename", rename)
    tidy_checkpoints(tmp_path)  # what every start does first
    assert latest_checkpoint(tmp_path) == first
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-0000002"]  # no leftovers
    with torch.random.fork_rng():  # reading a checkpoint restores its RNG states
        assert read_training_state(first)[3]["position"] == 16


def test_leftovers_of_killed_saves_and_deletions_are_recovered_or_removed(tmp_path):
    """Each state a kill can leave, made by hand: a half-written `.tmp` (removed), a re-save's
    `.old` whose new folder is in place (removed), a re-save's `.old` without it (it is the
    checkpoint again), a deletion's `.deleting` (removed: half-deleted, never listed)."""
    from ditforge.train.checkpoint import tidy_checkpoints

    model, ema, opt = _setup()
    for step in (1, 2, 3, 4):
        _save(tmp_path, step, model, ema, opt, {"position": step})
    root = tmp_path / "checkpoints"
    (root / ".step-0000005.tmp").mkdir()  # a save killed while writing
    (root / ".step-0000005.tmp" / "state.json").write_text("{}")
    shutil.copytree(root / "step-0000004", root / ".step-0000004.old")  # killed after the new step 4 was in place
    os.rename(root / "step-0000003", root / ".step-0000003.old")  # killed between the renames of a re-save
    os.rename(root / "step-0000001", root / ".step-0000001.deleting")  # keep-last's deletion, killed in rmtree
    (root / ".step-0000001.deleting" / "model.safetensors").unlink()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-0000002", "step-0000004"]  # before the tidy, too
    tidy_checkpoints(tmp_path)
    assert sorted(p.name for p in root.iterdir()) == ["step-0000002", "step-0000003", "step-0000004"]
    with torch.random.fork_rng():
        assert read_training_state(root / "step-0000003")[3]["position"] == 3


def test_keep_last_killed_inside_a_deletion_never_leaves_a_listed_half_folder(tmp_path, monkeypatch):
    """`rmtree` deletes a folder's files one by one in no set order; killed after the first one,
    the old code left `step-0000001/` with its state.json, which passed as complete."""
    model, ema, opt = _setup()
    _save(tmp_path, 1, model, ema, opt, {"position": 0})

    def killed_after_one_file(path, *args, **kwargs):
        os.unlink(os.path.join(path, "model.safetensors"))
        raise _Killed

    monkeypatch.setattr(shutil, "rmtree", killed_after_one_file)
    with pytest.raises(_Killed):
        _save(tmp_path, 2, model, ema, opt, {"position": 0}, keep_last=1)
    monkeypatch.undo()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-0000002"]
    assert not (tmp_path / "checkpoints" / "step-0000001").exists()  # renamed aside before any file went


def test_corrupt_or_missing_files_give_clear_errors(tmp_path):
    model, ema, opt = _setup()
    ckpt = _save(tmp_path, 1, model, ema, opt, {"position": 0})
    (ckpt / "model.safetensors").write_bytes(b"not a tensor file")
    with pytest.raises(CheckpointError, match="model.safetensors.*corrupt"):
        read_training_state(ckpt)
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing"):
        read_training_state(ckpt)
    (ckpt / "state.json").write_text("{broken")
    with pytest.raises(CheckpointError, match="state.json.*corrupt"):
        read_training_state(ckpt)


def test_load_weights_names_the_mismatch():
    small = create_model("DiT-Ti/4", input_size=8, in_channels=1, num_classes=3)
    other = create_model("DiT-Ti/2", input_size=8, in_channels=1, num_classes=3)
    with pytest.raises(CheckpointError, match=r"pos_embed has shape \(1, 16, 192\) but the model expects \(1, 4, 192\)"):
        load_weights(small, other.state_dict(), "other.safetensors")
    state = small.state_dict()
    state.pop("pos_embed")
    with pytest.raises(CheckpointError, match="missing keys.*pos_embed"):
        load_weights(small, state, "x")


def test_ema_update_and_warmup_closed_form():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    ema = EMA(model)
    start = [p.detach().clone() for p in ema.module.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model, 0.9)
    for s, e, p in zip(start, ema.module.parameters(), model.parameters()):
        torch.testing.assert_close(e, 0.9 * s + 0.1 * p)
    assert ema_decay_at(0, 0.9999, warmup=True) == pytest.approx(0.1)
    assert ema_decay_at(90, 0.9999, warmup=True) == pytest.approx(91 / 100)
    assert ema_decay_at(10**7, 0.9999, warmup=True) == 0.9999
    assert ema_decay_at(0, 0.9999, warmup=False) == 0.9999
