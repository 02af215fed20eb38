"""ADM sample batches (`.npz` with `arr_0` = uint8 (N, H, W, 3)) written and read in bounded memory.

`np.savez` needs the whole array in memory (50,000 images at 512 px are 39 GB); `NpzStreamWriter`
writes the `.npy` members of an uncompressed zip piece by piece, so a file of any size is
assembled one shard at a time. The result is an ordinary `.npz`: `np.load` reads it, and so does
OpenAI's ADM evaluator.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np
from numpy.lib import format as npy_format

from ditforge.write_failures import failing_write


class NpzStreamWriter:
    """Write arrays of known shape and dtype into an `.npz` in pieces along the first axis.

    with NpzStreamWriter(path, {"arr_0": ((N, H, W, 3), np.uint8), "labels": ((N,), np.int64)}) as w:
        w.write("arr_0", chunk); ...   # members are written in the order declared, each in full
    The file appears under its name only when complete (written to a temporary name, renamed).
    """

    def __init__(self, path: str | Path, members: dict[str, tuple[tuple[int, ...], np.dtype]]):
        self.path = Path(path)
        self.members = {k: (tuple(shape), np.dtype(dtype)) for k, (shape, dtype) in members.items()}
        self.tmp = self.path.with_name(f".{self.path.name}.tmp{os.getpid()}")
        self.zip = zipfile.ZipFile(self.tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True)
        self.order = list(self.members)
        self.current = None  # (name, file handle, rows written)

    def _open(self, name: str) -> None:
        shape, dtype = self.members[name]
        handle = self.zip.open(f"{name}.npy", "w", force_zip64=True)
        npy_format.write_array_header_2_0(handle, {"descr": npy_format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape})
        self.current = [name, handle, 0]

    def _close_current(self) -> None:
        name, handle, rows = self.current
        if rows != self.members[name][0][0]:
            raise ValueError(f"member {name!r}: wrote {rows} rows, declared {self.members[name][0][0]}")
        handle.close()
        self.current = None

    def write(self, name: str, chunk: np.ndarray) -> None:
        shape, dtype = self.members[name]
        if self.current is None or self.current[0] != name:
            if self.current is not None:
                self._close_current()
            if name != self.order[0]:
                raise ValueError(f"members must be written in the declared order {self.order}; got {name!r}")
            self.order.pop(0)
            self._open(name)
        chunk = np.ascontiguousarray(chunk, dtype=dtype)
        if chunk.shape[1:] != shape[1:]:
            raise ValueError(f"member {name!r}: chunk of shape {chunk.shape} does not fit {shape}")
        self.current[1].write(chunk.tobytes())
        self.current[2] += chunk.shape[0]

    def close(self) -> Path:
        try:
            if self.current is not None:
                self._close_current()
            if self.order:
                raise ValueError(f"members {self.order} were declared but not written")
            self.zip.close()
        except BaseException:
            self.abort()
            raise
        os.replace(self.tmp, self.path)
        return self.path

    def abort(self) -> None:
        """Drop the unfinished file, also when closing it fails (closing writes: on a full disk it
        fails again)."""
        try:
            if self.current is not None:
                handle, self.current = self.current[1], None
                handle.close()
            self.zip.close()
        except (OSError, ValueError):
            pass  # the file is dropped below, whatever closing it left undone
        finally:
            # the file itself, without writing anything more; and no zip left to finish it when it is
            # collected (ZipFile.__del__ would write its end records into a closed file)
            fp, self.zip.fp = self.zip.fp, None
            if fp is not None:
                try:
                    fp.close()
                except (OSError, ValueError):
                    pass
            self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> "NpzStreamWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def save_npz_atomic(path: str | Path, **arrays: np.ndarray) -> Path:
    """np.savez to a temporary name, then rename: a kill never leaves a half-written file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}.npz")
    with failing_write(path, sum(a.nbytes for a in arrays.values()) + 1024 * len(arrays), [tmp]):  # + zip and .npy headers
        np.savez(tmp, **arrays)
        os.replace(tmp, path)
    return path
