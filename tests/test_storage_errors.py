"""A full disk, a quota or a file-size limit is the machine's state, not a bug, and not a diverged
run: one line naming the reason, exit 2, and what was written before stays intact.

The failures are real: `/dev/full` answers every write with ENOSPC (from `write()`, so the
OSError names no file), and RLIMIT_FSIZE makes a write past the limit fail with EFBIG (in
safetensors' Rust writer, which raises SafetensorError, not OSError).
"""

import os
import resource
import signal
import subprocess
import sys

import pytest
import torch

from conftest import TINY_TRAIN, cpu_env, run_cli
from ditforge.cli import EXIT_USER_ERROR
from ditforge.train.checkpoint import latest_checkpoint, read_training_state


def _one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == EXIT_USER_ERROR, (proc.returncode, proc.stderr[-2000:])
    errors = [l for l in proc.stderr.splitlines() if "error:" in l]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    for needle in needles:
        assert needle in errors[0], errors[0]


def _file_size_limit(limit: int):
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


@pytest.mark.skipif(not os.access("/dev", os.W_OK) or not os.path.exists("/dev/full"), reason="needs /dev/full and a writable /dev")
def test_a_full_disk_from_write_is_one_line_and_exit_2(tmp_path):
    """`write()` of `--json` fails with ENOSPC and no file name: before, the handler re-raised it
    out of `main` (exit 1, the diverged status, and a traceback)."""
    proc = run_cli("bench", "--model", "DiT-Ti/4", "--input-size", "8", "--channels", "1", "--num-classes", "10",
                   "--batch", "2", "--steps", "1", "--warmup", "0", "--precision", "fp32", "--json", "/dev/full", check=False)
    _one_line_error(proc, "No space left on device (ENOSPC)", "rerun the same command")


def test_a_file_size_limit_while_checkpointing_keeps_the_last_checkpoint(tmp_path):
    run = tmp_path / "run"
    args = ["--run-dir", str(run), "--ckpt-every", "2", "--sample-every", "0", *TINY_TRAIN]
    run_cli("train", *args, "--steps", "2")
    before = latest_checkpoint(run)
    size = sum(p.stat().st_size for p in (before / "model.safetensors", before / "ema.safetensors"))

    # the model's weights (~150 kB) no longer fit in a file; the logs and config.json still do
    proc = subprocess.run([sys.executable, "-m", "ditforge", "train", *args, "--steps", "4"], capture_output=True,
                          text=True, timeout=600, env=cpu_env(OMP_NUM_THREADS="2"), preexec_fn=_file_size_limit(size // 4))
    _one_line_error(proc, "File too large (EFBIG)")
    assert latest_checkpoint(run) == before  # step 4 was not written, step 2 still reads whole
    with torch.random.fork_rng():  # reading a checkpoint restores its RNG states
        model, ema, opt, state = read_training_state(before)
    assert state["step"] == 2 and model and ema and opt["state"]
    again = run_cli("train", *args, "--steps", "4").stdout
    assert "resumed from" in again and "trained DiT-Ti/4 to step 4" in again
