"""Runs that survive a cluster (issue 28, items 1, 4, 5): a preemption signal saves the work in
flight and the same command continues it bit for bit; a full disk is one line and loses nothing;
torchrun's restarts resume a killed rank.

Everything here is real: signals sent to real `ditforge` subprocesses (to one rank's PID only
under torchrun), a real size-limited tmpfs (mounted as root; skipped where mounting is refused).
The signals come at a random moment (`DELAY_SEED`, printed in every failure) after the run's
first checkpoint. The uninterrupted reference runs are shared by the tests (module fixtures);
the references and the reruns of one process run the real command in this process
(`cli.main`, 2 threads as the subprocesses), which spares a start of Python and torch each.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import TINY_TRAIN, cpu_env, run_cli
from ditforge import cli
from ditforge.cli import EXIT_INTERRUPTED, EXIT_USER_ERROR
from ditforge.data.store.format import write_safetensors
from ditforge.npz import NpzStreamWriter, save_npz_atomic
from ditforge.preemption import AGREE_EVERY, EXIT_PREEMPTED, StopRequest
from ditforge.train.checkpoint import checkpoint_dir, list_checkpoints, read_training_state
from ditforge.write_failures import WriteFailed, failing_write

STEPS = 24  # long enough that a signal sent soon after the first checkpoint (step 4) comes before the end
ARGS = ["--steps", str(STEPS), "--ckpt-every", "4", "--keep-last", "0", "--sample-every", "0", "--sample-steps", "2", *TINY_TRAIN]
DELAY_SEED = random.randrange(10**6)
RNG = random.Random(DELAY_SEED)
TIMEOUT_S = 300
#: The latest moment (seconds after the first checkpoint) a signal comes to a training run: the
#: 20 steps left take about 0.8 s where the tiny model runs fastest (25 steps/s on 2 cores).
SIGNAL_DELAY_S = 0.25


# -- the stop request, in this process ---------------------------------------------------------


def _deliver(sig: int, stop: StopRequest | None = None) -> None:
    os.kill(os.getpid(), sig)
    for _ in range(200):  # Python runs the handler between two bytecodes of the main thread
        if stop is None or stop.requested:
            return
        time.sleep(0.005)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1, signal.SIGINT])
def test_a_stop_signal_is_recorded_and_the_previous_handler_comes_back(sig):
    def before(signum, frame):
        raise AssertionError("the handler of before ran inside the request")

    previous = signal.signal(sig, before)
    try:
        with StopRequest() as stop:
            assert not stop.requested
            _deliver(sig, stop)
            assert stop.requested and stop.signal_name == signal.Signals(sig).name
        assert signal.getsignal(sig) is before
    finally:
        signal.signal(sig, previous)


def test_a_second_sigint_stops_at_once_and_a_repeated_sigterm_changes_nothing():
    with StopRequest() as stop:
        _deliver(signal.SIGTERM, stop)
        _deliver(signal.SIGTERM)  # torchrun forwarding SLURM's SIGTERM to a worker that had it
        assert stop.signal_name == "SIGTERM"
        with pytest.raises(KeyboardInterrupt):
            _deliver(signal.SIGINT)
            time.sleep(1)  # the handler raises here at the latest


def test_ranks_agree_every_few_steps_and_name_another_ranks_signal():
    """Under torchrun the flag is reduced at multiples of AGREE_EVERY only (no sync in between),
    and a rank that heard nothing stops with the signal another rank heard."""
    reduced = []

    def other_rank_heard_sigusr1(n: int) -> int:  # the reduction of 2 ranks, the other one signalled
        reduced.append(n)
        return max(n, int(signal.SIGUSR1))

    stop = StopRequest(other_rank_heard_sigusr1)
    assert not any(stop.agreed(step) for step in range(1, AGREE_EVERY))
    assert reduced == []
    assert stop.agreed(AGREE_EVERY) and stop.signal_name == "SIGUSR1" and reduced == [0]
    alone = StopRequest()  # one process: the flag itself, at every step
    assert not alone.agreed(1)
    alone.signum = int(signal.SIGTERM)
    assert alone.agreed(3)


# -- helpers of the end-to-end runs ------------------------------------------------------------


def _command(*args: str) -> int:
    """The real command line, in this process (its log lines reach `caplog`)."""
    return cli.main(list(args))


def _torchrun_cmd(*args: str, restarts: int = 0) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            f"--max-restarts={restarts}", "--monitor-interval=0.2", "-m", "ditforge", *args]


def _run_torchrun(*args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(_torchrun_cmd(*args), env=cpu_env(OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _start(cmd: list[str], log: Path, threads: str = "2") -> subprocess.Popen:
    """A command in its own session, its output in `log` (a pipe nobody reads could fill and stall it)."""
    out = open(log, "w")
    return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=cpu_env(OMP_NUM_THREADS=threads), start_new_session=True)


def _wait_for(proc: subprocess.Popen, path_exists, what: str, delay: float = 1.0) -> None:
    deadline = time.time() + TIMEOUT_S
    while not path_exists():
        assert proc.poll() is None and time.time() < deadline, f"the command ended before {what} (exit {proc.poll()})"
        time.sleep(0.02)
    time.sleep(RNG.uniform(0.0, delay))  # a random moment after it, in the middle of a step


def _finish(proc: subprocess.Popen, log: Path) -> tuple[int, str]:
    try:
        proc.wait(TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    return proc.returncode, log.read_text()


def _tensors(ckpt: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {f: load_file(str(ckpt / f)) for f in ("model.safetensors", "ema.safetensors", "optimizer.safetensors")}


def _assert_same_weights(a: Path, b: Path) -> None:
    ta, tb = _tensors(a), _tensors(b)
    for f in ta:
        assert ta[f].keys() == tb[f].keys(), f
        for k in ta[f]:
            assert torch.equal(ta[f][k], tb[f][k]), (f, k, f"DELAY_SEED={DELAY_SEED}")


def _stop_line(output: str, command: str) -> str:
    lines = [l for l in output.splitlines() if l.startswith(f"ditforge {command}: stopped by")]
    assert len(lines) == 1, output[-3000:]
    assert "to continue, rerun the same command: " in lines[0], lines[0]
    return lines[0]


def _worker_pids(agent: int) -> dict[int, int]:
    """RANK -> PID of the workers that torchrun's agent `agent` started."""
    pids = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            env = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        rank = next((int(e[5:]) for e in env if e.startswith(b"RANK=")), None)
        if ppid == agent and rank is not None:
            pids[rank] = int(entry.name)
    return pids


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    """The uninterrupted one-process run."""
    run = tmp_path_factory.mktemp("straight") / "run"
    assert _command("train", "--run-dir", str(run), *ARGS) == 0
    return run


