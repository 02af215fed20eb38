"""`ditforge eval RUN` for any labelled data: the judge, per-class accuracy, FID against held-out."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from conftest import run_cli
from ditforge.data.sources import load_data, to_uint8
from ditforge.evaluation.judge import load_judge, score_heldout, train_judge


def _digits_folder(root):
    """scikit-learn's 1,797 8x8 digits as greyscale PNG files in class folders."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    for i, (im, t) in enumerate(zip(bunch.images, bunch.target)):
        d = root / f"digit{t}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray((im * 255 / 16).round().astype(np.uint8), "L").save(d / f"{i:04d}.png")
    return root


def _levels_folder(root, per_class=40):
    """2 classes an 8x8 DiT learns in a few dozen steps: noisy flat grey levels 20 and 235."""
    rng = np.random.default_rng(0)
    for c, level in enumerate((20, 235)):
        d = root / f"c{c}"
        d.mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(np.clip(rng.normal(level, 8, (8, 8)), 0, 255).astype(np.uint8), "L").save(d / f"{i:02d}.png")
    (root / "c0" / "broken.png").write_text("not an image")
    return root


def test_judge_reads_real_held_out_digits_and_is_cached(tmp_path):
    folder = _digits_folder(tmp_path / "digits")
    train, held = load_data(str(folder), "train"), load_data(str(folder), "heldout")
    assert len(train) + len(held) == 1797 and len(held) == 359  # the split training uses: 20% of each class
    judge = train_judge(train.images, train.labels, 10, "key")
    score_heldout(judge, held.images, held.labels)
    assert judge.info.heldout_accuracy > 0.9
    assert len(judge.info.heldout_per_class) == 10 and min(judge.info.heldout_per_class) > 0.7
    judge.save(tmp_path / "cache")
    again = load_judge(tmp_path / "cache", "key", 10, 1)
    assert np.array_equal(again.predict(held.images), judge.predict(held.images))
    assert again.info.heldout_accuracy == judge.info.heldout_accuracy
    assert load_judge(tmp_path / "cache", "other data", 10, 1) is None  # another run's data: retrain


@pytest.fixture(scope="module")
def levels_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("levels")
    folder = _levels_folder(root / "levels")
    run = root / "run"
    out = run_cli("train", "--data", str(folder), "--run-dir", str(run), "--steps", "60", "--batch-size", "32",
                  "--log-every", "20", "--no-progress").stdout
    return run, out


def _tamper(run, bad: int, like: int):
    """Overwrite class `bad`'s label embedding with class `like`'s in the EMA weights that eval reads."""
    ckpt = run / "checkpoints" / "step-0000060"
    path = ckpt / "ema.safetensors"
    weights = load_file(str(path))
    table = weights["y_embedder.embedding_table.weight"]
    table[bad] = table[like]
    save_file(weights, str(path))
    from ditforge.checksums import record_file
    from ditforge.train.checkpoint import dump_state

    state = json.loads((ckpt / "state.json").read_text())  # a checkpoint written so: its own record of the file
    state["files"]["ema.safetensors"] = record_file(path)
    (ckpt / "state.json").write_text(dump_state(state))


def test_eval_of_a_folder_run_shows_a_class_drawn_badly(levels_run, tmp_path):
    run, train_out = levels_run
    assert "chose model DiT-Ti/2" in train_out  # the defaults are printed (--model was left out)
    assert "over the first steps" in train_out and "about" in train_out  # the duration estimate
    args = ["eval", str(run), "--per-class", "16", "--steps", "20", "--cfg", "4", "--no-fid"]
    good = run_cli(*args, "--json", str(tmp_path / "good.json"))
    report = json.loads((tmp_path / "good.json").read_text())
    assert report["heldout_accuracy"] == 1.0  # grey levels: the judge reads every real held-out image
    assert report["class_accuracy"] > 0.8 and report["accuracy_ratio"] == pytest.approx(report["class_accuracy"])
    assert [c["name"] for c in report["classes"]] == ["c0", "c1"]
    assert "held-out split: 20% of each class" in report["note"] and report["fid"] is None
    assert "class accuracy" in good.stdout and "mostly read as" in good.stdout
    weights_time = (run / "judge" / "judge.safetensors").stat().st_mtime_ns

    _tamper(run, bad=1, like=0)  # class 1 now gets class 0's embedding: it is drawn as class 0
    run_cli(*args, "--json", str(tmp_path / "bad.json"))
    bad = json.loads((tmp_path / "bad.json").read_text())
    per = {c["name"]: c for c in bad["classes"]}
    assert per["c1"]["samples"] < 0.2 and per["c1"]["read_as"] == "c0"
    assert per["c1"]["heldout"] == 1.0  # the judge itself still reads real c1 images
    assert per["c0"]["samples"] == report["classes"][0]["samples"]  # same noise, same weights for class 0
    assert bad["class_accuracy"] < report["class_accuracy"] - 0.3
    assert (run / "judge" / "judge.safetensors").stat().st_mtime_ns == weights_time  # the cached judge


