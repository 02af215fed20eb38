"""Errors a user can fix. The CLI prints them as one line and exits with status 2."""


class UserError(ValueError):
    """A bad input: the message names the value and what would be right."""


class CheckpointError(UserError):
    """A checkpoint that is missing, corrupt, or does not fit what was asked."""


class NonFiniteLossError(RuntimeError):
    """Training diverged: the loss became NaN or Inf. The last good checkpoint is kept."""
