"""Data-parallel training under torchrun on CPU (gloo, 2 processes), against one process."""

import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import cpu_env, run_cli

# --grad-clip 0.01 clips every step, so the gradient norm must be the whole model's on every rank (FSDP: of all shards)
ARGS = ["--steps", "6", "--batch-size", "16", "--ckpt-every", "3", "--keep-last", "0", "--model", "DiT-Ti/4", "--log-every", "3",
        "--no-progress", "--grad-clip", "0.01"]


def torchrun(*args, nproc=2, check=True, popen=False):
    """`torchrun -m ditforge ARGS` in `nproc` gloo processes on the CPU.

    With `check`, a run into a new `--run-dir` whose first failing rank was killed by a signal
    (SIGSEGV, SIGABRT: native code, which ditforge's Python cannot cause by a wrong result) is run
    once more from nothing, with a warning that shows in the suite's summary. Seen in CI
    (2026-12-07, `--parallel fsdp`) and once in 400 runs of this file's FSDP command here: a
    rank's SIGSEGV in a checkpoint's full-state gather, in `malloc` inside a gloo worker thread
    (the heap corrupted before, by code not found; README, "One CPU, one GPU, many GPUs"). A
    second crash, a rank's error or wrong weights fail as before; a resumed run (its folder
    already there) is never run again."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", "ditforge", *args]
    env = cpu_env(OMP_NUM_THREADS="1")  # gloo on CPUs, also where GPUs are visible
    if popen:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    run_dir = Path(args[args.index("--run-dir") + 1]) if "--run-dir" in args else None
    fresh = run_dir is not None and not run_dir.exists()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0 and fresh and _killed_by_a_signal(proc.stderr):
        warnings.warn(f"torchrun {' '.join(args)}: a rank was killed by a signal; run again once\n{proc.stderr[-6000:]}")
        shutil.rmtree(run_dir, ignore_errors=True)
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"torchrun {' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr[-8000:]}")
    return proc


def _killed_by_a_signal(stderr: str) -> bool:
    """Whether torchrun's summary names a signal as the first failure ("Root Cause ... exitcode : -11")."""
    cause = re.search(r"Root Cause.*?exitcode\s*:\s*(-?\d+)", stderr, re.DOTALL)
    return cause is not None and int(cause.group(1)) < 0


# torchrun's summary of a failed run, as CI printed it (2026-12-07), with the root cause's code filled in
SUMMARY = """torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
=======================================================
ditforge FAILED
-------------------------------------------------------
Failures:
[1]:
  rank      : 0 (local_rank: 0)
  exitcode  : -15 (pid: 17917)  (SIGTERM)
-------------------------------------------------------
Root Cause (first observed failure):
[0]:
  rank      : 1 (local_rank: 1)
  exitcode  : {code}
=======================================================
"""


def test_a_run_again_is_for_a_rank_killed_by_a_signal_only():
    assert _killed_by_a_signal(SUMMARY.format(code="-11 (pid: 17918)  (SIGSEGV)"))
    assert _killed_by_a_signal(SUMMARY.format(code="-6 (pid: 17918)  (SIGABRT)"))
    assert not _killed_by_a_signal(SUMMARY.format(code="1 (pid: 17918)"))  # an error of ditforge's: never again
    assert not _killed_by_a_signal("ditforge train: error: --steps must be positive, not 0")


def _weights(run, step=6, name="model"):
    return load_file(str(run / "checkpoints" / f"step-{step:07d}" / f"{name}.safetensors"))