def test_eval_fid_against_the_held_out_split(levels_run, tmp_path):
    run, _ = levels_run
    run_cli("eval", str(run), "--per-class", "4", "--steps", "5", "--json", str(tmp_path / "r.json"))
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["num_heldout"] == 16 and np.isfinite(r["fid"]) and r["fid"] >= 0 and np.isfinite(r["fid_real"])
    assert (run / "judge" / "heldout_inception.npz").is_file()  # cached for the next evaluation
    assert json.loads((run / "judge" / "judge.json").read_text())["fid_real"]["count"] == 8

    # precision and recall recomputed here from the same 8 samples and the real held-out split
    from ditforge.metrics import InceptionFeatures
    from ditforge.metrics.reference import load_reference
    from ditforge.objectives import default_sampler
    from ditforge.sampling.generate import generate
    from ditforge.sampling.load import load_for_sampling

    sm = load_for_sampling(run)
    x, _ = generate(sm.model, [0, 1], 4, 1.5, 5, default_sampler(sm.objective), 0, sm.objective,
                    precision=r["sampling_precision"])
    held = load_data(json.loads((run / "config.json").read_text())["data"], "heldout")
    inception = InceptionFeatures(None, batch_size=64)
    fake, real = (inception(_rgb_uint8(images))["pool"].astype(np.float64) for images in (x, held.images))
    assert np.allclose(load_reference(run / "judge" / "heldout_inception.npz").pool, real, atol=1e-4)
    assert (r["precision"], r["recall"]) == _precision_recall(real, fake, k=3)
    assert r["data_changed"] is False  # trained on this folder as it is now


def _rgb_uint8(images):
    """(N, 1, H, W) in [-1, 1] -> (N, H, W, 3) uint8, the ADM evaluator's mapping."""
    x = (127.5 * images + 128).clamp(0, 255).to(torch.uint8)
    return x.repeat(1, 3, 1, 1).permute(0, 2, 3, 1).numpy()


def _precision_recall(real, fake, k):
    """Kynkaanniemi et al. 2019 from their definition, in float64: a sample counts for precision if
    it lies within the k-th nearest neighbour distance of some real image, a real image for recall
    if within that of some sample."""
    from scipy.spatial.distance import cdist

    def radii(x):
        return np.sort(cdist(x, x), axis=1)[:, k]  # column 0: the point itself

    d = cdist(real, fake)  # (real, fake)
    return float((d <= radii(real)[:, None]).any(0).mean()), float((d <= radii(fake)[None, :]).any(1).mean())


def test_eval_every_logs_the_judge_for_a_folder(tmp_path):
    folder = _levels_folder(tmp_path / "levels", per_class=10)
    out = run_cli("train", "--data", str(folder), "--run-dir", str(tmp_path / "r"), "--steps", "4", "--batch-size", "8",
                  "--model", "DiT-Ti/4", "--precision", "fp32", "--objective", "diffusion", "--log-every", "2", "--eval-every", "4",
                  "--eval-per-class", "2", "--no-progress", "--norm", "layer", "--mlp", "gelu", "--no-rope", "--no-qk-norm",
                  "--lr", "1e-3").stdout
    assert "chose" not in out  # model, precision, objective, blocks, batch, lr and steps given: nothing chosen
    line = next(l for l in out.splitlines() if "step 4 | quality" in l)
    assert "class accuracy" in line and "judge on real held-out" in line and "FID" not in line  # FID is opt-in
    assert (tmp_path / "r" / "judge" / "judge.json").is_file()


def _add_levels(folder, cls, level, count, start):
    rng = np.random.default_rng(start)
    for i in range(start, start + count):
        Image.fromarray(np.clip(rng.normal(level, 8, (8, 8)), 0, 255).astype(np.uint8), "L").save(folder / cls / f"{i:02d}.png")


