"""Quality against model evaluations (NFE) for each sampler, on a run trained on a built-in set.

For each guidance scale and each (sampler, steps, spacing) point it draws the same samples that
`ditforge eval RUN --cfg C --sampler S --steps N --spacing SP --per-class 50` draws (same seed,
same noise for every sampler), and measures them twice:

- class accuracy and the MLP Frechet distance of `ditforge eval RUN` (evaluate.py's judge);
- FID with Inception-v3 (ADM definitions) against the set's held-out split (359 digits, 1,000
  MNIST digits), as
  benchmarks/fid_digits.sh does with `ditforge eval --samples S.npz --ref REF`.

Each point is appended to OUT/results.jsonl as it finishes (a rerun skips the points already
there); `--plot PNG` draws FID and accuracy against NFE from that file.

    .venv/bin/python benchmarks/sampler_curve.py runs/digits --out runs/sampler-curve --plot benchmarks/sampler_curve.png
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from curves import append_row, heldout_reference, markdown_table, plot_by_cfg, read_rows, run_curve

from ditforge.data.sources import load_data
from ditforge.evaluation.builtin import DigitJudge
from ditforge.metrics.statistics import feature_statistics, frechet_distance
from ditforge.metrics import InceptionFeatures, evaluate_batches
from ditforge.metrics.inception import load_inception
from ditforge.objectives import objective_sampler
from ditforge.sampling.generate import generate
from ditforge.sampling.load import load_for_sampling
from ditforge.sampling.bulk import to_hwc_uint8
from ditforge.train.checkpoint import read_state

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
    interval = tuple(args.cfg_interval) if args.cfg_interval else None
    done = {(r["cfg"], r["point"], tuple(r["cfg_interval"]) if r.get("cfg_interval") else None) for r in read_rows(results)}
    sm = load_for_sampling(args.run)
    state = read_state(sm.source, ("config", "model_args"))
    data, model_name = state["config"]["data"], state["model_args"]["name"]
    train, heldout = load_data(data, "train"), load_data(data, "heldout")
    judge = DigitJudge(train)
    ref_mlp = feature_statistics(judge.features(heldout.images))
    inception = InceptionFeatures(load_inception(None, "cpu"), device="cpu", batch_size=32)
    ref = heldout_reference(inception, heldout.images, out / "ref_stats.npz")
    classes = list(range(train.num_classes))
    for cfg in args.cfg:
        for point in args.points:
            if (cfg, point, interval) in done:
                continue
            sampler, steps, spacing = parse_point(point)
            load = os.getloadavg()[0]
            t0 = time.perf_counter()
            x, y = generate(sm.model, classes, args.per_class, cfg, steps, sampler, args.seed, sm.objective,
                            spacing=spacing or "logsnr", cfg_interval=interval, precision=args.precision)
            seconds = time.perf_counter() - t0
            adm = evaluate_batches(inception, to_hwc_uint8(x), ref)
            row = dict(
                cfg=cfg, point=point, sampler=sampler, steps=steps, spacing=spacing,
                cfg_interval=list(interval) if interval else None,
                # model evaluations a sample (each on the doubled batch when cfg != 1)
                nfe=objective_sampler(sm.objective, sampler, steps, spacing or "logsnr").nfe,
                class_accuracy=float((judge.predict(x) == y.numpy()).mean()),
                frechet_mlp=frechet_distance(*feature_statistics(judge.features(x)), *ref_mlp),
                fid=adm["fid"], sfid=adm["sfid"], precision=adm["precision"], recall=adm["recall"],
                sampling_seconds=round(seconds, 1), load_average=load, checkpoint=sm.source, step=sm.step,
                objective=sm.objective.name, data=data, model=model_name, sampling_precision=args.precision, seed=args.seed,
            )
            append_row(results, row)


def _interval(row: dict) -> str | None:
    """The row's guidance interval as "[LO, HI]" (None: guided at every step)."""
    lo_hi = row.get("cfg_interval")
    return f"[{lo_hi[0]:g}, {lo_hi[1]:g}]" if lo_hi else None


