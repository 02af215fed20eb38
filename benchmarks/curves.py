"""What the quality-curve benchmarks (recipe_curve.py, sampler_curve.py) share.

- the results file: one JSON row per measured point, appended as it finishes, so that a rerun
  skips what is there (`read_rows`, `append_row`);
- the Inception reference statistics of the held-out digits, computed once per OUT folder
  (`heldout_reference`);
- the figure: FID (top) and class accuracy (bottom) against a budget, one column per guidance
  scale (`plot_by_cfg`), each script drawing its own lines.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

METRICS = ("fid", "class_accuracy")


def read_rows(results: Path) -> list[dict]:
    """The rows of a results.jsonl; none when it does not exist yet."""
    return [json.loads(line) for line in results.read_text().splitlines()] if results.exists() else []


def append_row(results: Path, row: dict) -> None:
    """Print `row` and append it to `results` (one JSON line)."""
    print(json.dumps(row), flush=True)
    with results.open("a") as f:
        f.write(json.dumps(row) + "\n")


def heldout_reference(inception, images: torch.Tensor, ref_file: Path):
    """Inception statistics of `images` (N, C, H, W) in [-1, 1], cached in `ref_file`. Written
    under this process's own names, then renamed, so that runs may go in parallel."""
    from ditforge.metrics import reference_from_path, save_reference
    from ditforge.sampling.bulk import to_hwc_uint8

    if not ref_file.exists():
        npz, part = ref_file.with_name(f"heldout-{os.getpid()}.npz"), ref_file.with_name(f"{ref_file.stem}-{os.getpid()}.npz")
        np.savez(npz, arr_0=to_hwc_uint8(images))
        save_reference(part, reference_from_path(inception, npz))
        os.replace(part, ref_file)
        npz.unlink()
    return reference_from_path(inception, ref_file)


def plot_by_cfg(
    rows: list[dict], png: Path, draw: Callable[[object, list[dict], str], None], *,
    xlabel: str, ylabels: dict[str, str], title: Callable[[float, list[dict]], str], legend_size: int,
) -> None:
    """FID and class accuracy, one column per cfg: `draw(ax, rows of that cfg, metric)` draws the
    lines (and may set the x scale); the labels, title, grid and legend are set here."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfgs = sorted({r["cfg"] for r in rows})
    fig, axes = plt.subplots(2, len(cfgs), figsize=(5.5 * len(cfgs), 7.5), squeeze=False)
    for j, cfg in enumerate(cfgs):
        mine = [r for r in rows if r["cfg"] == cfg]
        for i, metric in enumerate(METRICS):
            ax = axes[i][j]
            draw(ax, mine, metric)
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabels[metric])
            ax.set_title(title(cfg, mine))
            ax.grid(alpha=0.3)
        axes[0][j].legend(fontsize=legend_size)
    fig.tight_layout()
    fig.savefig(png, dpi=90)


def markdown_table(columns: list[str], rows: list[dict], cells: Callable[[dict], list[str]]) -> str:
    """A markdown table of `rows` in the order given, `cells(row)` giving one row's columns."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return "\n".join(lines + ["| " + " | ".join(cells(r)) + " |" for r in rows])


def run_curve(args, measure: Callable[[object], None], table: Callable[[Path], str], plot: Callable[[Path, Path], None]) -> None:
    """A curve script's main after parsing: measure (unless --report-only), print the table of
    OUT/results.jsonl, and draw it into --plot when given."""
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    if not args.report_only:
        measure(args)
    print(table(Path(args.out) / "results.jsonl"))
    if args.plot:
        plot(Path(args.out) / "results.jsonl", Path(args.plot))
