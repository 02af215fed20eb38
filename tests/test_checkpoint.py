"""Checkpoint folders: round trip, atomic rename, keep-last-k, clear errors on damage."""

import json

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


def _one_step(model, opt):
    x = torch.randn(4, 1, 8, 8)
    out = model(x, torch.tensor([1, 2, 3, 4]), torch.tensor([0, 1, 2, 0]))
    out.square().mean().backward()
    opt.step()
    opt.zero_grad()


def test_round_trip_restores_everything(tmp_path):
    model, ema, opt = _setup()
    _one_step(model, opt)
    ema.update(model, 0.5)
    torch.manual_seed(123)
    ckpt = _save(tmp_path, 1, model, ema, opt, {"position": 16, "config": {"a": 1}})
    expected_rand = torch.rand(3)

    model2, ema2, opt2 = _setup(seed=1)
    state = _load(ckpt, model2, ema2, opt2)
    assert state["step"] == 1 and state["position"] == 16 and state["config"] == {"a": 1}
    for a, b in zip(model.state_dict().values(), model2.state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(ema.state_dict().values(), ema2.state_dict().values()):
        assert torch.equal(a, b)
    assert torch.equal(torch.rand(3), expected_rand)  # RNG state restored
    # the optimizer continues identically
    _one_step(model, opt)
    _one_step(model2, opt2)
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)
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
