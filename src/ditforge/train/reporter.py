"""What a running training tells: the log line, TensorBoard scalars, the progress bar, and the
check that the loss stayed finite.

The step losses are summed on the device (`add`), and read on the host only at a log line or a
checkpoint (`log`, `check_finite`): the hot loop makes no host sync. Both reads are collectives
under torchrun, so every rank calls them at the same steps; rank 0 alone writes. A loss is
computed before its update, so the last update before a checkpoint is checked by the
checkpointer, on the weights (train/checkpointer.py).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from ditforge.evaluation.builtin import BuiltinReport
from ditforge.evaluation.run_report import RunReport
from ditforge.errors import NonFiniteLossError, on_every_rank
from ditforge.progress import PLAIN_INTERVAL_S, Progress
from ditforge.train import distributed

log = logging.getLogger("ditforge.train")


class Reporter:
    """Counts steps from `step` to `total`; `progress` False gives no bar and no periodic line."""

    def __init__(self, run_dir: Path, d: distributed.Dist, step: int, total: int, global_batch: int, progress: bool):
        self.d, self.total, self.global_batch = d, total, global_batch
        self.writer = self.bar = None
        if d.is_main:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(run_dir / "tensorboard"))
            # a bar on a terminal, a line a minute in a log; the duration estimate either way
            self.bar = Progress(total, step, "train", log.info, tty=None if progress else False,
                                interval_s=PLAIN_INTERVAL_S if progress else float("inf"))
        self.running = torch.zeros((), device=d.device)  # sum of step losses since the last log line
        self.finite = torch.ones((), dtype=torch.bool, device=d.device)  # every loss so far finite?
        self.since, self.t_last, self.last_loss = 0, time.perf_counter(), float("nan")
        self.terms: dict[str, torch.Tensor] = {}  # sums of the other logged losses (REPA's alignment)

    def add(self, loss: torch.Tensor, terms: dict[str, torch.Tensor] | None = None) -> None:
        """Count one step's loss (a 0-d device tensor) and other `terms` beside it without reading them."""
        self.running += loss
        for name, value in (terms or {}).items():
            self.terms[name] = self.terms.get(name, torch.zeros((), device=value.device)) + value
        self.finite &= torch.isfinite(loss)
        self.since += 1
        if self.bar is not None:
            self.bar.update(1)

    def check_finite(self, step: int, last_good: Path | None) -> None:
        """Raise `NonFiniteLossError` naming `last_good` if any rank's loss was NaN or Inf: on every
        rank (the verdict is all-reduced), printed by rank 0 alone (`errors.on_every_rank`)."""
        if not distributed.all_true(self.finite, self.d):
            error = NonFiniteLossError.stopped(f"the loss became NaN or Inf before step {step}", last_good)
            raise on_every_rank(error, self.d.is_main)

    def log(self, step: int, lr: float | None = None) -> None:
        """The mean loss across ranks since the last line, and the throughput; and `lr`, the rate
        of the last step, where a schedule moves it (None: not shown)."""
        self.last_loss = (distributed.all_reduce_mean(self.running, self.d) / self.since).item()
        now = time.perf_counter()
        steps_per_s = self.since / (now - self.t_last)
        imgs_per_s = steps_per_s * self.global_batch
        terms = {k: (distributed.all_reduce_mean(v, self.d) / self.since).item() for k, v in sorted(self.terms.items())}
        if self.d.is_main:
            log.info(
                "step %d/%d | loss %.4f%s%s | %.2f steps/s | %.0f images/s",
                step, self.total, self.last_loss, "".join(f" | {k} {v:.4f}" for k, v in terms.items()),
                "" if lr is None else f" | lr {lr:.3g}", steps_per_s, imgs_per_s,
            )
            if lr is not None:
                self.writer.add_scalar("train/lr", lr, step)
            self.writer.add_scalar("train/loss", self.last_loss, step)
            for k, v in terms.items():
                self.writer.add_scalar(f"train/{k}", v, step)
            self.writer.add_scalar("train/steps_per_s", steps_per_s, step)
            self.writer.add_scalar("train/images_per_s", imgs_per_s, step)
        self.running.zero_()
        self.terms.clear()
        self.since, self.t_last = 0, time.perf_counter()

    def evaluation(self, step: int, report: RunReport | BuiltinReport | None) -> None:
        """One log line and the TensorBoard scalars of an in-training evaluation (None off rank 0)."""
        if report is None:
            return
        log.info("step %d | %s", step, report.line())
        self.writer.add_scalar("eval/class_accuracy", report.class_accuracy, step)
        if isinstance(report, BuiltinReport):
            self.writer.add_scalar("eval/frechet_distance", report.fd_generated, step)
            return
        self.writer.add_scalar("eval/accuracy_ratio", report.accuracy_ratio, step)
        for c in report.classes:
            self.writer.add_scalar(f"eval/class_accuracy/{c['name']}", c["samples"], step)
        if report.fid is not None:
            self.writer.add_scalar("eval/fid", report.fid, step)
            self.writer.add_scalar("eval/precision", report.precision, step)
            self.writer.add_scalar("eval/recall", report.recall, step)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
