"""One- and two-step MeanFlow against the best flow recipe at 20 evaluations, at equal training
time on this machine (issue 25's goals), on a built-in set (digits or mnist).

Runs, in one sitting, each into OUT/<name>:
- flow:        the demo's recipe (flow matching, logit-normal times, the modern blocks), STEPS steps;
- meanflow:    the same model, batch and blocks with `--objective meanflow`, as many steps as fit
               in the flow run's training time (the step-cost ratio measured by `ditforge bench`);
- meanflow-g:  the same, trained with guidance `--train-cfg OMEGA` (one evaluation, guided), as
               many steps as fit in the same time (its own step-cost ratio: the guided step adds
               a forward without gradient, the model's unconditional velocity);
- finetune:    `--objective meanflow --init-from OUT/flow`, STEPS / 2 steps;
- distil:      the same fine-tune with `--mf-velocity teacher` (the flow run's velocity in the
               target instead of eps - x), STEPS / 2 steps, with train's settings for it (since
               2026-12-07 Muon at 1e-3: `meanflow/init.py`);
- distil-g:    the same with `--train-cfg OMEGA` (the teacher guided at OMEGA), STEPS / 2 steps.
--mf-args adds train options to the three MeanFlow runs (and to their bench), --ft-args to the
fine-tune alone (e.g. `--ft-args "--mf-flow-share 0.25"`).
and judges each with `ditforge eval` (the built-in set's SVC class accuracy and MLP-feature Frechet
distance to its held-out split, 50 samples a class, seeds 0..SEEDS-1 averaged):
flow at 20 Euler and 20 AB2 evaluations, cfg 1 and cfg 1.5; MeanFlow at 1 and 2 evaluations
(the guided runs at their OMEGA).

    .venv/bin/python benchmarks/meanflow_vs_flow.py --data digits --out runs/meanflow-digits
With --curve each run is also judged at more evaluations (flow at 1, 2, 4, 8 and 20 Euler and AB2
steps, MeanFlow at 1, 2, 4 and 8 jumps), and --plot PNG draws the Frechet distance and the class
accuracy against the evaluations, with the goal's line at 1.15x the flow's 20 AB2 steps. With
--eval-only nothing is trained or timed: the runs already under OUT (flow and any of the others,
e.g. links to runs trained elsewhere) are judged, printed and drawn.
Results are appended to OUT/results.jsonl as they finish (a rerun resumes: trained runs resume
from their checkpoint, finished evaluations are skipped); the table is printed at the end.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from ditforge.meanflow.init import DISTIL_OPTIMIZER, FINETUNE_FLOW_SHARE

BLOCKS = ["--norm", "rms", "--mlp", "swiglu", "--rope", "--qk-norm"]


def cli(*args: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "ditforge", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"ditforge {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc.stdout


def train(out: Path, name: str, base: list[str], *extra: str) -> float:
    """Train OUT/name (resumes when there); the wall seconds of the command (0 when it was done)."""
    run = out / name
    done = out / f"{name}.seconds"
    if done.is_file():
        return float(done.read_text())
    t0 = time.perf_counter()
    cli("train", "--run-dir", str(run), *base, *extra)
    seconds = time.perf_counter() - t0
    done.write_text(f"{seconds:.1f}\n")
    return seconds


RUNS = ("meanflow", "meanflow-g", "finetune", "distil", "distil-g")
#: The MeanFlow options that change a step's work, which `ditforge bench` takes too
COST_OPTIONS = ("--mf-flow-share", "--mf-tangent", "--optimizer")


def step_ratios(out: Path, model: str, data_shape: tuple[int, int], batch: int, omega: float,
                mf: list[str], ft: list[str]) -> dict[str, float]:
    """Each MeanFlow run's step time over flow's, from `ditforge bench` in this sitting (30 steps
    each; flow timed first and last, averaged), with the COST_OPTIONS among `mf`: 'meanflow'
    (unguided), 'meanflow-g' (--train-cfg OMEGA); and the fine-tunes' steps, with the fine-tune's
    share at r = t (FINETUNE_FLOW_SHARE, or `ft`'s): 'finetune', 'distil' (a frozen teacher's
    forward beside it) and 'distil-g' (the teacher's forward of the doubled batch)."""
    cost = [x for i in range(0, len(mf) - 1) if mf[i] in COST_OPTIONS for x in mf[i:i + 2]]
    ft_cost = [x for i in range(0, len(ft) - 1) if ft[i] in COST_OPTIONS for x in ft[i:i + 2]]
    ft_cost = [*cost, *ft_cost] if "--mf-flow-share" in cost + ft_cost else [*cost, "--mf-flow-share", str(FINETUNE_FLOW_SHARE)]
    teacher = [*ft_cost, "--mf-velocity", "teacher"]
    # train's optimizer for a distillation, guided or not (since 2026-12-07 a guided one takes it too)
    distil = teacher if "--optimizer" in teacher else [*teacher, "--optimizer", DISTIL_OPTIMIZER]
    times = {}
    cases = [("flow", []), ("meanflow", cost), ("meanflow-g", [*cost, "--train-cfg", str(omega)]), ("finetune", ft_cost),
             ("distil", distil), ("distil-g", [*distil, "--train-cfg", str(omega)]), ("flow-again", [])]
    for name, extra in cases:
        report = out / f"bench-{name}.json"
        objective = "flow" if name.startswith("flow") else "meanflow"
        cli("bench", "--model", model, "--input-size", str(data_shape[1]), "--channels", str(data_shape[0]),
            "--batch", str(batch), "--precision", "fp32", "--objective", objective, *BLOCKS, *extra, "--steps", "30", "--json", str(report))
        times[name] = json.loads(report.read_text())["step_ms"]
    flow = (times["flow"] + times["flow-again"]) / 2
    return {name: times[name] / flow for name in RUNS}


def evaluate(out: Path, results: Path, name: str, steps: int, cfg: float, sampler: str | None, seeds: int) -> dict:
    key = dict(run=name, steps=steps, cfg=cfg, sampler=sampler or "meanflow")
    if results.is_file():
        for line in results.read_text().splitlines():
            row = json.loads(line)
            if all(row.get(k) == v for k, v in key.items()):
                return row
    fds, accs = [], []
    for seed in range(seeds):
        report = out / f"{name}-{steps}-{cfg}-{key['sampler']}-{seed}.json"
        args = ["eval", str(out / name), "--steps", str(steps), "--cfg", str(cfg), "--seed", str(seed), "--json", str(report)]
        cli(*args, *(["--sampler", sampler] if sampler else []))
        r = json.loads(report.read_text())
        fds.append(r["fd_generated"])
        accs.append(r["class_accuracy"])
    row = dict(key, fd=sum(fds) / seeds, fds=fds, accuracy=sum(accs) / seeds, accuracies=accs,
               fd_real=r["fd_real"], heldout_accuracy=r["heldout_accuracy"])
    with results.open("a") as f:
        f.write(json.dumps(row) + "\n")
    return row


#: The goal's ratio at 1 evaluation against the flow's 20-evaluation distance (issue 25)
GOAL = 1.15
#: Evaluations of each run with --curve: flow's steps, MeanFlow's jumps
FLOW_CURVE, MEANFLOW_CURVE = (1, 2, 4, 8, 20), (1, 2, 4, 8)


def plot(rows: list[dict], png: Path, title: str) -> None:
    """Frechet distance and class accuracy against model evaluations per sample (log axes), one
    line per run and sampler at cfg 1, with the one-step goal's lines: GOAL x the flow's distance
    at 20 AB2 steps, and its class accuracy there less 0.02."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    rows = [r for r in rows if r["cfg"] == 1.0]
    labels = {"flow": "flow", "meanflow": "MeanFlow from scratch (equal time)", "finetune": "MeanFlow fine-tune",
              "distil": "MeanFlow distilled from the flow run"}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    reference = next((r for r in rows if r["run"] == "flow" and r["sampler"] == "ab2" and r["steps"] == 20), None)
    for ax, metric, ylabel in ((axes[0], "fd", "Frechet distance (judge features, held-out split)"),
                               (axes[1], "accuracy", "class accuracy (judge)")):
        for (run, sampler) in sorted({(r["run"], r["sampler"]) for r in rows}):
            pts = sorted((r["steps"], r[metric]) for r in rows if (r["run"], r["sampler"]) == (run, sampler))
            label = labels.get(run, run) + (f", {sampler.upper()}" if run == "flow" else "")
            ax.plot(*zip(*pts), marker="o" if run != "flow" else "s", ls="-" if run != "flow" else ":", label=label)
        if reference is not None and metric == "fd":
            ax.axhline(GOAL * reference["fd"], color="k", ls="--", lw=1, label=f"goal at 1 evaluation: {GOAL}x flow's 20 AB2")
        if reference is not None and metric == "accuracy":
            ax.axhline(reference["accuracy"] - 0.02, color="k", ls="--", lw=1, label="goal: flow's 20 AB2 - 0.02")
        if metric == "fd":
            ax.set_yscale("log")
            for axis_formatter in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
                axis_formatter(matplotlib.ticker.FormatStrFormatter("%.2g"))
        ax.set_xscale("log")
        ax.set_xticks(sorted({r["steps"] for r in rows}))
        ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("model evaluations per sample (NFE)")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=90)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default="digits", choices=("digits", "mnist"))
    ap.add_argument("--out", default=None)
    ap.add_argument("--steps", type=int, default=400, help="the flow run's steps (the demo's: 400)")
    ap.add_argument("--model", default=None, help="default: DiT-Ti/2 (digits), DiT-Ti/4 (mnist)")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--omega", type=float, default=1.5, help="training-time guidance of the guided MeanFlow run")
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--mf-args", default="", help="train options of the MeanFlow runs, e.g. '--mf-tangent model'")
    ap.add_argument("--ft-args", default="", help="train options of the fine-tune alone, e.g. '--mf-flow-share 0.25'")
    ap.add_argument("--runs", nargs="+", default=list(RUNS), choices=RUNS, help="which runs besides flow (default: all)")
    ap.add_argument("--curve", action="store_true", help="also judge flow at 1-20 steps and MeanFlow at 1-8 jumps")
    ap.add_argument("--eval-only", action="store_true", help="train and time nothing: judge the runs already under OUT")
    ap.add_argument("--plot", default=None, help="draw distance and accuracy against evaluations (cfg 1) into this PNG")
    a = ap.parse_args()
    model = a.model or ("DiT-Ti/2" if a.data == "digits" else "DiT-Ti/4")
    shape = (1, 8) if a.data == "digits" else (1, 28)
    out = Path(a.out or f"runs/meanflow-{a.data}")
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.jsonl"
    base = ["--data", a.data, "--model", model, "--batch-size", str(a.batch), "--precision", "fp32", "--no-progress",
            "--ckpt-every", str(a.steps), *BLOCKS]

    mf, ft = a.mf_args.split(), a.ft_args.split()
    ratio_file = out / "step_ratios.json"
    if not a.eval_only and (not ratio_file.is_file() or set(RUNS) - set(json.loads(ratio_file.read_text()))):
        ratio_file.write_text(json.dumps(step_ratios(out, model, shape, a.batch, a.omega, mf, ft)) + "\n")  # (older files: no fine-tunes)
    ratios = json.loads(ratio_file.read_text()) if ratio_file.is_file() else dict.fromkeys(RUNS, 1.0)  # (--eval-only: unused)
    mf_steps = {name: max(1, round(a.steps / r)) for name, r in ratios.items()}
    flow_run = ["--objective", "flow", "--time-dist", "logit-normal", "--steps", str(a.steps)]
    from_flow = ["--objective", "meanflow", *mf, *ft, "--init-from", str(out / "flow"), "--steps", str(a.steps // 2)]
    recipes = {  # name -> train options; the flow run first (the others start from it)
        "flow": flow_run,
        "meanflow": ["--objective", "meanflow", *mf, "--steps", str(mf_steps["meanflow"])],
        "meanflow-g": ["--objective", "meanflow", *mf, "--train-cfg", str(a.omega), "--steps", str(mf_steps["meanflow-g"])],
        "finetune": from_flow,
        "distil": [*from_flow, "--mf-velocity", "teacher"],
        "distil-g": [*from_flow, "--mf-velocity", "teacher", "--train-cfg", str(a.omega)],
    }
    names = ["flow", *[n for n in recipes if n != "flow" and n in a.runs]]
    if a.eval_only:
        if not (out / "flow" / "config.json").is_file():
            raise SystemExit(f"--eval-only judges the runs already under {out}, and {out / 'flow'} holds no run: train it "
                             f"(drop --eval-only), or link a flow run there")
        names = [n for n in names if (out / n).is_dir()]
        flow_config = json.loads((out / "flow" / "config.json").read_text())
        model, a.batch = flow_config["model"]["name"], flow_config["global_batch"]  # as the flow run was trained
        seconds = {n: float((out / f"{n}.seconds").read_text()) for n in names if (out / f"{n}.seconds").is_file()}
    else:
        seconds = {name: train(out, name, base, *recipes[name]) for name in names}
    flow_steps, jumps = (FLOW_CURVE, MEANFLOW_CURVE) if a.curve else ((20,), (1, 2))
    rows = [evaluate(out, results, "flow", k, cfg, s, a.seeds) for cfg in (1.0, a.omega) for s in ("euler", "ab2")
            for k in (flow_steps if cfg == 1.0 else (20,))]
    rows += [evaluate(out, results, n, k, 1.0, None, a.seeds) for n in ("meanflow", "finetune", "distil") if n in names
             for k in jumps]
    rows += [evaluate(out, results, n, k, a.omega, None, a.seeds) for n in ("meanflow-g", "distil-g") if n in names
             for k in (1, 2)]
    if a.plot:
        plot(rows, Path(a.plot), f"{a.data}, {model}, batch {a.batch}, cfg 1")

    if a.eval_only:
        print(f"{a.data}, {model}, batch {a.batch}; --eval-only: the runs under {out} as they were trained (their "
              f"config.json), nothing timed here")
    else:
        print(f"{a.data}, {model}, batch {a.batch}; step cost over flow's: meanflow {ratios['meanflow']:.2f}, guided "
              f"{ratios['meanflow-g']:.2f}, finetune {ratios['finetune']:.2f}, distil {ratios['distil']:.2f}, distil-g "
              f"{ratios['distil-g']:.2f}; flow {a.steps} steps, meanflow {mf_steps['meanflow']} and guided "
              f"{mf_steps['meanflow-g']} steps (same time), finetune, distil and distil-g {a.steps // 2} steps from the flow run; "
              f"meanflow options {a.mf_args or 'the defaults'}, fine-tune {a.ft_args or 'the same'}")
    print("training seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()))
    print(f"{'run':<12} {'sampler':<9} {'NFE':>4} {'cfg':>4} {'FD':>8} {'acc':>6}")
    for r in rows:
        nfe = r["steps"]
        print(f"{r['run']:<12} {r['sampler']:<9} {nfe:>4} {r['cfg']:>4g} {r['fd']:>8.2f} {r['accuracy']:>6.3f}")


if __name__ == "__main__":
    main()