def _assert_close(a, b, atol=1e-6):
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= atol, worst


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    run = tmp_path_factory.mktemp("single") / "run"
    run_cli("train", "--run-dir", str(run), *ARGS)
    return run


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_match_one_with_the_same_global_batch(single, tmp_path, parallel):
    run = tmp_path / parallel
    out = torchrun("train", "--run-dir", str(run), "--parallel", parallel, *ARGS)
    assert out.stdout.count("trained DiT-Ti/4") == 1  # only rank 0 reports
    _assert_close(_weights(single), _weights(run))
    _assert_close(_weights(single, name="ema"), _weights(run, name="ema"))
    line = [l for l in out.stdout.splitlines() if "step 6/6" in l][0]
    assert "loss" in line and "images/s" in line
    # a checkpoint written by 2 processes resumes in 1 (unwrapped weights, named optimizer state)
    # and in 2, where rank 0 alone reads it and broadcasts it: the same weights either way
    one = tmp_path / f"{parallel}-one"
    shutil.copytree(run, one)
    more = [a if a != "6" else "9" for a in ARGS]
    assert "resumed from" in run_cli("train", "--run-dir", str(one), *more).stdout
    assert "resumed from" in torchrun("train", "--run-dir", str(run), "--parallel", parallel, *more).stdout
    _assert_close(_weights(one, 9), _weights(run, 9))
    _assert_close(_weights(one, 9, "optimizer"), _weights(run, 9, "optimizer"))


# Without clipping, and with SGD as well as AdamW: SGD's update is linear in the gradient, so a
# gradient summed over ranks instead of averaged, or not divided over the micro-batches, moves the
# weights twice as far; AdamW's update barely depends on the gradient's scale, and a clipped one not at all.
UNCLIPPED = ["--steps", "4", "--batch-size", "16", "--ckpt-every", "2", "--keep-last", "0", "--model", "DiT-Ti/4",
             "--log-every", "4", "--no-progress", "--sample-steps", "1"]
OPTIMIZERS = {"adamw": [], "sgd": ["--optimizer", "sgd", "--lr", "0.05", "--momentum", "0.9"], "muon": ["--optimizer", "muon"]}
# how far from one process (README): SGD measured 3.0e-8 (momentum buffers; weights 7.5e-9), AdamW 2.0e-7 (its
# step divides by the root of the second moment, large where a gradient is near 0)
WITHIN = {"sgd": 1.2e-7, "adamw": 1e-6}


@pytest.fixture(scope="module")
def single_unclipped(tmp_path_factory):
    """One process, no accumulation, no clipping: the run of each optimizer, made once."""
    runs = {}

    def run(optimizer):
        if optimizer not in runs:
            runs[optimizer] = tmp_path_factory.mktemp(f"single-{optimizer}") / "run"
            run_cli("train", "--run-dir", str(runs[optimizer]), *UNCLIPPED, *OPTIMIZERS[optimizer])
        return runs[optimizer]

    return run


# Each case splits the batch over ranks and micro-batches at once, so one case catches both scale errors (a sum
# over ranks failed the sgd cases by 1.9e-2 and adamw by 9.2e-4, as did a missing division over micro-batches);
# ~1 min each on 2 cores, so three: SGD on each strategy, and AdamW for the README's figure
@pytest.mark.parametrize("optimizer, parallel, accum", [("sgd", "ddp", 2), ("sgd", "fsdp", 2), ("adamw", "fsdp", 2)])
def test_two_processes_match_one_without_clipping(single_unclipped, tmp_path, optimizer, parallel, accum):
    """2 processes x `accum` micro-batches of 16 / (2 accum) images against 1 process x 1 micro-batch of 16."""
    one = single_unclipped(optimizer)
    run = tmp_path / "run"
    torchrun("train", "--run-dir", str(run), "--parallel", parallel, "--grad-accum", str(accum), *UNCLIPPED,
             *OPTIMIZERS[optimizer])
    for name in ("model", "ema", "optimizer"):
        _assert_close(_weights(one, 4, name), _weights(run, 4, name), atol=WITHIN[optimizer])


def test_sgd_resumes_to_the_same_weights_and_is_part_of_the_run(single_unclipped, tmp_path):
    """SGD's momentum buffers round-trip through a checkpoint (one process): resumed at step 2, the run
    ends at step 4 with the uninterrupted run's weights and state, bit for bit; the optimizer defines
    the run, so the folder refuses AdamW."""
    straight = single_unclipped("sgd")
    run = tmp_path / "resumed"
    shutil.copytree(straight, run)
    shutil.rmtree(run / "checkpoints" / "step-0000004")
    assert any(k.endswith("/momentum_buffer") for k in _weights(run, 2, "optimizer"))
    assert "resumed from" in run_cli("train", "--run-dir", str(run), *UNCLIPPED, *OPTIMIZERS["sgd"]).stdout
    for name in ("model", "ema", "optimizer"):
        _assert_close(_weights(straight, 4, name), _weights(run, 4, name), atol=0.0)
    out = run_cli("train", "--run-dir", str(run), *UNCLIPPED, "--lr", "0.05", check=False)
    assert out.returncode == 2 and "'optimizer': 'sgd'" in out.stderr, out.stderr


