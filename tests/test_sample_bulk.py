"""Bulk sampling to the ADM .npz format: streaming writer, shards, resume, any world size."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import cpu_env, run_cli
from ditforge.npz import NpzStreamWriter
from ditforge.sampling.bulk import sample_labels
from test_distributed import torchrun
from test_sampling import record_draws


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
    # one thread, as each torchrun rank has (test_distributed.torchrun): the same kernels on the same
    # data, so the floats, not only the bytes, are the same on any CPU ("Which comparisons are exact")
    out = subprocess.run([sys.executable, "-m", "ditforge", "sample", str(trained_run), *BULK, "--out", str(one)],
                         capture_output=True, text=True, timeout=600, env=cpu_env(OMP_NUM_THREADS="1"), check=True).stdout
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

    from ditforge.sampling.command import SampleOptions
    from ditforge.sampling.bulk import sample_npz

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
    # the eager backend runs the captured graph with the uncompiled model's own kernels, in the
    # same order: the same images bit for bit (inductor's own kernels: the slow test below)
    assert np.array_equal(a["labels"], b["labels"]) and np.array_equal(a["arr_0"], b["arr_0"])


def _tiny_sampling_model():
    """A DiT-Ti/4 on 8x8 grey images with random weights N(0, 0.02^2) (the adaLN and final-layer
    zero-init would make its output zero), in ditforge's sampling wrapper."""
    import torch

    from ditforge.models import create_model
    from ditforge.sampling.load import SamplingModel

    torch.manual_seed(0)
    model = create_model("DiT-Ti/4", input_size=8, in_channels=1, num_classes=10)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0.0, 0.02)
    return SamplingModel(model, [str(c) for c in range(10)], source="tiny")


def test_no_two_noise_streams_of_a_bulk_run_coincide(tmp_path, monkeypatch):
    """At batch size 1 with DDPM (noise at every step but the last), the starting noise of each
    sample and the step noise of each batch come from streams that never coincide: once sample
    i's step noise was sample i + 1's starting noise (seeds seed * 1_000_003 + b0 + 1 and + b0)."""
    import torch

    from ditforge.sampling.bulk import sample_to_npz

    draws = record_draws(monkeypatch)
    sample_to_npz(_tiny_sampling_model(), tmp_path / "x.npz", 6, cfg_scale=1.0, steps=3, sampler="ddpm",
                  batch_size=1, shard_size=2, progress=False)
    rows = [x.reshape(-1, 64) for x in draws]  # one 8x8 grey image a row
    firsts = [r[0] for r in rows]
    assert len(firsts) >= 6 * 3  # per sample: its starting noise, then two steps with noise
    same = [(j, i) for i in range(len(firsts)) for j in range(i) if torch.equal(firsts[i], firsts[j])]
    assert not same, f"these pairs of draws are the same noise: {same}"


def test_starting_noise_is_per_sample_so_a_deterministic_sampler_ignores_the_batch_size(tmp_path):
    """The starting noise of sample i is a function of (seed, i) alone: DDIM (no step noise) gives
    the same file at batch sizes 1, 2 and 4, up to the rounding of the network at another batch
    size (one grey level)."""
    from ditforge.sampling.bulk import sample_to_npz

    sm = _tiny_sampling_model()
    images = {}
    for b, seed in ((1, 3), (2, 3), (4, 3), (4, 4)):
        out = tmp_path / f"b{b}-s{seed}.npz"
        # random weights make samples of a few hundred; the "decoder" scales them into [-1, 1] so
        # that uint8 keeps their differences
        sample_to_npz(sm, out, 8, cfg_scale=1.5, steps=4, sampler="ddim", seed=seed, batch_size=b, shard_size=4,
                      decode=lambda x: x / 1000, progress=False)
        images[b, seed] = np.load(out)["arr_0"].astype(int)
    a = images[1, 3]
    assert ((a > 5) & (a < 250)).mean() > 0.9  # grey levels, not a saturated picture that would hide a change
    worst = {b: int(np.abs(images[b, 3] - a).max()) for b in (2, 4)}
    assert max(worst.values()) <= 1, worst
    assert np.abs(images[4, 4] - a).mean() > 10  # the check can fail: another seed, other pictures


def test_settings_of_another_run_fail_every_rank_with_one_line(trained_run, tmp_path):
    """Rank 0 finds shards of another sampling run in OUT.parts: every rank exits with the same
    error, printed once (rank 0's line; rank 1 exits silently), none is left waiting in a collective
    for rank 0 (which hung multi-node runs)."""
    out, parts, logs = tmp_path / "x.npz", tmp_path / "x.npz.parts", tmp_path / "logs"
    parts.mkdir()
    theirs = json.dumps({"source": "another run", "num_samples": 3}) + "\n"
    (parts / "settings.json").write_text(theirs)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--log-dir", str(logs),
           "--redirects", "3", "-m", "ditforge", "sample", str(trained_run), *BULK, "--out", str(out)]
    proc = subprocess.Popen(cmd, env=cpu_env(OMP_NUM_THREADS="1"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise AssertionError("torchrun sample did not end within 120 s: a rank waits for one that has left") from None
    assert proc.returncode != 0
    expected = f"ditforge sample: error: {str(parts)!r} holds shards of a different sampling run; delete it or choose another --out"
    per_rank = sorted(logs.glob("*/attempt_0/*/stderr.log"))
    assert len(per_rank) == 2, per_rank
    lines = [[line for line in log.read_text().splitlines() if line.strip()] for log in per_rank]
    assert sorted(lines) == [[], [expected]], lines
    assert (parts / "settings.json").read_text() == theirs and not out.exists()  # the other run's shards are kept


@pytest.mark.slow
def test_compile_with_inductor_gives_the_images_of_eager(trained_run, tmp_path):
    """`sample --compile --out X.npz` with the real backend (inductor: generated C++ on a CPU,
    Triton on a GPU) draws the samples of the uncompiled model.

    Tolerance, one grey level: inductor fuses the network's elementwise ops, layer norms and
    softmax into its own kernels, which evaluate the same math in another order (fused
    multiply-adds, vectorised reductions, a different exp), so each output differs from eager by
    float32 rounding, about 1e-6 relative. Five sampler steps carry that to about 1e-5 on a
    sample in [-1, 1]; the uint8 quantisation (x + 1) * 127.5 then rounds the two differently only
    where a pixel lies within that distance of a rounding boundary: 0 or 1 grey level, never 2."""
    from torch._dynamo.utils import counters

    from ditforge.sampling.command import SampleOptions
    from ditforge.sampling.bulk import sample_npz

    base = dict(checkpoint=str(trained_run), num_samples=8, steps=5, batch_size=4, shard_size=4, precision="fp32")
    plain = sample_npz(SampleOptions(**base, out=str(tmp_path / "plain.npz")))
    counters.clear()
    compiled = sample_npz(SampleOptions(**base, out=str(tmp_path / "compiled.npz"), compile=True))
    assert counters["stats"]["unique_graphs"] >= 1 and counters["inductor"]  # captured, and inductor built (or cached) it
    a, b = np.load(plain.summary["out"]), np.load(compiled.summary["out"])
    assert np.array_equal(a["labels"], b["labels"])
    diff = np.abs(a["arr_0"].astype(int) - b["arr_0"].astype(int))
    assert diff.max() <= 1 and (diff == 0).mean() > 0.99, (diff.max(), (diff == 0).mean())
