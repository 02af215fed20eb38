"""What a user sees when something goes wrong: their mistake is one line and exit 2, before
anything is computed or written; a bug of ours is its traceback and exit 3; a broken image
file is skipped, an error of ours in reading images is not."""

import json
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import TINY_TRAIN, cpu_env, run_cli
from test_cli import _user_error
from ditforge import cli
from ditforge.data.sources import list_image_folder, load_image_folder, open_image
from ditforge.errors import UnreadableImage


@pytest.mark.parametrize("size", ["0", "-1"])
def test_sample_batch_size_must_be_positive(trained_run, tmp_path, size):
    out = tmp_path / "g.png"
    _user_error(run_cli("sample", str(trained_run), "--batch-size", size, "--out", str(out), check=False),
                "batch size must be a positive number", size)
    assert not out.exists()


def test_preview_steps_beyond_the_diffusion_steps_fail_before_training(tmp_path):
    run = tmp_path / "r"
    proc = run_cli("train", "--run-dir", str(run), "--diffusion-steps", "30", "--sample-steps", "50", *TINY_TRAIN, check=False)
    _user_error(proc, "sample_steps", "diffusion_steps = 30", "'50'")
    assert not run.exists()  # nothing trained, nothing written
    short = ("--diffusion-steps", "12", "--noise-schedule", "cosine")  # the linear schedule needs T >= 20
    _user_error(run_cli("train", "--run-dir", str(run), "--diffusion-steps", "12", *TINY_TRAIN, check=False),
                "diffusion_steps 12 is too few for the linear schedule", "--noise-schedule cosine")
    ok = run_cli("train", "--run-dir", str(run), *short, "--steps", "2", *TINY_TRAIN)
    assert "trained DiT-Ti/4 to step 2" in ok.stdout  # the default steps: the chain's 12 where it is shorter than 20
    assert json.loads((run / "config.json").read_text())["sample_steps"] == "12"


@pytest.mark.parametrize("key", ["data", "optimizer", "model_args"])
def test_damaged_state_json_is_one_line(trained_run, tmp_path, key):
    run = tmp_path / "run"
    shutil.copytree(trained_run / "checkpoints" / "step-0000030", run / "checkpoints" / "step-0000030")
    shutil.copy(trained_run / "config.json", run / "config.json")
    path = run / "checkpoints" / "step-0000030" / "state.json"
    state = json.loads(path.read_text())
    del state[key]
    path.write_text(json.dumps(state))
    if key != "optimizer":  # sampling does not read the optimizer
        _user_error(run_cli("sample", str(run), "--out", str(tmp_path / "g.png"), check=False), repr(key), "is missing")
    if key != "model_args":  # resuming does not read it from state.json
        resumed = run_cli("train", "--run-dir", str(run), "--steps", "40", "--ckpt-every", "15", *TINY_TRAIN, check=False)
        if key == "optimizer":
            _user_error(resumed, repr(key), "is missing")
        else:  # an entry that resuming does not read: state.json's own checksum sees the change (test_verify.py)
            _user_error(resumed, "state.json", "checksum mismatch", "every checkpoint")


