"""End-to-end runs of the real `ditforge` commands, as a user types them."""

import json
import re
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import TINY_TRAIN, cpu_env, run_cli


def _user_error(proc, *needles):
    """Exit 2, one line on stderr naming the problem, no traceback."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = [l for l in proc.stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1, proc.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])


def test_help_documents_every_option_with_default():
    top = run_cli("--help").stdout
    assert "train" in top and "sample" in top and "eval" in top
    for cmd in ("train", "sample", "eval"):
        text = run_cli(cmd, "--help").stdout
        options = [l.split()[0] for l in text.splitlines() if l.strip().startswith("--") and l.strip() != "--help"]
        assert options, text
    train_help = " ".join(run_cli("train", "--help").stdout.split())  # undo argparse's line wrapping
    assert "(default: DiT-Ti/2)" in train_help and "(default: 0.001)" in train_help
    sample_help = " ".join(run_cli("sample", "--help").stdout.split())
    assert "(default: 4.0;" in sample_help and "(default: 20; flow: 20; meanflow: 1)" in sample_help
    assert "meanflow: 1) (default: None)" not in sample_help  # the help's own default text, not argparse's too


def test_train_writes_checkpoint_logs_and_preview(trained_run):
    ckpts = sorted(p.name for p in (trained_run / "checkpoints").iterdir())
    assert ckpts == ["step-0000015", "step-0000030"]
    state = json.loads((trained_run / "checkpoints" / "step-0000030" / "state.json").read_text())
    assert state["step"] == 30 and state["position"] == 30 * 16
    assert state["config"]["model"]["name"] == "DiT-Ti/4"
    assert state["data"]["class_names"] == [str(i) for i in range(10)]
    assert json.loads((trained_run / "config.json").read_text()) == state["config"]
    assert any(p.name.startswith("events.out.tfevents") for p in (trained_run / "tensorboard").iterdir())
    assert (trained_run / "samples" / "step-0000030.png").is_file()


def test_train_log_line_has_loss_and_throughput(tmp_path):
    out = run_cli("train", "--run-dir", str(tmp_path / "r"), "--steps", "5", "--eval-every", "5", "--eval-per-class", "2", *TINY_TRAIN).stdout
    line = next(l for l in out.splitlines() if "step 5/5" in l)
    assert "loss" in line and "steps/s" in line and "images/s" in line
    assert "step 5 | quality (digits" in out and "class accuracy" in out  # --eval-every


def test_sample_grid_is_deterministic_and_labelled(trained_run, tmp_path):
    args = ["sample", str(trained_run), "--classes", "3", "5", "7", "--per-class", "4", "--steps", "10"]
    run_cli(*args, "--seed", "0", "--out", str(tmp_path / "a.png"))
    run_cli(*args, "--seed", "0", "--out", str(tmp_path / "b.png"), "--sampler", "dpm++2m-sde")  # the default, named
    run_cli(*args, "--seed", "1", "--out", str(tmp_path / "c.png"))
    run_cli(*args, "--sampler", "ddim", "--cfg", "1.0", "--out", str(tmp_path / "d.png"))
    a, b, c = (np.asarray(Image.open(tmp_path / f"{n}.png")) for n in "abc")
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    rows_a = (a.shape[0] - 2) // (8 * 6 + 2)  # 8 px digits zoomed 6x plus padding
    assert rows_a == 3
    assert (tmp_path / "d.png").is_file()


def test_eval_reports_accuracy_and_frechet_distance(trained_run, tmp_path):
    out = run_cli("eval", str(trained_run), "--per-class", "5", "--steps", "5", "--json", str(tmp_path / "e.json")).stdout
    assert "class accuracy" in out and "Frechet distance" in out and "cfg 1.5" in out
    report = json.loads((tmp_path / "e.json").read_text())
    from ditforge.data.sources import load_data  # the class accuracy recomputed here from the same 50 samples
    from ditforge.evaluation.builtin import DigitJudge
    from ditforge.sampling.generate import generate
    from ditforge.sampling.load import load_for_sampling

    sm = load_for_sampling(trained_run)
    x, y = generate(sm.model, list(range(10)), 5, 1.5, 5, None, 0, sm.objective, precision=report["sampling_precision"])
    assert report["class_accuracy"] == float((DigitJudge(load_data("digits", "train")).predict(x) == y.numpy()).mean())
    assert report["heldout_accuracy"] > 0.95  # the judge itself is good
    assert report["fd_real"] < report["fd_generated"]  # 30 steps of training are not enough


def test_official_flat_state_dict_samples_with_model_name(trained_run, tmp_path):
    ema = load_file(str(trained_run / "checkpoints" / "step-0000030" / "ema.safetensors"))
    torch.save(ema, tmp_path / "official.pt")
    out = tmp_path / "o.png"
    run_cli("sample", str(tmp_path / "official.pt"), "--model", "DiT-Ti/4", "--steps", "5", "--per-class", "2", "--out", str(out))
    assert out.is_file()
    _user_error(run_cli("sample", str(tmp_path / "official.pt"), "--out", str(out), check=False), "--model")
    _user_error(
        run_cli("sample", str(tmp_path / "official.pt"), "--model", "DiT-Ti/2", "--out", str(out), check=False),
        "do not fit the model",
    )


def test_bad_inputs_are_one_line_errors(trained_run, tmp_path):
    out = str(tmp_path / "x.png")
    _user_error(run_cli("train", "--model", "DiT-Q/3", "--run-dir", str(tmp_path / "q"), check=False), "DiT-Q/3", "DiT-XL/2")
    _user_error(run_cli("train", "--steps", "0", "--run-dir", str(tmp_path / "q"), check=False), "steps", "0")
    _user_error(run_cli("train", "--data", str(tmp_path / "none"), "--run-dir", str(tmp_path / "q"), check=False), "none")
    _user_error(run_cli("sample", str(trained_run), "--classes", "3", "12", "--out", out, check=False), "12", "0..9")
    _user_error(run_cli("sample", str(trained_run), "--steps", "0", "--out", out, check=False), "steps", "0")
    _user_error(run_cli("sample", str(tmp_path / "missing"), "--out", out, check=False), "missing", "does not exist")
    _user_error(run_cli("sample", str(trained_run), "--model", "DiT-S/2", "--out", out, check=False), "DiT-Ti/4", "DiT-S/2")
    _user_error(run_cli("sample", str(trained_run), "--out", "/nonexistent-dir/x.png", check=False), "/nonexistent-dir")
    _user_error(run_cli("sample", str(tmp_path), "--out", out, check=False), "no checkpoints")
    # a run folder is resumed only with the same settings
    _user_error(run_cli("train", "--run-dir", str(trained_run), "--model", "DiT-Ti/2", "--no-progress", check=False), "model", "--run-dir")
    assert not os.path.exists(out)


def test_corrupt_checkpoint_is_reported(trained_run, tmp_path):
    broken = tmp_path / "broken"
    subprocess.run(["cp", "-r", str(trained_run / "checkpoints" / "step-0000030"), str(broken)], check=True)
    (broken / "ema.safetensors").write_bytes(b"\x00" * 10)
    _user_error(run_cli("sample", str(broken), "--out", str(tmp_path / "x.png"), check=False), "ema.safetensors", "corrupt")


@pytest.mark.parametrize("lr", ["1e3", "1e39"])
def test_nan_loss_stops_and_names_the_last_checkpoint_with_finite_weights(tmp_path, lr):
    """lr 1e3: the loss overflows in the third step, after two checkpoints, which are kept and the
    later one named. lr 1e39 (beyond float32): the first update makes the weights Inf while its
    loss, computed before it, was finite; that checkpoint used to be written and named "last
    good" (the loss check alone cannot see it); now the weights are checked and it is refused."""
    from ditforge.train.checkpoint import list_checkpoints

    run = tmp_path / "nan"
    proc = run_cli("train", "--run-dir", str(run), "--steps", "4", "--ckpt-every", "1", "--lr", lr, *TINY_TRAIN, check=False)
    assert proc.returncode == 1, proc.stderr
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and "NaN or Inf" in lines[0] and "Traceback" not in proc.stderr, proc.stderr
    kept = list_checkpoints(run)
    for ckpt in kept:  # every checkpoint on disk holds finite weights, the EMA's too
        for name in ("model", "ema"):
            assert all(torch.isfinite(t).all() for t in load_file(str(ckpt / f"{name}.safetensors")).values()), (ckpt, name)
    if lr == "1e3":  # diverged after its checkpoints: the message names the last one, exactly
        assert kept, proc.stderr  # (steps 1 and 2 on the machines tried)
        assert f"The last good checkpoint is {kept[-1]}." in lines[0]
    else:
        assert kept == [] and "No checkpoint had been written" in lines[0] and "weights" in lines[0]