@pytest.fixture(scope="module")
def straight_torchrun(tmp_path_factory) -> Path:
    """The uninterrupted run of two gloo processes."""
    run = tmp_path_factory.mktemp("straight2") / "run"
    _run_torchrun("train", "--run-dir", str(run), *ARGS)
    return run


# -- train ---------------------------------------------------------------------------------------


def test_sigterm_at_a_random_step_checkpoints_that_step_and_the_rerun_ends_bit_identical(straight, tmp_path, caplog):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "ditforge", "train", "--run-dir", str(run), *ARGS]
    proc = _start(cmd, tmp_path / "log")
    _wait_for(proc, lambda: checkpoint_dir(run, 4).is_dir(), "its first checkpoint", delay=SIGNAL_DELAY_S)
    proc.send_signal(signal.SIGTERM)
    status, output = _finish(proc, tmp_path / "log")
    assert status == EXIT_PREEMPTED, output[-3000:]
    line = _stop_line(output, "train")
    step = int(line.split("after step ")[1].split()[0])
    # the step in flight was finished and checkpointed: nothing but the signal's own step is redone
    assert 4 < step < STEPS and list_checkpoints(run)[-1] == checkpoint_dir(run, step), (line, list_checkpoints(run))
    assert f"its checkpoint is {checkpoint_dir(run, step)}" in line and f"ditforge train --run-dir {run}" in line

    caplog.set_level(logging.INFO)
    assert _command("train", "--run-dir", str(run), *ARGS) == 0
    assert f"resumed from {checkpoint_dir(run, step)} (step {step}," in caplog.text
    _assert_same_weights(checkpoint_dir(straight, STEPS), checkpoint_dir(run, STEPS))