def test_a_truncated_config_json_is_recovered_from_the_checkpoint(trained_run, tmp_path):
    """What a kill inside the old in-place write of config.json left (every start rewrote it):
    half a JSON file beside a whole checkpoint. The run resumes with the config the checkpoint
    records (it holds the whole resolved config) and config.json is whole again. It was exit 3."""
    run = tmp_path / "run"
    shutil.copytree(trained_run / "checkpoints" / "step-0000030", run / "checkpoints" / "step-0000030")
    whole = (trained_run / "config.json").read_text()
    (run / "config.json").write_text(whole[: len(whole) // 2])
    proc = run_cli("train", "--run-dir", str(run), "--steps", "31", "--ckpt-every", "15", "--sample-steps", "2", *TINY_TRAIN,
                   check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stdout and f"{run / 'config.json'} is damaged" in proc.stdout
    saved = json.loads((run / "config.json").read_text())
    assert dict(saved, run_dir=None, steps=None, sample_steps=None) == dict(json.loads(whole), run_dir=None, steps=None, sample_steps=None)
    assert saved["steps"] == 31


def test_a_truncated_config_json_without_a_checkpoint_is_one_line(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text('{"data": "digits", "run_dir": ')
    code = cli.main(["train", "--run-dir", str(run), *TINY_TRAIN])
    err = capsys.readouterr().err
    assert code == cli.EXIT_USER_ERROR and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert f"{run / 'config.json'}" in err and "delete it" in err


def test_unwritable_output_fails_before_sampling(trained_run):
    proc = run_cli("sample", str(trained_run), "--out", "/proc/x.png", "--steps", "250", check=False)
    _user_error(proc, "cannot write '/proc/x.png'")
    assert "DDPM" not in proc.stdout  # nothing was sampled


def test_a_bug_of_ours_shows_its_traceback_and_exit_3(trained_run, tmp_path, monkeypatch, capsys):
    """An error that no check of ours anticipated (here the tensor reader fails in a way it
    never does for a bad file) is a bug: traceback, a request to report it, exit 3."""
    import safetensors.torch

    def broken(*args, **kwargs):
        raise RuntimeError("simulated failure inside the tensor reader")

    monkeypatch.setattr(safetensors.torch, "load_file", broken)
    monkeypatch.setattr("ditforge.train.checkpoint.load_file", broken)
    code = cli.main(["sample", str(trained_run), "--out", str(tmp_path / "g.png")])
    err = capsys.readouterr().err
    assert code == cli.EXIT_BUG == 3
    assert "Traceback" in err and "simulated failure inside the tensor reader" in err
    assert "bug in ditforge" in err.strip().splitlines()[-1]


def test_a_value_error_of_ours_is_not_a_user_error(tmp_path, capsys, monkeypatch):
    """ValueError used to mean 'the user's mistake' (exit 2), so internal bugs such as the
    H200's device error looked like one. Now only UserError does."""
    import ditforge.train.distributed as distributed

    def bug():
        raise ValueError("Expected a torch.device with a specified index or an integer, but got:cuda")

    monkeypatch.setattr(distributed, "local_device", bug)
    code = cli.main(["train", "--run-dir", str(tmp_path / "r"), *TINY_TRAIN])
    assert code == 3 and "Traceback" in capsys.readouterr().err


@pytest.mark.parametrize("command, hint", [("train", "--grad-accum"), ("bench", "--batch")])
def test_gpu_out_of_memory_is_the_settings_not_a_bug(tmp_path, capsys, monkeypatch, command, hint):
    """The GPU's out-of-memory error (DiT-XL/2 at batch 256 without recompute on an 80 GB H100,
    2026-11-27) is the size the user asked for: one message with torch's figures and the
    command's own options that need less memory, exit 2, no traceback."""
    import torch

    import ditforge.train.distributed as distributed

    def full(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError(
            "CUDA out of memory. Tried to allocate 288.00 MiB. GPU 0 has a total capacity of 79.18 GiB of which "
            "140.19 MiB is free. Including non-PyTorch memory, this process has 79.03 GiB memory in use.")

    monkeypatch.setattr(distributed, "local_device", full)
    argv = {"train": ["train", "--run-dir", str(tmp_path / "r"), *TINY_TRAIN], "bench": ["bench", "--model", "DiT-Ti/4"]}
    code = cli.main(argv[command])
    err = capsys.readouterr().err
    assert code == cli.EXIT_USER_ERROR == 2 and "Traceback" not in err
    assert err.startswith(f"ditforge {command}: error: CUDA out of memory. Tried to allocate 288.00 MiB.")
    assert "140.19 MiB is free." in err and "non-PyTorch" not in err and hint in err and "bug" not in err


def _folder(tmp_path):
    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        for i in range(2):
            Image.fromarray(np.full((12, 12), 40 * i + 100 * (c == "b"), np.uint8), "L").save(tmp_path / c / f"{i}.png")
    (tmp_path / "b" / "truncated.png").write_bytes((tmp_path / "b" / "0.png").read_bytes()[:40])
    (tmp_path / "b" / "notes.png").write_text("not an image")
    return tmp_path


def test_broken_files_are_skipped_and_named(tmp_path):
    root = _folder(tmp_path)
    images = load_image_folder(root, image_size=8)
    assert images.images.shape == (4, 1, 8, 8)
    assert sorted(f.split("/")[-1] for f, _ in images.skipped) == ["notes.png", "truncated.png"]
    with pytest.raises(UnreadableImage, match="UnidentifiedImageError"):
        open_image(root / "b" / "notes.png")
    with pytest.raises(UnreadableImage):
        open_image(root / "b" / "truncated.png")


def test_an_error_of_ours_while_reading_images_is_not_taken_for_broken_files(tmp_path, monkeypatch):
    """Only the decoder's errors mean 'unreadable file'. A fault injected after decoding (in
    the crop, which every good image goes through) must surface, not skip every image as
    the old `except ValueError` around the whole reader did."""
    import ditforge.data.sources as sources
    from ditforge.metrics.images import iter_folder_images

    root = _folder(tmp_path)

    def faulty_crop(image, size):
        raise ValueError("injected fault after decoding")

    monkeypatch.setattr(sources, "center_crop_arr", faulty_crop)
    with pytest.raises(ValueError, match="injected fault"):
        load_image_folder(root, image_size=8)
    items = list_image_folder(root)
    with pytest.raises(ValueError, match="injected fault"):
        items.load(next(i for i in items.items if i.endswith("0.png")), 8, "center")
    with pytest.raises(ValueError, match="injected fault"):
        next(iter_folder_images(root, image_size=8))


def test_a_crash_in_native_code_prints_where_the_command_was():
    """A fatal signal in native code (a segfaulting gloo collective under torchrun, here a read of
    address 0 where the command's work would run) kills the process before any handler of ours:
    what it leaves is every thread's Python stack on stderr, down to the command's frame."""
    crash = ("import ctypes, sys; from ditforge import cli\n"
             "def work(args): ctypes.string_at(0)  # the command's work, crashing in C\n"
             "cli.COMMANDS['bench'] = work\n"
             "sys.exit(cli.main(['bench']))")
    env = {k: v for k, v in cpu_env().items() if k != "PYTHONFAULTHANDLER"}  # as a user's shell has it
    proc = subprocess.run([sys.executable, "-c", crash], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGSEGV, proc.returncode
    assert "Segmentation fault" in proc.stderr, proc.stderr
    assert 'line 2 in work' in proc.stderr and "in main" in proc.stderr, proc.stderr
