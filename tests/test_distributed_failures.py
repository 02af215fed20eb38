"""Failures under torchrun (2 gloo processes on CPU): every rank stops, none waits in a collective
for a rank that has failed, and the user reads one message, rank 0's.

The first two tests start from one diverged run: `--lr 1e3` overflows the loss in the third step, after the
checkpoints of steps 1 and 2 (`tests/test_cli.py` runs the same in one process); the last three run
`tests/leave_worker.py`, how the ranks leave their group.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import cpu_env
from ditforge.train.checkpoint import list_checkpoints

ARGS = ["--model", "DiT-Ti/4", "--batch-size", "16", "--log-every", "5", "--no-progress", "--steps", "4", "--ckpt-every", "1",
        "--lr", "1e3", "--sample-steps", "2"]
# A rank that waits for a failed one waits for gloo's timeout (30 minutes): this is far from it and
# from the 1-2 minutes a run takes on 2 busy CPU cores.
TIMEOUT_S = 240


def torchrun(*args: str, nproc: int = 2) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", "ditforge", *args]
    return subprocess.run(cmd, env=cpu_env(OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=TIMEOUT_S)


def _messages(proc: subprocess.CompletedProcess) -> list[str]:
    """What ditforge itself said went wrong, on any rank (torchrun adds its own summary of exit codes)."""
    return [l for l in (proc.stdout + proc.stderr).splitlines() if l.startswith("ditforge train:")]


@pytest.fixture(scope="module")
def diverged(tmp_path_factory):
    run = tmp_path_factory.mktemp("diverged") / "run"
    return run, torchrun("train", "--run-dir", str(run), *ARGS)


def test_a_diverged_torchrun_says_so_once_naming_the_last_checkpoint(diverged):
    """Rank 1 used to add "No checkpoint had been written" beside rank 0's real path: it kept the
    checkpoint it had resumed from (none) as the last, since rank 0 alone writes them."""
    run, proc = diverged
    assert proc.returncode != 0
    kept = list_checkpoints(run)
    assert kept, proc.stderr[-3000:]
    messages = _messages(proc)
    assert len(messages) == 1 and "NaN or Inf" in messages[0], proc.stderr[-3000:]
    assert f"The last good checkpoint is {kept[-1]}." in messages[0]


def test_a_corrupt_checkpoint_stops_every_rank_with_one_line(diverged, tmp_path):
    """Rank 0 alone reads the tensors of a resume; finding them corrupt, it used to exit while
    rank 1 waited in the broadcast, until gloo saw the connection close and rank 1 printed a
    traceback as a bug of ours. Now both ranks raise the same one-line error; rank 0 prints it."""
    run = tmp_path / "run"
    shutil.copytree(diverged[0], run)
    for ckpt in list_checkpoints(run):  # the latest alone would be set aside and the previous one resumed: every one
        cut = ckpt / "model.safetensors"
        cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    weights = list_checkpoints(run)[-1] / "model.safetensors"
    proc = torchrun("train", "--run-dir", str(run), *ARGS)  # a hang raises TimeoutExpired
    assert proc.returncode != 0
    messages = _messages(proc)
    assert len(messages) == 1, proc.stderr[-3000:]
    assert messages[0].startswith("ditforge train: error: ") and str(weights) in messages[0] and "corrupt" in messages[0]
    assert "internal error" not in proc.stderr and "Connection closed" not in proc.stderr


LEAVE_WORKER = Path(__file__).with_name("leave_worker.py")


@pytest.mark.parametrize("case, waits", [("returned", True), ("every-rank", True), ("one-rank", False), ("late-out", True)])
def test_the_ranks_leave_their_group_together_when_they_end_together(tmp_path, case, waits):
    """A rank that tore the gloo group down while the other's last collective was in flight
    aborted the other ("terminate called without an active exception", after a stop on SIGUSR1
    in CI; again in the suite after a barrier was added, since a barrier can return on one rank
    before the other's): `distributed.leave` waits until every rank is out of its last barrier when
    all of them end together, and only then."""
    out = tmp_path / "report.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(LEAVE_WORKER), str(out), case]
    proc = subprocess.run(cmd, env=cpu_env(OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(out.read_text()) == dict(waited=waits, initialized=False)
