"""The errors ditforge raises on purpose, and what the command line makes of each.

- `UserError` (and `CheckpointError`, `DamagedFileError`): a bad input the user can fix. One line
  on stderr naming the value and what would be right, exit status 2.
- `NonFiniteLossError`: training diverged. One line, exit status 1; the last good checkpoint is kept.
- `UnreadableImage`: an image file its decoder cannot read. Data loaders skip and list it.
Anything else is a bug of ours: the command prints the traceback and asks for a report (exit 3).

Under torchrun an error that every rank raises (a diverged loss, a corrupt checkpoint that rank 0
read: `train/distributed.py`'s `raise_together`) is printed by rank 0 alone: the other ranks'
copies are marked `quiet`, and the command exits with the error's status without a word
(`on_every_rank`).
"""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

E = TypeVar("E", bound=BaseException)


class UserError(ValueError):
    """A bad input: the message names the value and what would be right."""


class CheckpointError(UserError):
    """A checkpoint that is missing, corrupt, or does not fit what was asked."""


class DamagedFileError(UserError):
    """A file of a run that is not whole (cut short by a kill inside a write of an earlier version,
    which wrote it in place): the message names it; its reader may recover it from elsewhere."""


class NonFiniteLossError(RuntimeError):
    """Training diverged: the loss or the weights became NaN or Inf. The last good checkpoint (the
    last one written, whose weights were checked finite) is kept and named."""

    @classmethod
    def stopped(cls, what: str, last_good: str | Path | None) -> "NonFiniteLossError":
        """The error for `what` went wrong, naming `last_good` (None: nothing was written yet)."""
        msg = f"{what}; stopped. "
        msg += f"The last good checkpoint is {last_good}." if last_good else "No checkpoint had been written."
        return cls(msg + " Try a lower --lr, --grad-clip 1.0, or --precision bf16 instead of fp16.")


class UnreadableImage(Exception):
    """An image that its decoder cannot read (not an image, truncated, corrupt)."""


def quiet(error: E) -> E:
    """Mark `error` as one that another process reports (rank 0 of the same torchrun raised the
    same): the command line exits with its status and prints nothing."""
    error.quiet = True
    return error


def is_quiet(error: BaseException) -> bool:
    return getattr(error, "quiet", False)


def on_every_rank(error: E, is_main: bool) -> E:
    """Mark `error` as one that every rank of a torchrun raises at the same point, on the verdict
    of a collective (a stop the ranks agreed on, a diverged loss, `distributed.raise_together`):
    rank 0's copy is printed, the others are `quiet`, and the ranks leave their process group
    together (`distributed.leave`). One process: `error` as it is."""
    error.every_rank = True
    return error if is_main else quiet(error)


def raised_on_every_rank(error: BaseException | None) -> bool:
    return getattr(error, "every_rank", False)
