"""One writer per folder (`folder_lock.py`): a second command on a held folder exits 2 at once,
naming the holder, and writes nothing; the lock of a process that died is no obstacle."""

import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import TINY_TRAIN, cpu_env, run_cli
from ditforge.folder_lock import FolderBusyError, FolderLock, folder_lock_file, output_lock_file

# A real second process that takes the locks of the paths on its command line and waits.
HOLDER = """
import sys, time
from ditforge.folder_lock import FolderLock, folder_lock_file, output_lock_file
kinds = {"folder": folder_lock_file, "output": output_lock_file}
locks = [FolderLock(kinds[k](p), "ditforge holder-test") for k, p in zip(sys.argv[1::2], sys.argv[2::2])]
for lock in locks:
    lock.acquire()
print("held", flush=True)
time.sleep(600)
"""


def hold(*kind_and_paths) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, *map(str, kind_and_paths)], stdout=subprocess.PIPE, text=True,
                            env=cpu_env())
    assert proc.stdout.readline().strip() == "held", "the holder could not take its locks"
    return proc


def snapshot(folder):
    """Every path under `folder` with its size and mtime: what a refused command must leave as it is."""
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")} if folder.exists() else None


def test_a_held_folder_is_refused_naming_the_holder_and_a_dead_holders_lock_is_no_obstacle(tmp_path):
    folder = tmp_path / "run"
    holder = hold("folder", folder)
    try:
        with pytest.raises(FolderBusyError) as e:
            FolderLock(folder_lock_file(folder), "ditforge train").acquire()
        message = str(e.value)
        assert f"PID {holder.pid} on host {os.uname().nodename} since " in message and "UTC" in message
        assert "ditforge holder-test" in message and str(folder) in message and "\n" not in message
    finally:
        holder.send_signal(signal.SIGKILL)  # dies holding the lock: its lock file stays, with its name in it
        holder.wait()
    assert folder_lock_file(folder).exists()
    with FolderLock(folder_lock_file(folder), "ditforge train") as lock:  # the kernel released the dead process's lock
        assert lock.held and f'"pid": {os.getpid()}' in folder_lock_file(folder).read_text()
    assert not folder_lock_file(folder).exists() and folder.is_dir()  # released: the file goes, the folder it did not make stays


def test_a_lock_creates_its_folder_and_removes_it_again_when_nothing_was_written(tmp_path):
    folder = tmp_path / "new" / "run"
    with FolderLock(folder_lock_file(folder), "ditforge train"):
        assert folder.is_dir()
    assert not (tmp_path / "new").exists()  # a refused or failed command leaves no empty folder behind
    with FolderLock(folder_lock_file(folder), "ditforge train"):
        (folder / "config.json").write_text("{}")
    assert [p.name for p in folder.iterdir()] == ["config.json"]  # written into: kept
    assert output_lock_file(tmp_path / "s.npz") == tmp_path / ".s.npz.lock"


def test_a_second_train_extract_or_bulk_sample_on_a_held_folder_exits_2_at_once_and_writes_nothing(trained_run, tmp_path):
    run, store, npz = tmp_path / "run", tmp_path / "store", tmp_path / "s.npz"
    run.mkdir()
    (run / "notes.txt").write_text("mine\n")  # a file in the run folder that the refused command must leave as it is
    holder = hold("folder", run, "folder", store, "output", npz)
    try:
        before = {p: snapshot(p) for p in (run, store)}
        commands = {
            "train": ["train", "--run-dir", str(run), "--steps", "2", *TINY_TRAIN],
            "extract": ["extract", "--data", "digits", "--vae", "identity", "--image-size", "8", "--out", str(store), "--no-progress"],
            "sample": ["sample", str(trained_run), "--num-samples", "4", "--steps", "2", "--batch-size", "2", "--shard-size", "2",
                       "--out", str(npz)],
        }
        for name, args in commands.items():
            t0 = time.perf_counter()
            p = run_cli(*args, check=False)
            assert p.returncode == 2, (name, p.stdout, p.stderr)
            line = p.stderr.strip()
            assert "\n" not in line and f"in use by PID {holder.pid} on host " in line and "Traceback" not in line, (name, line)
            assert time.perf_counter() - t0 < 60, name  # at once: before any data, model or sampling work
        assert {p: snapshot(p) for p in (run, store)} == before  # nothing written, nothing tidied
        assert not npz.exists() and not npz.with_name("s.npz.parts").exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
