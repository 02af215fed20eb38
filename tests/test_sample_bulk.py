"""Bulk sampling to the ADM .npz format: streaming writer, shards, resume, any world size."""

import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import cpu_env, run_cli
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
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=cpu_env(OMP_NUM_THREADS="2"))  # as run_cli: same threads, same rounding
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


def test_adm_eval_of_npz_against_folder_npz_and_saved_reference(tmp_path):
    """The whole user path: images -> reference statistics file -> metrics in JSON."""
    import json

    from sklearn.datasets import load_sample_images
    from PIL import Image

    photos = [np.asarray(Image.fromarray(p).resize((48, 32))) for p in load_sample_images().images]
    real = np.stack([np.roll(p, s, axis=1) for p in photos for s in (0, 3, 6)]).astype(np.uint8)  # (6, 32, 48, 3)
    for i, im in enumerate(real):
        (tmp_path / "ref" / "any").mkdir(parents=True, exist_ok=True)
        Image.fromarray(im).save(tmp_path / "ref" / "any" / f"{i}.png")
    np.savez(tmp_path / "same.npz", arr_0=real)
    np.savez(tmp_path / "other.npz", arr_0=(255 - real).astype(np.uint8))
    out = run_cli("eval", "--samples", str(tmp_path / "same.npz"), "--ref", str(tmp_path / "ref"),
                  "--save-ref", str(tmp_path / "stats.npz"), "--json", str(tmp_path / "a.json")).stdout
    assert "FID" in out and "wrote reference statistics of 6 images" in out
    same = json.loads((tmp_path / "a.json").read_text())
    assert abs(same["fid"]) < 1e-2 and same["precision"] == 1.0 and same["recall"] == 1.0
    run_cli("eval", "--samples", str(tmp_path / "other.npz"), "--ref", str(tmp_path / "stats.npz"), "--json", str(tmp_path / "b.json"))
    other = json.loads((tmp_path / "b.json").read_text())
    assert other["fid"] > 10 * max(same["fid"], 1e-3) and other["num_reference"] == 6
    bad = run_cli("eval", "--samples", str(tmp_path / "missing.npz"), "--ref", str(tmp_path / "stats.npz"), check=False)
    assert bad.returncode == 2 and "missing.npz" in bad.stderr and "Traceback" not in bad.stderr


def test_compile_reaches_bulk_sampling(trained_run, tmp_path, monkeypatch):
    """`sample --compile --out X.npz` runs the compiled module (dynamo's eager backend here: the
    same graph capture as inductor without a C++ build), with the same images as uncompiled."""
    import torch

    from ditforge.sample import SampleOptions
    from ditforge.sample_bulk import sample_npz

    calls = []
    real_compile = torch.compile

    def spy(model, **kw):
        compiled = real_compile(model, backend="eager")
        compiled.register_forward_pre_hook(lambda *_: calls.append(1))
        return compiled

    monkeypatch.setattr(torch, "compile", spy)
    base = dict(checkpoint=str(trained_run), num_samples=12, steps=5, batch_size=4, shard_size=4, precision="fp32")
    plain = sample_npz(SampleOptions(**base, out=str(tmp_path / "plain.npz")))
    assert not calls
    compiled = sample_npz(SampleOptions(**base, out=str(tmp_path / "compiled.npz"), compile=True))
    assert len(calls) == 3 * 5  # 3 batches x 5 steps; the guided and unguided halves share each call
    a, b = np.load(plain.summary["out"]), np.load(compiled.summary["out"])
    assert np.array_equal(a["labels"], b["labels"]) and np.abs(a["arr_0"].astype(int) - b["arr_0"].astype(int)).max() <= 1
