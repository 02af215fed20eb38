"""A write that the storage refuses (full disk, quota, file-size limit, read-only or failing
mount) is the machine's state, not a bug: one line naming the file and the bytes it needs.

Every file ditforge writes goes first to a temporary name that is renamed into place when whole
(checkpoint folders, `config.json`, latent shards and the manifest, `.npz` files and their
parts), so what was written before is never touched by a failing write. `failing_write` wraps
such a write: on any failure it removes the temporary file or folder, and a storage error
(`STORAGE_ERRNOS`, from an `OSError` or from safetensors' Rust writer, which raises
`SafetensorError("... (os error 28)")`) becomes a `WriteFailed` (a `UserError`: one line, exit
status 2) naming the final path, the bytes it needs and the bytes free there. The same command
rerun once there is space continues from what was written before.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from ditforge.errors import UserError

# A full disk, a quota, a file-size limit, a read-only or failing mount: what the user can change.
STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EIO}
# safetensors' writer (Rust) raises SafetensorError("... I/O error: No space left on device (os error 28)")
_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")


class WriteFailed(UserError):
    """The storage refused a write; the message names the file, the bytes needed and the reason."""


def storage_errno(error: BaseException) -> int | None:
    """The errno of `error` when it is a storage failure (`STORAGE_ERRNOS`) of an `OSError` or of
    safetensors' writer; None for anything else."""
    if isinstance(error, OSError):
        code = error.errno
    else:
        from safetensors import SafetensorError

        m = _RUST_OS_ERROR.search(str(error)) if isinstance(error, SafetensorError) else None
        code = int(m.group(1)) if m else None
    return code if code in STORAGE_ERRNOS else None


def human_bytes(n: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} bytes" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def _free_bytes(path: Path) -> int | None:
    for folder in (path.parent, *path.parent.parents):
        if folder.is_dir():
            try:
                return shutil.disk_usage(folder).free
            except OSError:
                return None
    return None


def failed_write_message(path: str | Path, nbytes: int, code: int) -> str:
    path = Path(path)
    free = _free_bytes(path)
    room = f", {human_bytes(free)} free there" if free is not None else ""
    return (f"cannot write {str(path)!r}: {os.strerror(code)} ({errno.errorcode[code]}); it needs {human_bytes(nbytes)}{room}. "
            "Nothing written before was touched (no temporary file is left): free space, or raise the quota or limit, "
            "and rerun the same command to continue")


def _remove(path: Path) -> None:
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    except OSError:
        pass  # a failing disk may refuse this too; the next start tidies it


@contextmanager
def failing_write(path: str | Path, nbytes: int, temporary: Iterable[str | Path] = ()) -> Iterator[None]:
    """Run the write of `path` (`nbytes` in all) in the body. On any exception the `temporary`
    files or folders are removed; a storage error is raised as one `WriteFailed` line, any other
    exception as it was."""
    try:
        yield
    except BaseException as e:
        for t in temporary:
            _remove(Path(t))
        code = storage_errno(e)
        if code is None:
            raise
        raise WriteFailed(failed_write_message(path, nbytes, code)) from None
