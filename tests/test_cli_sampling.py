"""`--sampler`, `--spacing` and `--cfg-interval` through the real commands, on a tiny trained run."""

import json

import numpy as np
import pytest
from PIL import Image

from conftest import TINY_TRAIN, run_cli


def test_sample_grid_with_each_solver_is_deterministic(trained_run, tmp_path):
    args = ["sample", str(trained_run), "--classes", "1", "4", "--per-class", "3", "--steps", "6", "--cfg", "2"]
    out = run_cli(*args, "--sampler", "dpm++2m", "--out", str(tmp_path / "a.png")).stdout
    assert "6 DPM++2M steps" in out
    run_cli(*args, "--sampler", "dpm++2m", "--out", str(tmp_path / "b.png"))
    out = run_cli(*args, "--sampler", "unipc", "--spacing", "time", "--cfg-interval", "0", "0.5", "--out", str(tmp_path / "c.png")).stdout
    assert "6 UNIPC steps, guided for t/T in [0, 0.5], seed 0" in out  # the report names the interval
    a, b, c = (np.asarray(Image.open(tmp_path / f"{n}.png")) for n in "abc")
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_bulk_npz_and_eval_with_a_solver(trained_run, tmp_path):
    npz = tmp_path / "s.npz"
    out = run_cli("sample", str(trained_run), "--num-samples", "8", "--sampler", "unipc", "--steps", "4", "--cfg", "1.5",
                  "--cfg-interval", "0.1", "0.9", "--batch-size", "4", "--shard-size", "8", "--out", str(npz)).stdout
    assert "4 UNIPC steps, guided for t/T in [0.1, 0.9], seed 0" in out
    with np.load(npz) as f:
        assert f["arr_0"].shape == (8, 8, 8, 3) and f["arr_0"].dtype == np.uint8
    out = run_cli("eval", str(trained_run), "--per-class", "2", "--steps", "4", "--sampler", "dpm++2m",
                  "--spacing", "time", "--json", str(tmp_path / "e.json")).stdout
    assert "4 DPM++2M steps (time spacing)" in out
    report = json.loads((tmp_path / "e.json").read_text())
    assert report["sampler"] == "dpm++2m" and report["spacing"] == "time"
    # the report's numbers recomputed here from the samples of the same solver and spacing: eval
    # judged those samples (a Frechet distance moves with any change of a sample)
    from ditforge.data.sources import load_data
    from ditforge.evaluation.builtin import DigitJudge
    from ditforge.metrics.statistics import feature_statistics, frechet_distance
    from ditforge.sampling.generate import generate
    from ditforge.sampling.load import load_for_sampling

    sm = load_for_sampling(trained_run)
    x, y = generate(sm.model, list(range(10)), 2, 1.5, 4, "dpm++2m", 0, sm.objective, spacing="time",
                    precision=report["sampling_precision"])
    judge = DigitJudge(load_data("digits", "train"))
    assert report["class_accuracy"] == float((judge.predict(x) == y.numpy()).mean())
    ref = feature_statistics(judge.features(load_data("digits", "heldout").images))
    assert report["fd_generated"] == pytest.approx(frechet_distance(*feature_statistics(judge.features(x)), *ref), rel=1e-6)


def test_training_previews_use_the_configured_sampler(tmp_path):
    run = tmp_path / "r"
    run_cli("train", "--run-dir", str(run), "--steps", "2", "--sample-sampler", "dpm++2m", *TINY_TRAIN)
    assert json.loads((run / "config.json").read_text())["sample_sampler"] == "dpm++2m"
    assert (run / "samples" / "step-0000002.png").is_file()
    bad = run_cli("train", "--run-dir", str(tmp_path / "q"), "--sample-sampler", "euler", *TINY_TRAIN, check=False)
    assert bad.returncode == 2 and "sample_sampler 'euler' does not sample a diffusion-objective model" in bad.stderr


def test_bad_guidance_interval_is_one_line(trained_run, tmp_path):
    p = run_cli("sample", str(trained_run), "--cfg-interval", "0.8", "0.2", "--out", str(tmp_path / "x.png"), check=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    lines = [l for l in p.stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and "0 <= LO <= HI <= 1" in lines[0], p.stderr
    assert not (tmp_path / "x.png").exists()
