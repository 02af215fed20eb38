"""Peak host memory of each rank when a torchrun run resumes (CPU, gloo, 2 processes).

Trains one step in one process to write a checkpoint, then resumes it under
`torchrun --nproc_per_node 2 ... --parallel fsdp` and samples every worker's peak resident set
(VmHWM in /proc) until it ends. Before rank 0 broadcast the checkpoint, every rank read all of
it (model + EMA + AdamW moments: 16 bytes a parameter); now only rank 0 does.

    .venv/bin/python benchmarks/resume_memory.py --model DiT-B/2                      # this code
    .venv/bin/python benchmarks/resume_memory.py --model DiT-B/2 --src OLD_CHECKOUT/src  # another version

DiT-XL/2 (675 M parameters, a 10.8 GB checkpoint) does not fit twice in this machine's 24 GB,
which is the point of the change; the figures recorded in benchmarks/README.md are DiT-B/2's.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def children(pid: int) -> set[int]:
    """All descendants of `pid`, from /proc."""
    parent = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                parent[int(entry.name)] = int(fields[1])
            except (OSError, IndexError, ValueError):
                continue
    found, frontier = set(), {pid}
    while frontier:
        frontier = {p for p, pp in parent.items() if pp in frontier} - found
        found |= frontier
    return found


def peak_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="DiT-B/2")
    p.add_argument("--src", default=str(Path(__file__).resolve().parents[1] / "src"), help="the ditforge source to measure")
    args = p.parse_args()
    env = dict(os.environ, PYTHONPATH=args.src, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    run = Path(tempfile.mkdtemp()) / "run"
    common = ["--model", args.model, "--batch-size", "4", "--ckpt-every", "1", "--log-every", "1", "--no-progress",
              "--run-dir", str(run)]
    subprocess.run([sys.executable, "-m", "ditforge", "train", "--steps", "1", *common], env=env, check=True, capture_output=True)
    ckpt_bytes = sum(f.stat().st_size for f in (run / "checkpoints").rglob("*.safetensors"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "ditforge", "train",
           "--steps", "2", "--parallel", "fsdp", *common]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peaks: dict[int, int] = {}
    while proc.poll() is None:
        for pid in children(proc.pid):
            kib = peak_kib(pid)
            if kib is not None:
                peaks[pid] = max(peaks.get(pid, 0), kib)
        time.sleep(0.05)
    log = proc.stdout.read()
    if proc.returncode != 0 or "resumed from" not in log:
        sys.exit(f"the resume failed:\n{log[-3000:]}")
    workers = sorted(peaks.values(), reverse=True)[:2]  # the two ranks (the launcher is small)
    print(f"$ python {' '.join(sys.argv)}")
    print(f"{args.model}: checkpoint {ckpt_bytes / 2**30:.2f} GiB; peak resident memory of the two ranks while resuming "
          f"under FSDP: {', '.join(f'{k / 2**20:.2f} GiB' for k in workers)}")
    shutil.rmtree(run.parent, ignore_errors=True)


if __name__ == "__main__":
    main()