def test_muon_resumes_to_the_same_weights_and_is_part_of_the_run(single_unclipped, tmp_path):
    """Muon's momentum buffers (the blocks' matrices) and AdamW's moments (the rest) round-trip
    through one checkpoint: resumed at step 2, the run ends at step 4 bit for bit; AdamW's
    command refuses the folder."""
    straight = single_unclipped("muon")
    state = _weights(straight, 2, "optimizer")
    assert any(k.endswith("/momentum_buffer") for k in state) and any(k.endswith("/exp_avg_sq") for k in state)
    run = tmp_path / "resumed"
    shutil.copytree(straight, run)
    shutil.rmtree(run / "checkpoints" / "step-0000004")
    assert "resumed from" in run_cli("train", "--run-dir", str(run), *UNCLIPPED, *OPTIMIZERS["muon"]).stdout
    for name in ("model", "ema", "optimizer"):
        _assert_close(_weights(straight, 4, name), _weights(run, 4, name), atol=0.0)
    out = run_cli("train", "--run-dir", str(run), *UNCLIPPED, check=False)
    assert out.returncode == 2 and "'optimizer': 'muon'" in out.stderr, out.stderr


def test_gradient_accumulation_matches(single, tmp_path):
    run = tmp_path / "accum"
    run_cli("train", "--run-dir", str(run), "--grad-accum", "4", *ARGS)
    _assert_close(_weights(single), _weights(run))


def test_uneven_global_batch_is_refused(tmp_path):
    out = torchrun("train", "--run-dir", str(tmp_path / "r"), *ARGS[:2], "--batch-size", "15", "--no-progress", check=False)
    assert out.returncode != 0
    assert "global batch 15 does not split evenly over 2 process(es)" in out.stderr + out.stdout


# A killed torchrun resuming to the weights of an uninterrupted one: tests/test_preemption.py
# (test_torchrun_max_restarts_resumes_a_killed_rank_...: one rank SIGKILLed, the group restarted and resumed).


# Registers an interpreter-exit hook on each rank, then runs the CLI as `ditforge` does.
ENTRY = """import atexit, os, sys
from pathlib import Path
from ditforge import cli
atexit.register(lambda: Path(sys.argv[1], "finalized-" + os.environ["RANK"]).touch())
sys.exit(cli.main(sys.argv[2:]))
"""


def test_a_rank_that_led_a_group_exits_past_the_interpreters_teardown(tmp_path):
    """A rank ends with `os._exit` once every rank has left the group (distributed.end_process):
    DDP and FSDP2 keep the gloo group alive past destroy_process_group; its teardown in Python's
    finalization aborted a rank after a good run. No exit hook runs; the status is the command's."""
    (tmp_path / "entry.py").write_text(ENTRY)
    base = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(tmp_path / "entry.py"),
            str(tmp_path)]
    env = cpu_env(OMP_NUM_THREADS="1")
    steps = [a if a != "6" else "1" for a in ARGS]
    good = subprocess.run([*base, "train", "--run-dir", str(tmp_path / "r"), "--parallel", "fsdp", *steps],
                          env=env, capture_output=True, text=True, timeout=600)
    assert good.returncode == 0, good.stderr[-3000:]
    assert "trained DiT-Ti/4 to step 1" in good.stdout  # rank 0's last lines reached the pipe
    bad = subprocess.run([*base, "train", "--run-dir", str(tmp_path / "q"), *steps[:2], "--batch-size", "15"],
                         env=env, capture_output=True, text=True, timeout=600)
    assert "does not split evenly" in bad.stderr, bad.stderr[-3000:]
    assert re.search(r"exitcode\s*:\s*2 ", bad.stderr), bad.stderr[-3000:]  # torchrun's summary: each rank's own status
    assert not list(tmp_path.glob("finalized-*"))
