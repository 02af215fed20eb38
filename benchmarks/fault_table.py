"""Faults injected at random points into `train`, `extract` and bulk `sample --out X.npz`, each
followed by the same command: does every run end bit-identical to an uninterrupted one, or stop
with a one-line error naming the damaged file? (issue 28's table; README "Long runs on a cluster")

    python benchmarks/fault_table.py [--seed 0] [--out benchmarks/fault_table.jsonl] [--only train,extract,bulk]
    (--only train-disk,bulk-disk: the full disks of train and bulk sample alone)

Each fault is one row: what was done, when (the step or shard it hit), what the commands said
and returned, and the verdict:

- `identical`: the command (rerun until it exits 0, at most three times) ends with the outputs of
  an uninterrupted run of the same command, bit for bit (every tensor of the final checkpoint's
  model, EMA and optimizer; every shard file of the store; the .npz's arrays);
- `named`: a damaged file was refused with one line that names it (`verify`, or the command
  that read it), and the repair (`extract --repair`, the rerun) then ends `identical`, or, where
  nothing undamaged is left to continue from (the only checkpoint), the command stops with that
  line every time (exit 2);
- `SILENT CORRUPTION`: a run ended with status 0 and other outputs, or damage went unnamed;
- `LOST CHECKPOINT`: a checkpoint that was good before the fault is missing or bad after.

It also records, for a preemption signal, the steps between the last step logged before the
signal and the step of the checkpoint written on it (`lost_steps`: at most one is the goal; 0 or
less means nothing was lost). The full-disk faults run in a size-limited tmpfs (`mount -t tmpfs`,
root only; skipped otherwise, and said so). Uses the tiniest configuration (DiT-Ti/4 on the
digits, batch 8, 16 steps, a checkpoint every 4) so the table takes minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from safetensors.torch import load_file

PY = sys.executable
ENV = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")  # logs as they happen
STEPS, EVERY = 16, 4
TRAIN = ["--data", "digits", "--model", "DiT-Ti/4", "--batch-size", "8", "--steps", str(STEPS), "--ckpt-every", str(EVERY),
         "--keep-last", "0", "--log-every", "1", "--no-progress", "--sample-steps", "1", "--seed", "3"]
EXTRACT = ["--data", "digits", "--vae", "identity", "--image-size", "8", "--batch-size", "16", "--shard-size", "128",
           "--no-progress"]
BULK = ["--num-samples", "96", "--batch-size", "8", "--shard-size", "8", "--steps", "2", "--seed", "1"]
EXIT_PREEMPTED = 75
STEP_LINE = re.compile(r"\bstep (\d+)/\d+ \|")  # "12:00:01 step 5/16 | loss ..."


def ditforge(*args: str) -> list[str]:
    return [PY, "-m", "ditforge", *args]


def torchrun(*args: str, restarts: int = 0) -> list[str]:
    return [PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "--max-restarts", str(restarts),
            "-m", "ditforge", *args]


def run(cmd: list[str], timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=timeout)


def start(cmd: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=ENV, start_new_session=True)


def wait_until(proc: subprocess.Popen, ready, timeout: float = 600) -> bool:
    """Poll `ready()` until it holds (True) or the process ends first (False)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if ready():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.01)
    raise TimeoutError("the command neither got there nor ended")


def logged_step(log: Path) -> int:
    """The last `step k/N` a train log shows (0 before the first)."""
    return max((int(m) for m in STEP_LINE.findall(log.read_text(errors="replace"))), default=0)


def rerun(cmd: list[str], times: int = 3) -> tuple[int, list[str]]:
    """Run `cmd` until it exits 0 (at most `times`); its statuses and the last lines of each."""
    said = []
    for _ in range(times):
        proc = run(cmd)
        said.append(f"exit {proc.returncode}: {(proc.stderr.strip().splitlines() or proc.stdout.strip().splitlines() or [''])[-1][:300]}")
        if proc.returncode == 0:
            return 0, said
    return proc.returncode, said


def one_line_naming(proc: subprocess.CompletedProcess, name: str) -> bool:
    """A refusal: non-zero, and the one line of ditforge's message names `name`."""
    lines = [line for line in proc.stderr.strip().splitlines() if "ditforge" in line and "error" in line]
    return proc.returncode != 0 and len(lines) == 1 and name in lines[0]


