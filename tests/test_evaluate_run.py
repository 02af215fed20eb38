"""`ditforge eval RUN` for any labelled data: the judge, per-class accuracy, FID against held-out."""

import json

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file, save_file

from conftest import run_cli
from ditforge.data.sources import load_data
from ditforge.judge import load_judge, score_heldout, train_judge


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
    assert 0 <= r["precision"] <= 1 and 0 <= r["recall"] <= 1
    assert (run / "judge" / "heldout_inception.npz").is_file()  # cached for the next evaluation
    assert json.loads((run / "judge" / "judge.json").read_text())["fid_real"]["count"] == 8


def test_eval_every_logs_the_judge_for_a_folder(tmp_path):
    folder = _levels_folder(tmp_path / "levels", per_class=10)
    out = run_cli("train", "--data", str(folder), "--run-dir", str(tmp_path / "r"), "--steps", "4", "--batch-size", "8",
                  "--model", "DiT-Ti/4", "--precision", "fp32", "--objective", "diffusion", "--log-every", "2", "--eval-every", "4",
                  "--eval-per-class", "2", "--no-progress").stdout
    assert "chose" not in out  # model, precision, objective and steps given: nothing chosen
    line = next(l for l in out.splitlines() if "step 4 | quality" in l)
    assert "class accuracy" in line and "judge on real held-out" in line and "FID" not in line  # FID is opt-in
    assert (tmp_path / "r" / "judge" / "judge.json").is_file()