def test_sigusr1_to_one_torchrun_rank_stops_both_at_one_step_and_the_rerun_ends_bit_identical(straight_torchrun, tmp_path):
    """Rank 1 alone hears SIGUSR1; both ranks checkpoint at the next multiple of AGREE_EVERY and
    exit EXIT_PREEMPTED (torchrun, without restarts, then exits 1); rank 0 says so, once."""
    run = tmp_path / "run"
    proc = _start(_torchrun_cmd("train", "--run-dir", str(run), *ARGS), tmp_path / "log", threads="1")
    _wait_for(proc, lambda: checkpoint_dir(run, 4).is_dir(), "its first checkpoint", delay=SIGNAL_DELAY_S)
    os.kill(_worker_pids(proc.pid)[1], signal.SIGUSR1)
    status, output = _finish(proc, tmp_path / "log")
    assert status != 0, output[-3000:]
    assert f"exitcode  : {EXIT_PREEMPTED}" in output, output[-3000:]  # torchrun's summary of its workers
    line = _stop_line(output, "train")
    assert line.startswith("ditforge train: stopped by SIGUSR1 after step "), line
    step = int(line.split("after step ")[1].split()[0])  # the first multiple of AGREE_EVERY after the signal
    assert step % AGREE_EVERY == 0 and 4 < step < STEPS and f"after step {step} of {STEPS}" in line, (line, f"DELAY_SEED={DELAY_SEED}")
    assert list_checkpoints(run)[-1] == checkpoint_dir(run, step)
    assert "torchrun ... -m ditforge train" in line

    again = _run_torchrun("train", "--run-dir", str(run), *ARGS).stdout
    assert f"resumed from {checkpoint_dir(run, step)} (step {step}," in again, again[-3000:]
    _assert_same_weights(checkpoint_dir(straight_torchrun, STEPS), checkpoint_dir(run, STEPS))


def test_torchrun_max_restarts_resumes_a_killed_rank_to_the_weights_of_an_uninterrupted_run(straight_torchrun, tmp_path):
    run = tmp_path / "run"
    proc = _start(_torchrun_cmd("train", "--run-dir", str(run), *ARGS, restarts=2), tmp_path / "log", threads="1")
    _wait_for(proc, lambda: checkpoint_dir(run, 4).is_dir(), "its first checkpoint", delay=SIGNAL_DELAY_S)
    os.kill(_worker_pids(proc.pid)[1], signal.SIGKILL)
    status, output = _finish(proc, tmp_path / "log")
    assert status == 0, output[-3000:]
    # one restart did it: the restarted group met under its own store prefix (train/distributed.py;
    # before, its gloo mesh read the dead rank's address, failed and burnt a restart) and resumed
    assert output.count("resumed from") == 1 and "connectFullMesh failed" not in output, output[-3000:]
    _assert_same_weights(checkpoint_dir(straight_torchrun, STEPS), checkpoint_dir(run, STEPS))


# -- extract and bulk sample -------------------------------------------------------------------

EXTRACT = ["extract", "--data", "digits", "--vae", "identity", "--image-size", "8", "--batch-size", "1", "--shard-size", "16",
           "--workers", "0", "--no-progress"]


def test_a_signal_during_extract_finishes_the_shard_and_the_rerun_gives_the_same_store(tmp_path):
    assert _command(*EXTRACT, "--out", str(tmp_path / "straight")) == 0
    out = tmp_path / "stopped"
    proc = _start([sys.executable, "-m", "ditforge", *EXTRACT, "--out", str(out)], tmp_path / "log")
    _wait_for(proc, lambda: (out / "shards" / "shard-00000-00001.safetensors").exists(), "its second shard", delay=0.1)  # (all 90 shards: ~0.9 s)
    proc.send_signal(signal.SIGTERM)
    status, output = _finish(proc, tmp_path / "log")
    assert status == EXIT_PREEMPTED, output[-3000:]
    line = _stop_line(output, "extract")
    assert "images are in finished shards" in line and not (out / "manifest.json").exists()
    assert not list((out / "shards").glob("*.tmp"))
    assert _command(*EXTRACT, "--out", str(out)) == 0
    names = sorted(p.relative_to(tmp_path / "straight") for p in (tmp_path / "straight").rglob("*.safetensors"))
    assert names == sorted(p.relative_to(out) for p in out.rglob("*.safetensors"))
    for name in [*names, Path("manifest.json")]:
        assert (tmp_path / "straight" / name).read_bytes() == (out / name).read_bytes(), (name, f"DELAY_SEED={DELAY_SEED}")


