"""The no-flag run on a folder, timed and judged (issue 30, README "Train on your own images").

    python benchmarks/no_flag_table.py FOLDER [FOLDER ...] --runs runs/no-flag --out benchmarks/no_flag_table.jsonl
                                       [--precision fp32]

For each folder, as a new user would: `ditforge train --data FOLDER --run-dir RUN` with no other
flag, then `ditforge eval RUN --no-fid --json` (the class accuracy and its per-class report,
timed, with the judge trained fresh), then `ditforge eval RUN --json` (adds FID, sFID, precision
and recall against the held-out split and the FID of as many real training images, the floor;
the judge and the held-out statistics come from the cache, so its time is the Inception cost).
`--precision fp32` adds that one flag to `train`: on a CPU with native bf16 it emulates one
without (the issue asks for both). One JSON line per folder with the times, the choices `train` printed and both reports. Run it
alone: the times are the point (the machine has 2 cores; `OMP_NUM_THREADS` is left as set).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path


def _timed(cmd: list[str], log: Path) -> float:
    t0 = time.perf_counter()
    with open(log, "w") as out:
        status = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT).returncode
    if status != 0:
        raise SystemExit(f"{' '.join(cmd)} exited {status}; its output is in {log}")
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folders", nargs="+", type=Path)
    p.add_argument("--runs", type=Path, default=Path("runs/no-flag"))
    p.add_argument("--out", type=Path, default=Path("benchmarks/no_flag_table.jsonl"))
    p.add_argument("--no-fid-only", action="store_true", help="skip the second eval (FID)")
    p.add_argument("--precision", choices=("fp32",), help="give train this flag (a CPU without native bf16, emulated)")
    args = p.parse_args()
    ditforge = [sys.executable, "-m", "ditforge"]
    flags = f" --precision {args.precision}" if args.precision else ""
    for folder in args.folders:
        run = args.runs / folder.name
        if run.exists():
            raise SystemExit(f"{run} exists: the table wants a new run (remove it or pass another --runs)")
        run.mkdir(parents=True)
        row: dict = {"data": str(folder), "run": str(run), "machine": platform.processor() or platform.machine(),
                     "date": time.strftime("%Y-%m-%d %H:%M"),
                     "command": f"ditforge train --data {folder} --run-dir {run}" + flags}
        train = [*ditforge, "train", "--data", str(folder), "--run-dir", str(run), *flags.split()]
        row["train_s"] = round(_timed(train, run / "train.log"), 1)
        row["train_choices"] = [l.strip() for l in (run / "train.log").read_text().splitlines() if l.startswith("chose ")]
        row["eval_no_fid_s"] = round(_timed([*ditforge, "eval", str(run), "--no-fid", "--json", str(run / "eval_no_fid.json")], run / "eval_no_fid.log"), 1)
        row["eval_no_fid"] = json.loads((run / "eval_no_fid.json").read_text())
        if not args.no_fid_only:
            row["eval_s"] = round(_timed([*ditforge, "eval", str(run), "--json", str(run / "eval.json")], run / "eval.log"), 1)
            row["eval"] = json.loads((run / "eval.json").read_text())
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")
        report = row.get("eval", row["eval_no_fid"])
        print(f"{folder.name}: train {row['train_s']:.0f} s, eval --no-fid {row['eval_no_fid_s']:.0f} s; "
              f"{json.dumps({k: report.get(k) for k in ('class_accuracy', 'heldout_accuracy', 'accuracy_ratio', 'fid', 'fid_real')})}")


if __name__ == "__main__":
    main()
