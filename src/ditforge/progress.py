"""Progress that suits where the output goes: a live tqdm bar on a terminal, a plain line every
`interval_s` seconds otherwise (a log file gets a few short lines, not thousands of carriage
returns), and, once, an estimate of the whole run's duration after its first steps.
"""

from __future__ import annotations

import sys
import time
from typing import Callable, TextIO

PLAIN_INTERVAL_S = 60.0
ESTIMATE_AFTER = 5  # steps timed before the estimate (the first step, with its warm-up, is not counted)


def format_duration(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


class Progress:
    """Counts steps from `initial` to `total`. `say` receives the plain lines and the estimate
    (the trainer passes its logger); `stream` is where the bar would draw, and whether it is a
    terminal decides between bar and lines (`tty` overrides that, for tests). `unit` names what
    is counted ("step"; `extract` and bulk `sample` count images)."""

    def __init__(
        self,
        total: int,
        initial: int = 0,
        desc: str = "train",
        say: Callable[[str], None] = print,
        stream: TextIO | None = None,
        tty: bool | None = None,
        interval_s: float = PLAIN_INTERVAL_S,
        estimate_after: int = ESTIMATE_AFTER,
        clock: Callable[[], float] = time.perf_counter,
        unit: str = "step",
    ):
        self.total, self.n, self.desc, self.say, self.clock, self.unit = total, initial, desc, say, clock, unit
        self.interval_s, self.estimate_after = interval_s, estimate_after
        stream = stream if stream is not None else sys.stderr
        self.tty = stream.isatty() if tty is None else tty
        self.bar = None
        if self.tty:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True, file=stream)
        self.t_first: float | None = None  # when the first step ended (timing starts there)
        self.n_first = initial
        self.t_line = clock()
        self.estimated = False

    def rate(self) -> float | None:
        """Steps per second since the first step ended."""
        if self.t_first is None or self.n <= self.n_first:
            return None
        dt = self.clock() - self.t_first
        return (self.n - self.n_first) / dt if dt > 0 else None

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.bar is not None:
            self.bar.update(n)
        if self.t_first is None:
            self.t_first, self.n_first = self.clock(), self.n
            return
        rate = self.rate()
        if not self.estimated and self.n - self.n_first >= self.estimate_after and rate:
            self.estimated = True
            left = (self.total - self.n) / rate
            self.say(
                f"{self.desc}: {rate:.2f} {self.unit}s/s over the first {self.unit}s; {self.total - self.n} {self.unit}s left, "
                f"about {format_duration(left)} (the whole run about {format_duration(self.total / rate)})"
            )
        if self.bar is None and self.clock() - self.t_line >= self.interval_s and self.n < self.total:
            self.t_line = self.clock()
            left = f", about {format_duration((self.total - self.n) / rate)} left" if rate else ""
            self.say(f"{self.desc}: {self.unit} {self.n}/{self.total} ({100 * self.n / self.total:.0f}%){left}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def progress_of(total: int, initial: int, desc: str, batch: int, stream: TextIO | None = None) -> Progress:
    """The progress of a command that counts images in batches of `batch` (`extract`, bulk
    `sample`): a bar on a terminal, else a plain line on stderr every `PLAIN_INTERVAL_S`."""
    stream = stream if stream is not None else sys.stderr
    return Progress(total, initial, desc, say=lambda line: print(line, file=stream, flush=True), stream=stream,
                    estimate_after=3 * batch, unit="image")
