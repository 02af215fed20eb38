"""`ditforge export` as a user runs it: a latent run (the built-in digits extracted through a small
random `AutoencoderKL` folder) exported in the three formats, each read back by what reads it
(`DiTPipeline`, `read_official`, `ditforge sample / eval / export` on a hub folder)."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import run_cli

# a store gets the modern blocks by default (train/auto.py); the formats of others need the paper's
PAPER_BLOCKS = ("--norm", "layer", "--mlp", "gelu", "--no-rope", "--no-qk-norm")


@pytest.fixture(scope="module")
def latent_run(tmp_path_factory):
    """digits -> extract (random AutoencoderKL) -> a 2-step DiT-S/2 diffusion run, with a preview."""
    AutoencoderKL = pytest.importorskip("diffusers").AutoencoderKL
    root = tmp_path_factory.mktemp("export")
    torch.manual_seed(0)
    AutoencoderKL(
        block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=32, sample_size=32,
    ).save_pretrained(root / "vae")
    out = run_cli("extract", "--data", "digits", "--vae", str(root / "vae"), "--image-size", "32",
                  "--out", str(root / "store"), "--batch-size", "64", "--workers", "0", "--no-progress").stdout
    manifest = json.loads((root / "store" / "manifest.json").read_text())
    assert manifest["class_names"] == [str(c) for c in range(10)] and manifest["image_size"] == 32, out
    run = root / "run"
    run_cli("train", "--data", str(root / "store"), "--run-dir", str(run), "--model", "DiT-S/2", "--objective", "diffusion", "--steps", "2",
            "--batch-size", "8", "--ckpt-every", "2", "--sample-every", "2", "--sample-steps", "5", "--no-progress",
            *PAPER_BLOCKS)  # DiT's blocks, which DiTPipeline and the official code have
    return root, run


def test_extract_digits_through_a_vae_folder_writes_the_train_split(latent_run):
    root, _ = latent_run
    manifest = json.loads((root / "store" / "manifest.json").read_text())
    from ditforge.data.sources import load_data

    assert manifest["count"] == len(load_data("digits", "train"))  # the split training on digits uses


def test_export_hub_then_sample_eval_and_export_again_from_the_folder(latent_run, tmp_path):
    _, run = latent_run
    hub = tmp_path / "hub"
    line = run_cli("export", str(run), "--format", "hub", "--out", str(hub), "--license", "mit").stdout
    assert f"wrote {hub} (hub)" in line and "step 2" in line
    card = (hub / "README.md").read_text()
    assert card.startswith("---\n") and "license: mit" in card and "grid.png" in card  # the run's preview grid
    assert (hub / "grid.png").read_bytes() == (run / "samples" / "step-0000002.png").read_bytes()
    grid = tmp_path / "g.png"
    run_cli("sample", str(hub), "--classes", "1", "2", "--per-class", "2", "--steps", "5", "--out", str(grid))
    assert Image.open(grid).size[0] > 0
    # the hub folder is a source like a run: exported on, to diffusers (the official format wants the SD VAE itself)
    pipe = tmp_path / "pipe"
    run_cli("export", str(hub), "--format", "diffusers", "--out", str(pipe))
    from ditforge.formats.diffusers import read_diffusers
    from ditforge.formats.hub import read_hub

    a, b = read_hub(hub), read_diffusers(pipe)
    assert a.state_dict.keys() == b.state_dict.keys() and a.class_names == b.class_names
    assert all(torch.equal(a.state_dict[k], b.state_dict[k]) for k in a.state_dict)
    official = run_cli("export", str(hub), "--format", "official", "--out", str(tmp_path / "pt"), check=False)
    assert official.returncode == 2 and "not an SD VAE" in official.stderr and "hub" in official.stderr


def test_the_hub_card_shows_the_runs_latest_eval(trained_run, tmp_path):
    """`eval RUN` keeps its report in RUN/eval/; the hub export of that run shows it on its card,
    and `eval` reads the hub folder like a run (a built-in set is found again by its name)."""
    run_cli("eval", str(trained_run), "--per-class", "5", "--steps", "5", "--json", str(tmp_path / "r.json"))
    report = json.loads((tmp_path / "r.json").read_text())
    kept = sorted((trained_run / "eval").glob("step-*.json"))
    assert kept and json.loads(kept[-1].read_text()) == report
    hub = tmp_path / "hub"
    run_cli("export", str(trained_run), "--format", "hub", "--out", str(hub))
    card = (hub / "README.md").read_text()
    assert f"{report['class_accuracy']:.3f}" in card or str(report["class_accuracy"]) in card
    again = run_cli("eval", str(hub), "--per-class", "5", "--steps", "5", "--json", str(tmp_path / "h.json")).stdout
    assert "class accuracy" in again
    assert json.loads((tmp_path / "h.json").read_text())["class_accuracy"] == report["class_accuracy"]  # same EMA, seed


def test_export_diffusers_loads_in_dit_pipeline_with_the_class_names(latent_run, tmp_path):
    DiTPipeline = pytest.importorskip("diffusers").DiTPipeline
    _, run = latent_run
    out = tmp_path / "pipe"
    run_cli("export", str(run), "--format", "diffusers", "--out", str(out))
    pipe = DiTPipeline.from_pretrained(out)
    ids = pipe.get_label_ids(["3", "7"])
    assert ids == [3, 7]
    images = pipe(class_labels=ids, num_inference_steps=3, guidance_scale=1.5, generator=torch.manual_seed(0),
                  output_type="np").images
    assert images.shape == (2, 32, 32, 3) and np.isfinite(images).all()


@pytest.mark.parametrize("fmt, why", [("diffusers", "pixel"), ("official", "pixel")])
def test_export_refuses_what_a_format_cannot_hold_in_one_line(trained_run, tmp_path, fmt, why):
    bad = run_cli("export", str(trained_run), "--format", fmt, "--out", str(tmp_path / "x"), check=False)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
    assert why in bad.stderr and "hub" in bad.stderr and not (tmp_path / "x").exists()