def test_eval_after_the_data_folder_changed_refreshes_its_caches_and_says_so(tmp_path):
    """The held-out split is taken by index over the folder's files: files added after training
    move it (held-out images the DiT trained on), so the cached judge and held-out statistics of
    the old split must not be reused, and the report says the data changed."""
    folder = _levels_folder(tmp_path / "levels", per_class=10)  # 20 images and broken.png: 21 files
    run = tmp_path / "run"
    run_cli("train", "--data", str(folder), "--run-dir", str(run), "--steps", "2", "--batch-size", "8", "--model", "DiT-Ti/4",
            "--precision", "fp32", "--objective", "diffusion", "--log-every", "2", "--no-progress")
    args = ["eval", str(run), "--per-class", "2", "--steps", "2"]
    first = run_cli(*args, "--json", str(tmp_path / "1.json"))
    r1 = json.loads((tmp_path / "1.json").read_text())
    judge_json, reference = run / "judge" / "judge.json", run / "judge" / "heldout_inception.npz"
    assert json.loads(judge_json.read_text())["train_count"] == 16 and r1["num_heldout"] == 4

    # unchanged data: the judge and the held-out statistics are reused as they are
    times = judge_json.stat().st_mtime_ns, (run / "judge" / "judge.safetensors").stat().st_mtime_ns, reference.stat().st_mtime_ns
    second = run_cli(*args, "--json", str(tmp_path / "2.json"))
    r2 = json.loads((tmp_path / "2.json").read_text())
    assert (judge_json.stat().st_mtime_ns, (run / "judge" / "judge.safetensors").stat().st_mtime_ns,
            reference.stat().st_mtime_ns) == times
    assert r2["fid"] == r1["fid"] and r2["heldout_accuracy"] == r1["heldout_accuracy"]

    old_train = {bytes(to_uint8(im).numpy()) for im in load_data(str(folder), "train").images}
    _add_levels(folder, "c0", 20, 5, start=10)  # 5 more c0 images: 26 files
    new_train, new_held = load_data(str(folder), "train"), load_data(str(folder), "heldout")
    assert any(bytes(to_uint8(im).numpy()) in old_train for im in new_held.images)  # the split moved
    third = run_cli(*args, "--json", str(tmp_path / "3.json"))
    r3 = json.loads((tmp_path / "3.json").read_text())
    info = json.loads(judge_json.read_text())
    assert (info["train_count"], info["heldout_count"]) == (len(new_train), len(new_held)) == (20, 5)  # judge retrained
    assert r3["judge"]["train_images"] == 20 and r3["num_heldout"] == 5  # held-out statistics of the new split
    assert info["fid_real"]["count"] == 4  # the floor recomputed for the new judge

    warning = ("the data folder changed since training: 21 files then, 26 now; "
               "the held-out split may include images the model trained on")
    assert r1["data_changed"] is False and r2["data_changed"] is False and r3["data_changed"] is True
    assert warning not in first.stdout + second.stdout and warning in third.stdout.splitlines()
    assert r3["data_warning"] == warning


def test_data_change_is_told_from_the_recorded_digest_or_an_old_checkpoints_count():
    from ditforge.evaluation.run_report import data_change

    now = {"digest": "b" * 64, "items": 26}
    recorded = dict(name="levels", count=16, identity={"digest": "a" * 64, "items": 21})
    assert data_change(recorded, now, 16, latent=False) == (
        True, "the data folder changed since training: 21 files then, 26 now; "
              "the held-out split may include images the model trained on")
    assert data_change(dict(recorded, identity=dict(now)), now, 20, latent=False) == (False, None)  # the digest decides
    old = dict(name="levels", count=16)  # a checkpoint from before the digest: its training image count
    assert data_change(old, now, 16, latent=False) == (False, None)
    assert data_change(old, now, 20, latent=False) == (
        True, "the data folder changed since training: 16 training images then, 20 now; "
              "the held-out split may include images the model trained on")
    assert data_change(dict(count=100, identity={"digest": "a" * 64, "items": 100}), {"digest": "c" * 64, "items": 120}, 96,
                       latent=True)[1].startswith("the latent store changed since training: 100 records then, 120 now")
    assert data_change(None, now, 16, latent=False) == (None, None)  # nothing recorded to compare with