def damage(path: Path, how: str, rng: random.Random) -> str:
    data = bytearray(path.read_bytes())
    if how == "truncate":
        cut = rng.randrange(1, len(data))
        path.write_bytes(bytes(data[:cut]))
        return f"truncated {path.name} to {cut} of {len(data)} bytes"
    at = rng.randrange(len(data) // 4, len(data))  # past a safetensors header, into the tensors
    data[at] ^= 1 << rng.randrange(8)
    path.write_bytes(bytes(data))
    return f"flipped a bit of byte {at} of {path.name}"


# -- what "identical" means for each command --------------------------------------------------------


def final_weights(run_dir: Path) -> dict:
    folder = run_dir / "checkpoints" / f"step-{STEPS:07d}"
    return {name: load_file(str(folder / f"{name}.safetensors")) for name in ("model", "ema", "optimizer")}


def same_weights(a: dict, b: dict) -> bool:
    return all(a[n].keys() == b[n].keys() and all(bool((a[n][k] == b[n][k]).all()) for k in a[n]) for n in a)


def store_bytes(store: Path) -> dict[str, bytes]:
    return {str(p.relative_to(store)): p.read_bytes() for p in sorted((store / "shards").rglob("*.safetensors"))}


def npz_arrays(path: Path) -> dict:
    with np.load(path) as f:
        return {k: f[k].copy() for k in f.files}


def same_arrays(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def good_checkpoints(run_dir: Path) -> set[str]:
    ckpts = sorted((run_dir / "checkpoints").glob("step-*")) if (run_dir / "checkpoints").is_dir() else []
    return {c.name for c in ckpts if run(ditforge("verify", str(c))).returncode == 0}


# -- the faults ----------------------------------------------------------------------------------------


class Table:
    def __init__(self, root: Path, rng: random.Random, out: Path):
        self.root, self.rng, self.out, self.rows = root, rng, out, []
        self.count = 0

    def folder(self, name: str) -> Path:
        self.count += 1
        path = self.root / f"{self.count:02d}-{name}"
        path.mkdir()
        return path

    def add(self, row: dict) -> None:
        self.rows.append(row)
        with self.out.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"{len(self.rows):2d} {row['command']:7s} {row['fault']:34s} {row['verdict']:18s} {row.get('note', '')}", flush=True)


def train_signal(table: Table, ref: dict, sig: signal.Signals, distributed: bool = False, ref2: dict | None = None) -> None:
    where = table.folder(f"train-{sig.name}")
    cmd = (torchrun if distributed else ditforge)("train", "--run-dir", str(where / "run"), *TRAIN)
    log = where / "log.txt"
    target = table.rng.randrange(2, STEPS - 1)
    proc = start(cmd, log)
    reached = wait_until(proc, lambda: logged_step(log) >= target)
    time.sleep(table.rng.uniform(0, 0.3))
    before = logged_step(log)
    victim = "whole run"
    if not reached:  # it ended before the step drawn: no fault was injected, say so
        table.add(dict(command="train", fault=f"{sig.name} (missed: the run ended first)", verdict="missed", note=""))
        return
    if reached:
        if distributed:
            pid = workers(proc.pid)[table.rng.randrange(2)] if sig != signal.SIGKILL else workers(proc.pid)[0]
            victim = f"rank pid {pid}"
            os.kill(pid, sig)
        elif sig == signal.SIGKILL:
            os.killpg(proc.pid, sig)
        else:
            os.kill(proc.pid, sig)
    status = proc.wait()
    saved = sorted(int(p.name.split("-")[1]) for p in (where / "run" / "checkpoints").glob("step-*") if (p / "state.json").is_file())
    lost = before - max(saved, default=0) if sig != signal.SIGKILL else None
    good_before = good_checkpoints(where / "run")
    code, said = rerun(cmd)
    same = code == 0 and same_weights(final_weights(where / "run"), ref2 if distributed else ref)
    kept = good_before <= good_checkpoints(where / "run")
    verdict = "identical" if same and kept else ("LOST CHECKPOINT" if not kept else "SILENT CORRUPTION" if code == 0 else "failed")
    table.add(dict(command="train", fault=f"{sig.name} at step {before}" + (" (torchrun, one rank)" if distributed else ""),
                   status=status, lost_steps=lost, checkpoints_at_stop=saved[-1:] if saved else [], victim=victim,
                   rerun=said, verdict=verdict, note=f"exit {status}" + (f", lost {lost} step(s)" if lost is not None else "")))


def workers(agent: int) -> list[int]:
    """The PIDs of torchrun's worker processes (children of its agent, ditforge's)."""
    kids = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if ppid == agent and b"ditforge" in cmdline:
            kids.append(int(pid))
    return sorted(kids)


def train_damage(table: Table, ref: dict, how: str) -> None:
    """A run killed at a random step, then its latest checkpoint damaged: the rerun must name it and
    resume from the one before."""
    where = table.folder(f"train-{how}")
    cmd = ditforge("train", "--run-dir", str(where / "run"), *TRAIN)
    log = where / "log.txt"
    target = table.rng.randrange(2 * EVERY, STEPS)
    proc = start(cmd, log)
    if not wait_until(proc, lambda: logged_step(log) >= target):
        table.add(dict(command="train", fault=f"{how} (missed: the run ended first)", verdict="missed", note=""))
        return
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    ckpts = sorted(p for p in (where / "run" / "checkpoints").glob("step-*") if (p / "state.json").is_file())
    latest = ckpts[-1]
    victim = latest / table.rng.choice(["model.safetensors", "ema.safetensors", "optimizer.safetensors"])
    what = damage(victim, how, table.rng)
    good_before = good_checkpoints(where / "run") - {latest.name}
    first = run(cmd)
    named = latest.name in (first.stdout + first.stderr) and ("damaged" in (first.stdout + first.stderr).lower()
                                                              or victim.name in first.stdout + first.stderr)
    code, said = (first.returncode, [f"exit {first.returncode}"]) if first.returncode == 0 else rerun(cmd)
    same = code == 0 and same_weights(final_weights(where / "run"), ref)
    kept = good_before <= good_checkpoints(where / "run")
    # the only checkpoint damaged: the run stops in one line naming the file (no older one to resume from)
    stopped_naming = code == 2 and victim.name in said[-1] and said[-1].count("error:") == 1
    verdict = ("named" if named else "identical") if same and kept else "named" if stopped_naming and kept else (
        "LOST CHECKPOINT" if not kept else "SILENT CORRUPTION" if code == 0 else "failed")
    table.add(dict(command="train", fault=f"{how} of the latest checkpoint ({latest.name})", damage=what,
                   said=(first.stdout + first.stderr).strip().splitlines()[:3], rerun=said, verdict=verdict,
                   note=what))


def extract_cmd(store: Path, *extra: str) -> list[str]:
    return ditforge("extract", "--out", str(store), *EXTRACT, *extra)


def extract_signal(table: Table, ref: dict, sig: signal.Signals) -> None:
    where = table.folder(f"extract-{sig.name}")
    store = where / "store"
    cmd = extract_cmd(store)
    proc = start(cmd, where / "log.txt")
    shards = table.rng.randrange(1, 5)
    if not wait_until(proc, lambda: len(list((store / "shards").rglob("*.safetensors"))) >= shards
                      if (store / "shards").is_dir() else False):
        table.add(dict(command="extract", fault=f"{sig.name} (missed: it ended first)", verdict="missed", note=""))
        return
    (os.killpg if sig == signal.SIGKILL else os.kill)(proc.pid, sig)
    status = proc.wait()
    code, said = rerun(cmd)
    same = code == 0 and store_bytes(store) == ref
    table.add(dict(command="extract", fault=f"{sig.name} after {shards} shard(s)", status=status, rerun=said,
                   verdict="identical" if same else ("SILENT CORRUPTION" if code == 0 else "failed"), note=f"exit {status}"))


def extract_damage(table: Table, ref: dict, reference_store: Path, how: str) -> None:
    where = table.folder(f"extract-{how}")
    store = where / "store"
    shutil.copytree(reference_store, store)
    victim = table.rng.choice(sorted((store / "shards").rglob("*.safetensors")))
    what = damage(victim, how, table.rng)
    check = run(ditforge("verify", str(store)))
    named = check.returncode == 1 and victim.name in check.stdout + check.stderr
    train = run(ditforge("train", "--data", str(store), "--run-dir", str(where / "run"), "--model", "DiT-Ti/4",
                         "--batch-size", "8", "--steps", "2", "--no-progress", "--sample-steps", "1"))
    refused = one_line_naming(train, victim.name)
    code, said = rerun(extract_cmd(store, "--repair"))
    same = code == 0 and store_bytes(store) == ref
    verdict = "named" if named and refused and same else ("SILENT CORRUPTION" if not (named or refused) else "failed")
    table.add(dict(command="extract", fault=f"{how} of a finished store's shard", damage=what, verify=check.stdout[-300:],
                   train=train.stderr.strip()[-300:], train_refused=refused, repair=said, verdict=verdict, note=what))


def bulk_cmd(run_dir: Path, out: Path) -> list[str]:
    return ditforge("sample", str(run_dir), "--out", str(out), *BULK)


def bulk_signal(table: Table, ref: dict, trained: Path, sig: signal.Signals) -> None:
    where = table.folder(f"bulk-{sig.name}")
    out = where / "s.npz"
    cmd = bulk_cmd(trained, out)
    proc = start(cmd, where / "log.txt")
    parts = out.with_name(out.name + ".parts")
    want = table.rng.randrange(1, 6)
    if not wait_until(proc, lambda: len(list(parts.glob("shard-*.npz"))) >= want if parts.is_dir() else False):
        table.add(dict(command="bulk", fault=f"{sig.name} (missed: it ended first)", verdict="missed", note=""))
        return
    (os.killpg if sig == signal.SIGKILL else os.kill)(proc.pid, sig)
    status = proc.wait()
    code, said = rerun(cmd)
    same = code == 0 and same_arrays(npz_arrays(out), ref)
    table.add(dict(command="bulk", fault=f"{sig.name} after {want} part(s)", status=status, rerun=said,
                   verdict="identical" if same else ("SILENT CORRUPTION" if code == 0 else "failed"), note=f"exit {status}"))


def bulk_damage(table: Table, reference: Path, how: str) -> None:
    where = table.folder(f"bulk-{how}")
    out = where / "s.npz"
    shutil.copy(reference, out)
    what = damage(out, how, table.rng)
    check = run(ditforge("verify", str(out)))
    named = check.returncode == 1 and out.name in check.stdout + check.stderr
    table.add(dict(command="bulk", fault=f"{how} of a finished .npz", damage=what, verify=check.stdout[-300:],
                   verdict="named" if named else "SILENT CORRUPTION", note=what))


# -- a full disk ---------------------------------------------------------------------------------------


class SmallDisk:
    """A tmpfs of `size` bytes at a new folder (root only), grown on demand."""

    def __init__(self, size: int):
        self.path = Path(tempfile.mkdtemp(prefix="ditforge-full-"))
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(self.path)], capture_output=True, text=True)
        self.ok = proc.returncode == 0
        self.why = proc.stderr.strip()

    def grow(self, size: int) -> None:
        subprocess.run(["mount", "-o", f"remount,size={size}", str(self.path)], check=True)

    def close(self) -> None:
        if self.ok:
            subprocess.run(["umount", str(self.path)], check=False)
        shutil.rmtree(self.path, ignore_errors=True)


