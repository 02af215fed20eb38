"""A scheduler's warning, heard: SIGTERM, SIGUSR1 or a first SIGINT asks the command to stop.

SLURM (at preemption, at the time limit, or ahead of it with `sbatch --signal=USR1@SECONDS`) and
Kubernetes send a signal some seconds before they kill a job, and torchrun forwards SIGTERM and
SIGINT (and SIGUSR1 with `--signals-to-handle`) to every worker. While a `StopRequest` is
entered, those signals only record that a stop was asked for; the command finishes the unit of
work in flight (a training step, a latent shard, a part of a bulk `.npz`), saves it as it saves
every unit, and raises `Stopped`, which the command line turns into one line and `EXIT_PREEMPTED`.
A second SIGINT (Ctrl-C twice) raises `KeyboardInterrupt` at once: nothing more is saved.

Under torchrun the ranks of `train` must stop at the same step, whichever of them heard the
signal: `StopRequest.agreed(step)` all-reduces the signal's number every `AGREE_EVERY` steps (one
small host sync per `AGREE_EVERY` steps, none in the steps between), and on one process reads
the flag at every step, with no sync at all. So a stop costs at most `AGREE_EVERY - 1` more steps (saved, not
lost) under torchrun, and none on one process. `extract` and bulk `sample` need no agreement:
each rank writes only its own shards or parts, so each stops on its own after the one in flight
(a rank that heard nothing is stopped by torchrun's agent, which sends it SIGTERM once another
rank has exited).

Why exit status 75 (`EX_TEMPFAIL` of sysexits.h, "temporary failure, try again"): 0 would make an
unfinished run look finished to whatever comes next (`train && sample`, torchrun, a workflow
tool); 1, 2 and 3 already mean diverged, bad input and our bug; 128 + N is what a shell reports
for a process *killed* by signal N, which this one was not. torchrun itself never passes a
worker's status on: when its agent got the signal (the usual case: SLURM signals every process
of the job step, Kubernetes signals the container's first process) it forwards it to the
workers, waits `--shutdown-timeout` seconds (default 30) for them, SIGKILLs the rest and exits 1
without restarting anything; when only workers got it, their non-zero status is a failure of the
group, which `--max-restarts N` restarts (the new group resumes from the checkpoint just
written, losing nothing) and which without restarts ends torchrun with status 1. A requeue
script under torchrun therefore requeues on the signal it trapped, or on any non-zero status;
on one process it can test for 75.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Callable

#: The exit status of a command stopped by a signal after saving its work: rerun it to continue.
EXIT_PREEMPTED = 75
#: The signals that ask for a stop.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
#: Under torchrun the ranks agree on a stop every this many training steps (one process: every step).
AGREE_EVERY = 10


class Stopped(Exception):
    """The command stopped on a signal after saving its work (the message says what was saved and
    where). The command line prints it with the command that continues, and exits EXIT_PREEMPTED."""

    def __init__(self, message: str, distributed: bool = False):
        super().__init__(message)
        self.distributed = distributed  # launched by torchrun: the command to rerun is torchrun's


class StopRequest:
    """While entered, SIGTERM, SIGUSR1 and a first SIGINT set `signal_name` instead of killing the
    process; a second SIGINT raises KeyboardInterrupt. The previous handlers come back on exit.
    Outside the main thread (where Python cannot install handlers) it hears nothing.

    `max_over_ranks(n) -> int`: the largest of the ranks' integers (a collective; None on one
    process), with which `agreed` tells every rank which signal came to any of them."""

    def __init__(self, max_over_ranks: Callable[[int], int] | None = None, every: int = AGREE_EVERY):
        self.max_over_ranks, self.every = max_over_ranks, every
        self.signum = 0  # the first stop signal heard (0: none)
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        """A stop signal reached this process (or, after `agreed`, another rank)."""
        return self.signum != 0

    @property
    def signal_name(self) -> str | None:
        return signal.Signals(self.signum).name if self.signum else None

    def agreed(self, step: int) -> bool:
        """Whether every rank stops after `step`: on one process, whether a signal came; under
        torchrun, at steps that are multiples of `every`, whether one came to any rank (every rank
        must call this at every step, so that all of them reduce at the same steps)."""
        if self.max_over_ranks is None:
            return self.requested
        if step % self.every:
            return False
        heard = self.max_over_ranks(self.signum)
        if heard and not self.signum:
            self.signum = heard  # another rank's signal: named in this rank's words too
        return heard != 0

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGINT and self.requested:
            raise KeyboardInterrupt  # the second Ctrl-C: stop now
        if not self.signum:  # a repeat (torchrun forwarding SLURM's SIGTERM to a worker that had it) changes nothing
            self.signum = signum

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)  # None: not installed from Python
        self._previous.clear()
