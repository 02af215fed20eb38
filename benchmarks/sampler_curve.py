"""Quality against model evaluations (NFE) for each sampler, on a run trained on the built-in digits.

For each guidance scale and each (sampler, steps, spacing) point it draws the same samples that
`ditforge eval RUN --cfg C --sampler S --steps N --spacing SP --per-class 50` draws (same seed,
same noise for every sampler), and measures them twice:

- class accuracy and the MLP Frechet distance of `ditforge eval RUN` (evaluate.py's judge);
- FID with Inception-v3 (ADM definitions) against the 359 held-out digits, as
  benchmarks/fid_digits.sh does with `ditforge eval --samples S.npz --ref REF`.

Each point is appended to OUT/results.jsonl as it finishes (a rerun skips the points already
there); `--plot PNG` draws FID and accuracy against NFE from that file.

    .venv/bin/python benchmarks/sampler_curve.py runs/digits --out runs/sampler-curve --plot benchmarks/sampler_curve.png
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from ditforge.data.sources import load_data
from ditforge.evaluate import DigitJudge, feature_statistics, frechet_distance
from ditforge.metrics import InceptionFeatures, evaluate_batches, reference_from_path, save_reference
from ditforge.metrics.inception import load_inception
from ditforge.objectives import objective_sampler
from ditforge.sample import generate, load_for_sampling
from ditforge.sample_bulk import to_hwc_uint8

# (sampler, steps, spacing): the baselines, then the solvers at 10, 20 (and 50) evaluations
DEFAULT_POINTS = [
    "ddpm:250", "ddim:50", "ddim:20", "ddim:10",
    "dpm++2m:10:logsnr", "dpm++2m:20:logsnr", "dpm++2m:10:time", "dpm++2m:20:time",
    "unipc:10:logsnr", "unipc:20:logsnr", "unipc:10:time", "unipc:20:time",
]


def parse_point(text: str) -> tuple[str, int, str | None]:
    parts = text.split(":")
    return parts[0], int(parts[1]), (parts[2] if len(parts) > 2 else None)


def measure(args: argparse.Namespace) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.jsonl"
    done = set()
    if results.exists():
        done = {(r["cfg"], r["point"]) for r in map(json.loads, results.read_text().splitlines())}
    sm = load_for_sampling(args.run)
    train, heldout = load_data("digits", "train"), load_data("digits", "heldout")
    judge = DigitJudge(train)
    ref_mlp = feature_statistics(judge.features(heldout.images))
    inception = InceptionFeatures(load_inception(None, "cpu"), device="cpu", batch_size=32)
    ref_file = out / "ref_stats.npz"
    if not ref_file.exists():
        save_reference(ref_file, reference_from_path(inception, _heldout_npz(out, heldout.images)))
    ref = reference_from_path(inception, ref_file)
    classes = list(range(train.num_classes))
    for cfg in args.cfg:
        for point in args.points:
            if (cfg, point) in done:
                continue
            sampler, steps, spacing = parse_point(point)
            load = os.getloadavg()[0]
            t0 = time.perf_counter()
            x, y = generate(sm.model, classes, args.per_class, cfg, steps, sampler, args.seed, sm.objective,
                            spacing=spacing or "logsnr")
            seconds = time.perf_counter() - t0
            adm = evaluate_batches(inception, to_hwc_uint8(x), ref)
            row = dict(
                cfg=cfg, point=point, sampler=sampler, steps=steps, spacing=spacing,
                # model evaluations a sample (each on the doubled batch when cfg != 1)
                nfe=objective_sampler(sm.objective, sampler, steps, spacing or "logsnr").nfe,
                class_accuracy=float((judge.predict(x) == y.numpy()).mean()),
                frechet_mlp=frechet_distance(*feature_statistics(judge.features(x)), *ref_mlp),
                fid=adm["fid"], sfid=adm["sfid"], precision=adm["precision"], recall=adm["recall"],
                sampling_seconds=round(seconds, 1), load_average=load, checkpoint=sm.source, step=sm.step,
                objective=sm.objective.name,
            )
            print(json.dumps(row), flush=True)
            with results.open("a") as f:
                f.write(json.dumps(row) + "\n")


def _heldout_npz(out: Path, images: torch.Tensor) -> Path:
    path = out / "heldout.npz"
    np.savez(path, arr_0=to_hwc_uint8(images))
    return path


def plot(results: Path, png: Path) -> None:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(l) for l in results.read_text().splitlines()]
    cfgs = sorted({r["cfg"] for r in rows})
    fig, axes = plt.subplots(2, len(cfgs), figsize=(5.5 * len(cfgs), 7.5), squeeze=False)
    styles = {"ddim": ("tab:gray", "o"), "dpm++2m": ("tab:blue", "s"), "unipc": ("tab:red", "^"),
              "euler": ("tab:olive", "v"), "heun": ("tab:green", "D"), "ab2": ("tab:purple", "P"), "sde": ("tab:brown", "x")}
    for j, cfg in enumerate(cfgs):
        mine = [r for r in rows if r["cfg"] == cfg]
        for i, metric in enumerate(("fid", "class_accuracy")):
            ax = axes[i][j]
            for r in mine:
                if r["sampler"] == "ddpm" or (r["sampler"] == "sde" and r["steps"] >= 100):
                    ax.axhline(r[metric], color="k", ls="--", lw=1, label=f"{r['sampler'].upper()}, {r['steps']} steps")
            for sampler, (color, marker) in styles.items():
                for spacing, ls in ((None, "-"), ("logsnr", "-"), ("time", ":")):
                    pts = sorted((r["nfe"], r[metric]) for r in mine if r["sampler"] == sampler and r["spacing"] == spacing)
                    if pts:
                        label = sampler.upper() + (f" ({spacing})" if spacing else "")
                        ax.plot(*zip(*pts), color=color, marker=marker, ls=ls, label=label)
            ax.set_xscale("log")
            ax.set_xticks(sorted({r["nfe"] for r in mine}))
            ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            ax.set_xlabel("model evaluations per sample (NFE)")
            ax.set_ylabel({"fid": "FID (Inception, vs 359 held-out)", "class_accuracy": "class accuracy (SVC)"}[metric])
            objective = mine[0].get("objective", "diffusion")
            ax.set_title(f"digits, DiT-Ti/2 ({objective}) at step {mine[0]['step']}, cfg {cfg:g}")
            ax.grid(alpha=0.3)
        axes[0][j].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=90)


def table(results: Path) -> str:
    """The results as a markdown table, one row per (cfg, point), in the order measured."""
    rows = [json.loads(l) for l in results.read_text().splitlines()]
    lines = ["| cfg | sampler | spacing | NFE | FID | class accuracy | MLP Frechet | precision | recall | sampling s | load |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["cfg"], r["sampler"], r["spacing"] or "", r["nfe"])):
        lines.append(
            f"| {r['cfg']:g} | {r['sampler']} | {r['spacing'] or '-'} | {r['nfe']} | {r['fid']:.2f} | {r['class_accuracy']:.3f} | "
            f"{r['frechet_mlp']:.2f} | {r['precision']:.3f} | {r['recall']:.3f} | {r['sampling_seconds']:.0f} | {r['load_average']:.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="run folder trained on the built-in digits")
    p.add_argument("--out", default="runs/sampler-curve", help="folder of results.jsonl and the held-out .npz")
    p.add_argument("--cfg", type=float, nargs="+", default=[1.0, 1.5])
    p.add_argument("--points", nargs="+", default=DEFAULT_POINTS, help="sampler:steps[:spacing]")
    p.add_argument("--per-class", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plot", help="also draw the curves into this PNG")
    p.add_argument("--report-only", action="store_true", help="measure nothing: print the table (and --plot) of OUT/results.jsonl")
    args = p.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    if not args.report_only:
        measure(args)
    print(table(Path(args.out) / "results.jsonl"))
    if args.plot:
        plot(Path(args.out) / "results.jsonl", Path(args.plot))


if __name__ == "__main__":
    main()
