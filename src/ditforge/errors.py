"""The errors ditforge raises on purpose, and what the command line makes of each.

- `UserError` (and `CheckpointError`): a bad input the user can fix. One line on stderr naming
  the value and what would be right, exit status 2.
- `NonFiniteLossError`: training diverged. One line, exit status 1; the last good checkpoint is kept.
- `UnreadableImage`: an image file its decoder cannot read. Data loaders skip and list it.
Anything else is a bug of ours: the command prints the traceback and asks for a report (exit 3).
"""


class UserError(ValueError):
    """A bad input: the message names the value and what would be right."""


class CheckpointError(UserError):
    """A checkpoint that is missing, corrupt, or does not fit what was asked."""


class NonFiniteLossError(RuntimeError):
    """Training diverged: the loss became NaN or Inf. The last good checkpoint is kept."""


class UnreadableImage(Exception):
    """An image that its decoder cannot read (not an image, truncated, corrupt)."""