def test_a_signal_during_bulk_sampling_finishes_the_part_and_the_rerun_gives_the_same_npz(straight, tmp_path, capsys):
    # 40 steps make a part of 4 images about 0.35 s here, so the 5 parts after the first outlast the signal's delay
    args = ["sample", str(straight), "--num-samples", "24", "--steps", "40", "--batch-size", "4", "--shard-size", "4"]
    assert _command(*args, "--out", str(tmp_path / "straight.npz")) == 0
    out = tmp_path / "stopped.npz"
    parts = tmp_path / "stopped.npz.parts"
    proc = _start([sys.executable, "-m", "ditforge", *args, "--out", str(out)], tmp_path / "log")
    _wait_for(proc, lambda: (parts / "shard-00000.npz").exists(), "its first part", delay=0.2)
    proc.send_signal(signal.SIGINT)  # a first Ctrl-C is a stop request too
    status, output = _finish(proc, tmp_path / "log")
    assert status == EXIT_PREEMPTED, output[-3000:]
    _stop_line(output, "sample")
    done = len(list(parts.glob("shard-*.npz")))
    assert not out.exists() and 1 <= done < 6 and not list(parts.glob(".*"))
    capsys.readouterr()
    assert _command(*args, "--out", str(out)) == 0
    assert f"{24 - 4 * done} sampled by this run" in capsys.readouterr().out  # the parts written were kept
    a, b = np.load(tmp_path / "straight.npz"), np.load(out)
    assert np.array_equal(a["arr_0"], b["arr_0"]) and np.array_equal(a["labels"], b["labels"])


def test_a_second_ctrl_c_stops_at_once(tmp_path):
    """Both Ctrl-Cs come within the first step, which a batch of 1024 makes long (0.85 s here; the
    second comes 0.2 s after the first): a second Ctrl-C while the step in flight finishes
    stops the command there, with nothing saved."""
    run, log = tmp_path / "run", tmp_path / "log"
    proc = _start([sys.executable, "-m", "ditforge", "train", "--run-dir", str(run), *ARGS, "--steps", "400", "--batch-size", "1024"], log)
    _wait_for(proc, lambda: "new run in" in log.read_text(), "it started training", delay=0.0)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.2)  # two signals close together are one (the kernel and Python merge a pending signal)
    proc.send_signal(signal.SIGINT)
    status, output = _finish(proc, log)
    assert "stopped by SIGINT" not in output, "the first step ended within 0.2 s: the test needs a longer step here\n" + output[-3000:]
    assert status == EXIT_INTERRUPTED and "ditforge train: interrupted" in output and "Traceback" not in output, output[-3000:]
    assert not (run / "checkpoints").exists() or not list_checkpoints(run)  # nothing more was saved


# -- a full disk ---------------------------------------------------------------------------------


@contextmanager
def small_file_system(folder: Path, size: int):
    """A tmpfs of `size` bytes mounted on `folder` (root only; skips the test where refused)."""
    folder.mkdir(parents=True, exist_ok=True)
    if shutil.which("mount") is None:
        pytest.skip("no mount command here, so no small file system to fill")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({done.stderr.strip() or 'mount failed'}): needs root with CAP_SYS_ADMIN")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def _grow(folder: Path, size: int) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", str(folder)], check=True, capture_output=True)