def test_image_folder_end_to_end(tmp_path):
    rng = np.random.default_rng(0)
    for cls, base in (("dark", 40), ("light", 200)):
        for i in range(6):
            arr = np.clip(base + rng.integers(-20, 20, (12, 12, 3)), 0, 255).astype(np.uint8)
            (tmp_path / "imgs" / cls).mkdir(parents=True, exist_ok=True)
            Image.fromarray(arr).save(tmp_path / "imgs" / cls / f"{i}.png")
    (tmp_path / "imgs" / "light" / "truncated.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    run = tmp_path / "run"
    proc = run_cli("train", "--data", str(tmp_path / "imgs"), "--image-size", "8", "--run-dir", str(run), "--steps", "3", *TINY_TRAIN)
    assert "skipped 1 unreadable image" in proc.stdout + proc.stderr
    run_cli("sample", str(run), "--steps", "3", "--per-class", "2", "--out", str(tmp_path / "g.png"))
    assert Image.open(tmp_path / "g.png").mode == "RGB"


def _tensors(ckpt):
    return {f: load_file(str(ckpt / f)) for f in ("model.safetensors", "ema.safetensors", "optimizer.safetensors")}


def test_sigkill_then_rerun_equals_uninterrupted_run(tmp_path):
    args = ["--steps", "24", "--ckpt-every", "6", "--keep-last", "0", *TINY_TRAIN]
    run_cli("train", "--run-dir", str(tmp_path / "straight"), *args)

    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, "-m", "ditforge", "train", "--run-dir", str(killed), *args],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=cpu_env(OMP_NUM_THREADS="2"),
    )
    deadline = time.time() + 300
    while not (killed / "checkpoints" / "step-0000012").exists():
        assert proc.poll() is None and time.time() < deadline, "training ended before it could be killed"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "checkpoints" / "step-0000024").exists()

    resumed = run_cli("train", "--run-dir", str(killed), *args).stdout
    assert "resumed from" in resumed
    a, b = _tensors(tmp_path / "straight" / "checkpoints" / "step-0000024"), _tensors(killed / "checkpoints" / "step-0000024")
    for f in a:
        assert a[f].keys() == b[f].keys()
        for k in a[f]:
            assert torch.equal(a[f][k], b[f][k]), (f, k)