def leftovers(folder: Path) -> list[str]:
    return [str(p.relative_to(folder)) for p in folder.rglob("*") if ".tmp" in p.name or p.name.startswith(".tmp")]


def full_disk(table: Table, command: str, size: int, cmd_of, same_of) -> None:
    disk = SmallDisk(size)
    try:
        if not disk.ok:
            table.add(dict(command=command, fault="full disk", verdict="skipped", note=f"cannot mount a tmpfs: {disk.why}"))
            return
        cmd = cmd_of(disk.path)
        first = run(cmd)
        one_line = (first.returncode == 2 and "Traceback" not in first.stderr and "Exception ignored" not in first.stderr
                    and len([l for l in first.stderr.strip().splitlines() if "error:" in l]) == 1)
        said = (first.stderr.strip().splitlines() or [""])[-1][:300]
        temp = leftovers(disk.path)
        disk.grow(2**30)  # room for every checkpoint of the run
        code, again = rerun(cmd)
        same = code == 0 and same_of(disk.path)
        verdict = "identical" if same and one_line and not temp else ("SILENT CORRUPTION" if code == 0 and not same else "failed")
        table.add(dict(command=command, fault=f"full disk ({size // 1024} KiB)", first=said, leftovers=temp, rerun=again,
                       verdict=verdict, note=said[:120]))
    finally:
        disk.close()


