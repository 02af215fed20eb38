"""One writer per folder: an exclusive lock that a command holds for its lifetime.

`train` (its run folder), `extract` (its store) and bulk `sample --out X.npz` (beside X.npz) take
it before they write or tidy anything; a second command on the same folder fails at once with
`FolderBusyError` (a `UserError`: one line, exit 2) naming the holder, and writes nothing.

The lock is `fcntl.flock(LOCK_EX | LOCK_NB)` on a lock file: the kernel releases it when its
holder's process ends, however it ends (SIGKILL too), so the lock of a process that died is no
obstacle, whatever its file still says. The holder writes its host, PID, start time and command
into the file, for the message of the next one. On release the file is removed (and a folder
that taking the lock created, if it is still empty); whoever locks a file checks that it is still
the one at that path (same inode), so a lock on a removed file never counts.

Across machines (several nodes writing one folder on a shared file system) the lock works where
the mount passes `flock` to the server: NFSv4, or NFSv3 with lockd (the Linux client emulates
`flock` with byte-range locks there), not a mount with `nolock` or `local_lock=flock|all`, which
lock on each client only; Lustre needs the `flock` mount option. A file system that refuses locks
is a one-line error naming this; `DITFORGE_NO_LOCK=1` skips the lock (then nothing stops a
second writer). Under torchrun one process of the job (rank 0) holds it for the whole job.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from ditforge.errors import UserError

LOCK_NAME = ".ditforge.lock"  # inside a run folder or a latent store


class FolderBusyError(UserError):
    """Another live process holds the lock of the folder: the message names it."""


def folder_lock_file(folder: str | Path) -> Path:
    """The lock file of a folder that a command writes (a run folder, a latent store)."""
    return Path(folder) / LOCK_NAME


def output_lock_file(out: str | Path) -> Path:
    """The lock file of an output file and what goes with it (`X.npz` and `X.npz.parts/`): `.X.npz.lock` beside it."""
    out = Path(out)
    return out.with_name(f".{out.name}.lock")


def describe_holder(text: str) -> str:
    """'PID 123 on host h since 2026-12-02 05:51:16 UTC (ditforge train)' from a lock file's text."""
    try:
        info = json.loads(text)
        return f"PID {info['pid']} on host {info['host']} since {info['started']} ({info['command']})"
    except (ValueError, KeyError, TypeError):
        return "a process that has not yet written its name into the lock file"


class FolderLock:
    """The exclusive lock of `lock_file` for `command` (e.g. 'ditforge train'): `acquire()`, `release()`,
    or `with FolderLock(...):`. `what` names the folder in messages (default: the lock file's folder)."""

    def __init__(self, lock_file: str | Path, command: str, what: str | Path | None = None):
        self.path = Path(lock_file)
        self.command = command
        self.what = str(what if what is not None else self.path.parent)
        self._fd: int | None = None
        self._made: list[Path] = []  # folders that acquire() created, innermost last

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        """Take the lock or raise `FolderBusyError` naming its holder; writes only once it is ours."""
        if self._fd is not None or os.environ.get("DITFORGE_NO_LOCK") == "1":
            return
        self._make_folder(self.path.parent)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = describe_holder(os.pread(fd, 4096, 0).decode("utf-8", "replace"))
                os.close(fd)
                self._remove_made()
                raise FolderBusyError(
                    f"{self.what!r} is in use by {holder}: one command at a time writes it; wait for that one "
                    f"to end (or stop it), or choose another folder"
                ) from None
            except OSError as e:
                os.close(fd)
                self._remove_made()
                if e.errno in (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                    raise UserError(
                        f"cannot lock {str(self.path)!r}: the file system refuses file locks ({errno.errorcode[e.errno]}); mount it "
                        "with lock support (NFS: NFSv4 or lockd, not 'nolock'; Lustre: '-o flock'), or set DITFORGE_NO_LOCK=1 "
                        "to run without the one-writer guard"
                    ) from None
                raise
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # the holder removed this file as we opened it: lock the one there now
        record = {"host": socket.gethostname(), "pid": os.getpid(),
                  "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "command": self.command,
                  "argv": sys.argv}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        self._fd = fd

    def release(self) -> None:
        """Remove the lock file, drop the lock, and remove the folders acquire() made if they are empty."""
        if self._fd is None:
            return
        try:
            os.unlink(self.path)  # while still held: whoever opened it before re-locks the new file
        except FileNotFoundError:
            pass
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None
        self._remove_made()

    def _make_folder(self, folder: Path) -> None:
        missing = []
        while not folder.exists():
            missing.append(folder)
            folder = folder.parent
        for p in reversed(missing):
            try:
                p.mkdir()
            except FileExistsError:
                continue
            self._made.append(p)

    def _remove_made(self) -> None:
        for p in reversed(self._made):
            try:
                p.rmdir()
            except OSError:  # not empty: the command wrote into it
                break
        self._made = []

    def __enter__(self) -> "FolderLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