def test_lightning_preset_trains_with_its_cosine_loss_and_samples(tmp_path):
    """The LightningDiT recipe end to end on a DiT-Ti (its sizes are too big here): modern blocks,
    flow with logit-normal times and the cosine term, no learned sigma, then Euler sampling."""
    run = tmp_path / "lt"
    log = run_cli("train", "--preset", "LightningDiT-B/2", "--model", "DiT-Ti/4", "--run-dir", str(run), "--steps", "2",
                  "--batch-size", "8", "--log-every", "1", "--sample-steps", "4", "--ckpt-every", "2", "--no-progress")
    cosine = [float(m) for m in re.findall(r"\| cosine (\S+)", log.stdout + log.stderr)]
    # logged each step: mean of 1 - cos. Step 1's prediction is 0 (zero-initialised final layer): cos 0, term 1
    assert len(cosine) == 2 and cosine[0] == 1.0 and cosine[1] != 1.0
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["flow"]["cosine_weight"] == 1.0 and cfg["model"]["norm"] == "rms" and cfg["optim"]["betas"] == [0.9, 0.95]
    assert cfg["sample_sampler"] == "euler" and (run / "samples" / "step-0000002.png").is_file()  # the final preview
    out = run_cli("sample", str(run), "--sampler", "euler", "--steps", "3", "--cfg-interval", "0", "0.89",
                  "--classes", "1", "--per-class", "1", "--out", str(tmp_path / "g.png")).stdout
    assert "EULER" in out and (tmp_path / "g.png").is_file()
