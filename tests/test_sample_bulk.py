"""Bulk sampling to the ADM .npz format: streaming writer, shards, resume, any world size."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import run_cli
from ditforge.npz import NpzStreamWriter
from ditforge.sample_bulk import sample_labels
from test_distributed import torchrun


def test_stream_writer_makes_an_ordinary_npz(tmp_path):
    a = np.arange(5 * 4 * 4 * 3, dtype=np.uint8).reshape(5, 4, 4, 3)
    labels = np.array([3, 1, 4, 1, 5])
    with NpzStreamWriter(tmp_path / "x.npz", {"arr_0": (a.shape, np.uint8), "labels": (labels.shape, np.int64)}) as w:
        w.write("arr_0", a[:2])
        w.write("arr_0", a[2:])
        w.write("labels", labels)
    got = np.load(tmp_path / "x.npz")
    assert np.array_equal(got["arr_0"], a) and np.array_equal(got["labels"], labels)
    with pytest.raises(ValueError, match="wrote 2 rows, declared 5"):
        with NpzStreamWriter(tmp_path / "y.npz", {"arr_0": (a.shape, np.uint8)}) as w:
            w.write("arr_0", a[:2])
    assert not (tmp_path / "y.npz").exists() and not list(tmp_path.glob(".y.npz*"))


def test_labels_uniform_or_balanced():
    assert sample_labels(7, 3, 0, balanced=True).tolist() == [0, 1, 2, 0, 1, 2, 0]
    u = sample_labels(5000, 10, 0, balanced=False)
    assert u.min() == 0 and u.max() == 9 and abs(float((u == 3).float().mean()) - 0.1) < 0.02
    assert sample_labels(50, 10, 0, False).tolist() == sample_labels(50, 10, 0, False).tolist()


BULK = ["--num-samples", "12", "--steps", "3", "--batch-size", "2", "--shard-size", "4", "--cfg", "1.5"]


def test_npz_is_adm_format_and_independent_of_process_count(trained_run, tmp_path):
    one, two = tmp_path / "one.npz", tmp_path / "two.npz"
    out = run_cli("sample", str(trained_run), *BULK, "--out", str(one)).stdout
    assert "wrote" in out and "12 samples" in out
    torchrun("sample", str(trained_run), *BULK, "--out", str(two))
    a, b = np.load(one), np.load(two)
    assert a["arr_0"].dtype == np.uint8 and a["arr_0"].shape == (12, 8, 8, 3)
    assert a["labels"].shape == (12,) and a["labels"].max() < 10
    assert np.array_equal(a["arr_0"], b["arr_0"]) and np.array_equal(a["labels"], b["labels"])
    assert not (tmp_path / "one.npz.parts").exists()


def test_killed_bulk_sampling_resumes_without_redoing_shards(trained_run, tmp_path):
    args = ["sample", str(trained_run), "--num-samples", "40", "--steps", "20", "--batch-size", "4", "--shard-size", "4"]
    straight = tmp_path / "straight.npz"
    run_cli(*args, "--out", str(straight))
    out = tmp_path / "killed.npz"
    proc = subprocess.Popen([sys.executable, "-m", "ditforge", *args, "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    parts = tmp_path / "killed.npz.parts"
    deadline = time.time() + 300
    while not (parts / "shard-00001.npz").exists():
        assert proc.poll() is None and time.time() < deadline, "sampling ended before it could be killed"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    done = len(list(parts.glob("shard-*.npz")))
    rerun = run_cli(*args, "--out", str(out)).stdout
    assert f"{40 - 4 * done} sampled by this run" in rerun  # finished shards were not redone
    assert np.array_equal(np.load(out)["arr_0"], np.load(straight)["arr_0"])
    assert not parts.exists()


def test_bulk_bad_inputs(trained_run, tmp_path):
    p = run_cli("sample", str(trained_run), "--num-samples", "4", "--out", str(tmp_path / "x.png"), check=False)
    assert p.returncode == 2 and "--num-samples needs an .npz" in p.stderr
    p = run_cli("sample", str(trained_run), "--num-samples", "4", "--batch-size", "3", "--shard-size", "4",
                "--out", str(tmp_path / "x.npz"), check=False)
    assert p.returncode == 2 and "multiple of the batch size" in p.stderr