# -- the table -----------------------------------------------------------------------------------------


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/fault_table.jsonl")
    p.add_argument("--only", default="train,extract,bulk")
    args = p.parse_args()
    rng = random.Random(args.seed)
    out = Path(args.out)
    out.unlink(missing_ok=True)
    only = set(args.only.split(","))
    root = Path(tempfile.mkdtemp(prefix="ditforge-faults-"))
    table = Table(root, rng, out)
    t0 = time.time()
    print(f"faults under {root}; rows to {out}", flush=True)

    ref_run = root / "reference-run"
    subprocess.run(ditforge("train", "--run-dir", str(ref_run), *TRAIN), check=True, env=ENV, capture_output=True)
    ref = final_weights(ref_run)
    if "train" in only:
        ref2_run = root / "reference-torchrun"
        subprocess.run(torchrun("train", "--run-dir", str(ref2_run), *TRAIN), check=True, env=ENV, capture_output=True)
        ref2 = final_weights(ref2_run)
        for sig in (signal.SIGKILL,) * 4 + (signal.SIGTERM,) * 3 + (signal.SIGUSR1,) * 3:
            train_signal(table, ref, sig)
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            train_signal(table, ref, sig, distributed=True, ref2=ref2)
        for _ in range(2):  # a killed rank, torchrun restarting the group
            where = table.folder("train-killed-rank")
            cmd = torchrun("train", "--run-dir", str(where / "run"), *TRAIN, restarts=2)
            log = where / "log.txt"
            target = rng.randrange(2, STEPS - 1)
            proc = start(cmd, log)
            if not wait_until(proc, lambda: logged_step(log) >= target):
                table.add(dict(command="train", fault="SIGKILL of one rank (missed: the run ended first)", verdict="missed"))
                continue
            victim = rng.choice(workers(proc.pid))
            at = logged_step(log)
            os.kill(victim, signal.SIGKILL)
            status = proc.wait()
            code, said = (0, ["restarted by torchrun"]) if status == 0 else rerun(cmd)
            same = code == 0 and same_weights(final_weights(where / "run"), ref2)
            table.add(dict(command="train", fault=f"SIGKILL of one rank at step {at} (torchrun --max-restarts 2)",
                           status=status, rerun=said, verdict="identical" if same else ("SILENT CORRUPTION" if code == 0 else "failed"),
                           note=f"torchrun exit {status}"))
        for how in ("truncate", "truncate", "flip", "flip"):
            train_damage(table, ref, how)
    if "train" in only or "train-disk" in only:  # room for one checkpoint (64 MB), not two
        full_disk(table, "train", 100 * 2**20, lambda d: ditforge("train", "--run-dir", str(d / "run"), *TRAIN),
                  lambda d: same_weights(final_weights(d / "run"), ref))
    if "extract" in only:
        ref_store = root / "reference-store"
        subprocess.run(extract_cmd(ref_store), check=True, env=ENV, capture_output=True)
        store_ref = store_bytes(ref_store)
        for sig in (signal.SIGKILL, signal.SIGKILL, signal.SIGTERM, signal.SIGUSR1):
            extract_signal(table, store_ref, sig)
        for how in ("truncate", "truncate", "flip", "flip"):
            extract_damage(table, store_ref, ref_store, how)
        full_disk(table, "extract", 200 * 1024, lambda d: extract_cmd(d / "store"), lambda d: store_bytes(d / "store") == store_ref)
    if "bulk" in only or "bulk-disk" in only:
        ref_npz = root / "reference.npz"
        subprocess.run(bulk_cmd(ref_run, ref_npz), check=True, env=ENV, capture_output=True)
        arrays = npz_arrays(ref_npz)
        if "bulk" in only:
            for sig in (signal.SIGKILL, signal.SIGKILL, signal.SIGTERM, signal.SIGUSR1):
                bulk_signal(table, arrays, ref_run, sig)
            for how in ("truncate", "flip"):
                bulk_damage(table, ref_npz, how)
        full_disk(table, "bulk", 60 * 1024, lambda d: bulk_cmd(ref_run, d / "s.npz"), lambda d: same_arrays(npz_arrays(d / "s.npz"), arrays))

    verdicts = [r["verdict"] for r in table.rows]
    lost = [r["lost_steps"] for r in table.rows if r.get("lost_steps") is not None]
    summary = dict(faults=len(verdicts), identical=verdicts.count("identical"), named=verdicts.count("named"),
                   silent=verdicts.count("SILENT CORRUPTION"), lost_checkpoints=verdicts.count("LOST CHECKPOINT"),
                   failed=verdicts.count("failed"), skipped=verdicts.count("skipped"), missed=verdicts.count("missed"),
                   most_steps_lost_to_a_signal=max(lost, default=None), seconds=round(time.time() - t0))
    print(json.dumps(summary), flush=True)
    with out.open("a") as f:
        f.write(json.dumps(dict(summary=summary)) + "\n")
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