def plot(results: Path, png: Path) -> None:
    import matplotlib.ticker

    styles = {"ddim": ("tab:gray", "o"), "dpm++2m": ("tab:blue", "s"), "unipc": ("tab:red", "^"),
              "dpm++2m-sde": ("tab:cyan", "*"), "euler": ("tab:olive", "v"), "heun": ("tab:green", "D"),
              "ab2": ("tab:purple", "P"), "sde": ("tab:brown", "x")}

    def draw(ax, mine: list[dict], metric: str) -> None:
        for r in mine:
            if r["sampler"] == "ddpm" or (r["sampler"] == "sde" and r["steps"] >= 100):  # the many-step references
                ax.axhline(r[metric], color="k", ls="--", lw=1, label=f"{r['sampler'].upper()}, {r['steps']} steps")
        for sampler, (color, marker) in styles.items():
            for spacing, ls in ((None, "-"), ("logsnr", "-"), ("time", ":")):
                for interval in sorted({_interval(r) for r in mine}, key=str):
                    pts = sorted((r["nfe"], r[metric]) for r in mine if r["sampler"] == sampler and r["spacing"] == spacing
                                 and _interval(r) == interval and not (sampler == "sde" and r["steps"] >= 100))
                    if pts:
                        label = sampler.upper() + (f" ({spacing})" if spacing else "") + (f", guided {interval}" if interval else "")
                        ax.plot(*zip(*pts), color=color, marker=marker, ls="--" if interval else ls, label=label)
        ax.set_xscale("log")
        ax.set_xticks(sorted({r["nfe"] for r in mine}))
        ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())

    plot_by_cfg(read_rows(results), png, draw, xlabel="model evaluations per sample (NFE)",
                ylabels={"fid": "FID (Inception, vs the held-out split)", "class_accuracy": "class accuracy (SVC)"},
                title=lambda cfg, mine: (f"{mine[0].get('data', 'digits')}, {mine[0].get('model', 'DiT-Ti/2')} "
                                         f"({mine[0].get('objective', 'diffusion')}) at step {mine[0]['step']}, cfg {cfg:g}"),
                legend_size=7)


def table(results: Path) -> str:
    """The results as a markdown table, one row per (cfg, point), in the order measured."""
    rows = sorted(read_rows(results), key=lambda r: (r["cfg"], _interval(r) or "", r["sampler"], r["spacing"] or "", r["nfe"]))
    return markdown_table(
        ["cfg", "guided t/T", "sampler", "spacing", "NFE", "FID", "class accuracy", "MLP Frechet", "precision", "recall", "sampling s", "load"],
        rows,
        lambda r: [f"{r['cfg']:g}", _interval(r) or "all", r["sampler"], r["spacing"] or "-", str(r["nfe"]), f"{r['fid']:.2f}",
                   f"{r['class_accuracy']:.3f}", f"{r['frechet_mlp']:.2f}", f"{r['precision']:.3f}", f"{r['recall']:.3f}",
                   f"{r['sampling_seconds']:.0f}", f"{r['load_average']:.1f}"],
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="run or checkpoint folder trained on a built-in set")
    p.add_argument("--out", default="runs/sampler-curve", help="folder of results.jsonl and the held-out reference statistics")
    p.add_argument("--cfg", type=float, nargs="+", default=[1.0, 1.5])
    p.add_argument("--points", nargs="+", default=DEFAULT_POINTS, help="sampler:steps[:spacing]")
    p.add_argument("--per-class", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help="sampling precision (autocast)")
    p.add_argument("--cfg-interval", type=float, nargs=2, metavar=("LO", "HI"),
                   help="guide only at noise levels in [LO, HI] (0 = data, 1 = noise), as `ditforge sample --cfg-interval`")
    p.add_argument("--plot", help="also draw the curves into this PNG")
    p.add_argument("--report-only", action="store_true", help="measure nothing: print the table (and --plot) of OUT/results.jsonl")
    run_curve(p.parse_args(), measure, table, plot)


if __name__ == "__main__":
    main()
