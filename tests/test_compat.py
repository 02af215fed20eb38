"""Files written by an earlier ditforge still load: a latent store and a training checkpoint.

The fixtures in tests/data/ were written by the version at commit 3da9e14 (see
tests/data/make_v1_fixtures.py): whatever the code's layout becomes, these must keep loading.
"""

import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import assert_close_ulps, run_cli
from ditforge.data.store import LatentStore
from ditforge.data.loader import InfiniteLoader, StoreSource
from ditforge.sampling.load import load_for_sampling
from ditforge.train.checkpoint import read_training_state

DATA = Path(__file__).resolve().parent / "data"
STORE = DATA / "store_v1"
# the fixture run's own options: a resume must repeat them (all but --steps)
RUN_ARGS = ["--model", "DiT-Ti/4", "--batch-size", "8", "--ckpt-every", "2", "--sample-every", "0", "--log-every", "1", "--no-progress"]


@pytest.fixture
def run_v1(tmp_path):
    with zipfile.ZipFile(DATA / "checkpoint_v1" / "run.zip") as z:
        z.extractall(tmp_path / "run")
    return tmp_path / "run"


def test_store_v1_records_read_back_as_written():
    store = LatentStore(STORE)
    expected = load_file(str(STORE / "expected.safetensors"))
    n = expected["item"].numel()
    assert len(store) == n == 6 and store.latent_shape == (4, 8, 8) and store.class_names == ["even", "odd"]
    assert torch.equal(store.items, expected["item"]) and torch.equal(store.labels, expected["label"])
    assert store.manifest["skipped"][0]["file"] == "img-4" and not store.deterministic
    for flip in (0, 1):
        mean, logvar, labels = store.gather(torch.arange(n), torch.full((n,), bool(flip)))
        assert mean.dtype == torch.float16  # as stored, bit for bit: bytes read back, no arithmetic, exact on any CPU
        assert torch.equal(mean, expected["mean"][:, flip]) and torch.equal(logvar, expected["logvar"][:, flip])
        assert torch.equal(labels, expected["label"])


def test_store_v1_training_batches_are_unchanged():
    """The loader's batches (records, flips and posterior noise) equal those of the version that wrote the store:
    labels exactly, latents within 4 ulps (z = mean + exp(logvar / 2) * eps rounds its last bit by the CPU's
    vector kernels; `assert_close_ulps`)."""
    expected = load_file(str(STORE / "expected.safetensors"))
    loader = InfiniteLoader(StoreSource(LatentStore(STORE)), global_batch=4, seed=3, hflip=True, grad_accum=2)
    for step in range(2):
        batches = loader.next_step()
        assert len(batches) == 2
        for m, (x, y) in enumerate(batches):
            assert torch.equal(y, expected[f"batch{step}_{m}_y"])
            assert_close_ulps(x, expected[f"batch{step}_{m}_x"])


def test_checkpoint_v1_loads_for_sampling(run_v1, tmp_path):
    m = load_for_sampling(run_v1)
    assert m.step == 2 and m.model.depth == 6 and len(m.class_names) == 10
    # the fixture's weights are zeroed: all zero proves they came from the file, not from an init
    assert all(not bool(t.any()) for t in m.model.state_dict().values())
    run_cli("sample", str(run_v1), "--classes", "1", "2", "--per-class", "2", "--steps", "2", "--out", str(tmp_path / "g.png"))
    assert np.asarray(Image.open(tmp_path / "g.png")).ndim == 3


def test_checkpoint_v1_resumes_training(run_v1):
    with torch.random.fork_rng():  # reading a checkpoint restores its RNG states
        model, ema, opt, state = read_training_state(run_v1 / "checkpoints" / "step-0000002")
    assert state["step"] == 2 and state["position"] == 16 and model.keys() == ema.keys() and len(opt["state"]) > 0
    out = run_cli("train", "--run-dir", str(run_v1), *RUN_ARGS, "--steps", "3").stdout
    assert "resumed from" in out and "step 3/3" in out
    assert (run_v1 / "checkpoints" / "step-0000003" / "state.json").is_file()