def test_a_full_disk_while_checkpointing_is_one_line_keeps_the_last_checkpoint_and_resumes(straight, tmp_path, caplog, capsys):
    ckpt = sum(p.stat().st_size for p in checkpoint_dir(straight, 4).iterdir())
    with small_file_system(tmp_path / "disk", int(1.5 * ckpt) + 2**21) as disk:  # room for the first checkpoint, not the second
        run = disk / "run"
        capsys.readouterr()
        status = _command("train", "--run-dir", str(run), *ARGS)
        stderr = capsys.readouterr().err
        errors = [l for l in stderr.splitlines() if "error:" in l]
        assert status == EXIT_USER_ERROR and len(errors) == 1 and "Traceback" not in stderr, stderr[-3000:]
        assert f"cannot write '{checkpoint_dir(run, 8)}': No space left on device (ENOSPC); it needs " in errors[0], errors[0]
        assert "free there" in errors[0] and "rerun the same command" in errors[0]
        assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-0000004"]  # no temporary folder
        with torch.random.fork_rng():  # reading a checkpoint restores its RNG states
            model, ema, opt, state = read_training_state(checkpoint_dir(run, 4))
        assert state["step"] == 4 and model and ema and opt["state"]

        _grow(disk, (STEPS // 4 + 2) * ckpt + 2**22)  # space is freed: room for every checkpoint (--keep-last 0)
        caplog.set_level(logging.INFO)
        assert _command("train", "--run-dir", str(run), *ARGS) == 0
        assert f"resumed from {checkpoint_dir(run, 4)} (step 4," in caplog.text
        _assert_same_weights(checkpoint_dir(straight, STEPS), checkpoint_dir(run, STEPS))


def test_a_full_disk_while_bulk_sampling_finishes_its_npz_is_one_line_and_the_rerun_writes_it(straight, tmp_path):
    """The parts fit, the finished .npz does not (it fails while the zip writes its end records):
    one line, exit 2, no temporary file and no second error from the unfinished zip when it is
    collected ('Exception ignored in ZipFile.__del__: seek of closed file', before)."""
    args = ["sample", str(straight), "--num-samples", "96", "--batch-size", "8", "--shard-size", "8", "--steps", "1"]
    with small_file_system(tmp_path / "disk", 60 * 1024) as disk:  # 12 parts of 4 KiB blocks fit, the .npz not
        proc = run_cli(*args, "--out", str(disk / "s.npz"), check=False)
        assert proc.returncode == EXIT_USER_ERROR, proc.stderr[-2000:]
        said = [line for line in proc.stderr.splitlines() if "error" in line.lower() or "Exception" in line]
        assert len(said) == 1 and "cannot write" in said[0] and "s.npz" in said[0], proc.stderr[-2000:]
        assert not [p for p in disk.iterdir() if p.name.startswith(".s.npz.tmp")]
        subprocess.run(["mount", "-o", "remount,size=8m", str(disk)], check=True)  # space again: the parts stay, the rerun assembles them
        assert run_cli(*args, "--out", str(disk / "s.npz")).returncode == 0 and (disk / "s.npz").is_file()


def test_a_full_disk_while_writing_a_shard_or_an_npz_is_one_line_and_leaves_no_temporary_file(tmp_path):
    with small_file_system(tmp_path / "disk", 2**20) as disk:
        write_safetensors(disk / "small.safetensors", {"x": torch.zeros(1000)}, {})
        before = (disk / "small.safetensors").read_bytes()
        with pytest.raises(WriteFailed, match=r"cannot write '.*big\.safetensors': No space left on device \(ENOSPC\); it needs 2\.0 MiB"):
            write_safetensors(disk / "big.safetensors", {"x": torch.zeros(2**19)}, {})
        with pytest.raises(WriteFailed, match=r"cannot write '.*part\.npz': .*ENOSPC.*it needs 2\.0 MiB"):
            save_npz_atomic(disk / "part.npz", images=np.zeros((2, 2**20), np.uint8))
        with pytest.raises(WriteFailed, match=r"cannot write '.*out\.npz': .*ENOSPC.*it needs 4\.0 MiB"):
            with failing_write(disk / "out.npz", 2**22), NpzStreamWriter(disk / "out.npz", {"arr_0": ((4, 2**20), np.uint8)}) as w:
                for _ in range(4):
                    w.write("arr_0", np.ones((1, 2**20), np.uint8))
        assert sorted(p.name for p in disk.iterdir()) == ["small.safetensors"]  # no .tmp of any of them
        assert (disk / "small.safetensors").read_bytes() == before
