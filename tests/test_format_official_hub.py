"""The official DiT / SiT `.pt` writer and ditforge's hub folder (`formats/official.py`,
`formats/hub.py`): what is written reads back bit for bit, what the other code cannot build is
refused in one line, and a damaged hub folder is named in one line.

The strict load into the official facebookresearch/DiT `models.py` needs a copy of that code in
$DITFORGE_OFFICIAL_DIT or `.peers/DiT` and timm, as in tests/test_bench_sampling.py; skipped
without them."""

import json
import os
from pathlib import Path

import pytest
import torch

from ditforge.errors import CheckpointError, UserError
from ditforge.formats.hub import is_hub_folder, read_hub, write_hub
from ditforge.formats.official import official_file_name, read_official, write_official
from ditforge.formats.weights import ModelWeights
from ditforge.models import create_model

ROOT = Path(__file__).resolve().parents[1]
OFFICIAL = Path(os.environ.get("DITFORGE_OFFICIAL_DIT", ROOT / ".peers" / "DiT"))
SD_VAE = {"kind": "diffusers-kl", "id": "stabilityai/sd-vae-ft-ema", "scale": 0.18215, "channels": 4, "in_channels": 3,
          "downsample": 8}
CLASSES = [f"class {i}" for i in range(10)]


def randomized(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random N(0, 0.02^2) weights everywhere but the fixed pos_embed (adaLN-Zero would make
    the model output zeros, and a zero tensor round-trips trivially)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return model.eval()


def weights_of(model_args: dict, objective_config: dict | None = None, autoencoder: dict | None = None,
               step: int | None = 1200) -> tuple[ModelWeights, torch.nn.Module]:
    model = randomized(create_model(**model_args))
    w = ModelWeights(model_args=dict(model_args), state_dict=model.state_dict(), class_names=CLASSES[: model.num_classes],
                     objective_config=objective_config or {"objective": "diffusion"}, autoencoder=autoencoder or dict(SD_VAE),
                     source="runs/x/checkpoints/step-0001200/ema.safetensors", step=step)
    return w, model


@pytest.fixture(scope="module")
def dit_s2():
    """A latent DiT-S/2 (8x8x4 latents = 64 px through the SD VAE), 10 classes, the paper's diffusion."""
    return weights_of(dict(name="DiT-S/2", input_size=8, in_channels=4, num_classes=10))


def assert_same_tensors(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(a[k], b[k]), k


def one_line_error(kind, fn, *args, **kwargs) -> str:
    with pytest.raises(kind) as e:
        fn(*args, **kwargs)
    text = str(e.value)
    assert text and "\n" not in text, text
    return text


# -- official -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def official_dit(dit_s2, tmp_path_factory):
    """The files `write_official` writes for `dit_s2` (written once: a DiT-S file is 130 MB)."""
    return write_official(dit_s2[0], tmp_path_factory.mktemp("official") / "out")


def test_official_diffusion_writes_their_file_and_reads_back_bit_for_bit(dit_s2, official_dit, tmp_path):
    w, model = dit_s2
    pt, js = official_dit
    assert (pt.name, js.name) == ("DiT-S-2-64x64.pt", "DiT-S-2-64x64.json")  # their naming: model, patch, pixels
    raw = torch.load(pt, map_location="cpu", weights_only=True)  # what their find_model gets: a flat dict
    assert type(raw) is dict and list(raw) == list(model.state_dict())
    assert all(t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous() for t in raw.values())

    back = read_official(pt, None)  # the JSON beside names the model: no --model needed
    assert_same_tensors(back.state_dict, w.state_dict)
    assert (back.model_args, back.class_names, back.objective_config, back.autoencoder, back.step) == (
        w.model_args, w.class_names, w.objective_config, w.autoencoder, w.step)
    assert_same_tensors(read_official(pt, "DiT-S/2").state_dict, w.state_dict)  # naming it agrees with the record
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([10.0, 500.0]), torch.tensor([3, 10])
    with torch.no_grad():
        assert torch.equal(back.build().eval()(x, t, y), model(x, t, y))

    args = json.loads(js.read_text())
    assert (args["code"], args["model"], args["image_size"], args["latent_size"], args["num_classes"]) == (
        "facebookresearch/DiT", "DiT-S/2", 64, 8, 10)
    assert (args["vae"], args["cfg_scale"], args["learn_sigma"], args["null_class"]) == (
        "stabilityai/sd-vae-ft-ema", 4.0, True, 10)
    assert args["diffusion"] == {"noise_schedule": "linear", "diffusion_steps": 1000, "learn_sigma": True}
    assert args["command"] == ("python sample.py --model DiT-S/2 --image-size 64 --num-classes 10 --vae ema "
                               "--cfg-scale 4 --ckpt DiT-S-2-64x64.pt")
    notes = " ".join(args["notes"])
    assert "null label 1000" in notes and "set y_null to 10" in notes  # their hard-coded ImageNet constants
    assert "256 or 512" in notes  # their --image-size choices

    bare = tmp_path / pt.name  # the .pt alone, as official downloads come: --model is needed again
    os.link(pt, bare)
    assert "--model" in one_line_error(UserError, read_official, bare, None)
    back = read_official(bare, "DiT-S/2")
    assert_same_tensors(back.state_dict, w.state_dict)
    assert back.model_args == dict(w.model_args, class_dropout_prob=0.1, learn_sigma=True)  # from the shapes


def test_official_sit_flow_round_trip_sample_args_and_overwrite(tmp_path):
    flow = {"objective": "flow", "flow": {"path": "gvp", "prediction": "noise", "time_distribution": "uniform",
                                          "time_mean": 0.0, "time_std": 1.0, "time_shift": 1.0, "cosine_weight": 0.0}}
    w, model = weights_of(dict(name="DiT-S/8", input_size=8, in_channels=4, num_classes=10, learn_sigma=False), flow)
    assert official_file_name(w) == "SiT-S-8-64x64.pt"
    pt, js = write_official(w, tmp_path / "model.pt")  # a path ending in .pt names the file
    assert (pt, js) == (tmp_path / "model.pt", tmp_path / "model.json")
    back = read_official(pt, None)
    assert_same_tensors(back.state_dict, w.state_dict)
    assert back.objective_config == flow and back.objective.name == "flow" and back.model_args == w.model_args
    assert_same_tensors(read_official(pt, "SiT-S/8").state_dict, w.state_dict)  # SiT's name for it
    assert "DiT-B/2" in one_line_error(CheckpointError, read_official, pt, "DiT-B/2")  # the record disagrees
    assert "drop --objective" in one_line_error(CheckpointError, read_official, pt, None, "diffusion")

    args = json.loads(js.read_text())
    assert (args["code"], args["model"], args["transport"]) == ("willisma/SiT", "SiT-S/8", {"path_type": "GVP", "prediction": "noise"})
    assert args["sample_args"][0] == "ODE" and args["command"].startswith("python sample.py ODE --model SiT-S/8 ")
    assert "--path-type GVP --prediction noise" in args["command"]
    assert not any("learn_sigma" in n for n in args["notes"])  # SiT's sample.py builds learn_sigma=False for a --ckpt

    record = js.read_text()
    js.write_text(record[:50])  # a damaged record beside the file
    assert "model.json" in one_line_error(CheckpointError, read_official, pt, None)
    js.write_text(record.replace('"num_classes": 10', '"num_classes": 12'))  # a record of another model
    assert "does not describe model.pt" in one_line_error(CheckpointError, read_official, pt, None)

    assert "--overwrite" in one_line_error(UserError, write_official, w, tmp_path / "model.pt")
    assert write_official(w, tmp_path / "model.pt", overwrite=True)[0] == pt
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.json", "model.pt"]  # no temporary files left


def modern(**kw):
    return dict(name="DiT-S/2", input_size=8, in_channels=4, num_classes=10, **kw)


@pytest.mark.parametrize("model_args, objective, autoencoder, expected", [
    (modern(norm="rms", mlp="swiglu"), None, None, "its blocks use norm rms, mlp swiglu"),
    (modern(rope=True), None, None, "rope"),
    (modern(qk_norm=True), None, None, "qk_norm"),
    (dict(name="DiT-S/2", input_size=8, in_channels=1, num_classes=10), None, {"kind": "identity", "channels": 1}, "pixel-space"),
    (modern(), None, {"kind": "diffusers-kl", "id": "black-forest-labs/FLUX.1-dev", "scale": 0.3611, "channels": 4,
                      "downsample": 8}, "is not an SD VAE"),
    (dict(name="DiT-Ti/2", input_size=8, in_channels=4, num_classes=10), None, None, "not in their registry"),
    (modern(class_dropout_prob=0.0), None, None, "no null class"),
    (modern(), {"objective": "flow", "flow": {"path": "vp"}}, None, "SiT has no flow path 'vp'"),
    (modern(), {"objective": "meanflow"}, None, "the meanflow objective has no official code"),
])
def test_official_refusals_are_one_line_naming_the_reason_and_the_formats_that_fit(tmp_path, model_args, objective,
                                                                                    autoencoder, expected):
    w = ModelWeights(model_args=model_args, state_dict={}, class_names=CLASSES, objective_config=objective or {"objective": "diffusion"},
                     autoencoder=autoencoder or dict(SD_VAE))
    text = one_line_error(UserError, write_official, w, tmp_path / "out")
    assert expected in text and "official" in text and "export --format" in text and "hub" in text, text
    # diffusers fits a latent diffusion DiT of the paper's blocks (of any size, with its own VAE), not the others
    assert ("diffusers" in text) == (expected in ("not in their registry", "is not an SD VAE")), text
    assert not (tmp_path / "out").exists()  # refused before anything is written


def test_official_file_loads_strictly_into_the_official_models_py(dit_s2, official_dit):
    if not (OFFICIAL / "diffusion" / "__init__.py").is_file():
        pytest.skip(f"no copy of facebookresearch/DiT at {OFFICIAL} (set DITFORGE_OFFICIAL_DIT; see benchmarks/gpu_checks.sh)")
    pytest.importorskip("timm", reason="the official models.py imports timm")
    import importlib.util
    import sys

    if "bench_sampling" not in sys.modules:  # as tests/test_bench_sampling.py loads it
        spec = importlib.util.spec_from_file_location("bench_sampling", ROOT / "benchmarks" / "bench_sampling.py")
        sys.modules["bench_sampling"] = module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    _, models, why = sys.modules["bench_sampling"].load_official(OFFICIAL)
    if models is None:
        pytest.skip(why)
    _, model = dit_s2
    pt, js = official_dit
    args = json.loads(js.read_text())
    # what their sample.py does with the arguments written beside the file
    peer = models.DiT_models[args["model"]](input_size=args["image_size"] // 8, num_classes=args["num_classes"]).eval()
    peer.load_state_dict(torch.load(pt, map_location="cpu", weights_only=True), strict=True)
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), torch.tensor([3, 10])
    with torch.no_grad():
        torch.testing.assert_close(peer(x, t, y), model(x, t, y), rtol=1e-5, atol=1e-5)


# -- hub ------------------------------------------------------------------------------------------


def front_matter(card: str) -> dict:
    lines = card.splitlines()
    assert lines[0] == "---", lines[:2]
    end = lines.index("---", 1)
    text = "\n".join(lines[1:end])
    try:
        import yaml
    except ImportError:  # the plain-line form write_hub uses
        meta: dict = {}
        key = ""  # the list that "- " lines extend: the last "key:" line's
        for line in text.splitlines():
            if line.startswith("- "):
                meta[key].append(json.loads(line[2:]) if line[2:].startswith('"') else line[2:])
            else:
                key, _, value = line.partition(": ")
                key = key.rstrip(":")
                meta[key] = value if value else []
        return meta
    return yaml.safe_load(text)


def test_hub_round_trip_of_a_modern_flow_model(tmp_path):
    from ditforge.config import TrainConfig

    config = TrainConfig(objective="flow", run_dir="/home/someone/runs/private").to_dict()
    w, model = weights_of(dict(name="DiT-Ti/2", input_size=8, in_channels=4, num_classes=10, learn_sigma=False,
                               norm="rms", mlp="swiglu", rope=True, qk_norm=True), config)
    grid = tmp_path / "samples.PNG"
    grid.write_bytes(b"\x89PNG\r\n\x1a\n not really a picture")
    report = {"data": "imagenet-1k", "cfg": 1.5, "steps": 50, "class_accuracy": 0.91234, "fid": 3.25, "classes": [{"id": 0}],
              "fid_real": None}
    out = write_hub(w, tmp_path / "hub", license="apache-2.0", data_name="imagenet-1k", grid=grid, eval_report=report,
                    commands=["ditforge train --preset LightningDiT-B/2 --data features/in256"])
    assert out == tmp_path / "hub" and is_hub_folder(out)
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "grid.png", "model.safetensors"]

    back = read_hub(out)
    assert_same_tensors(back.state_dict, w.state_dict)
    assert (back.model_args, back.class_names, back.autoencoder, back.step) == (w.model_args, w.class_names, w.autoencoder, 1200)
    assert back.objective_config == {k: config[k] for k in ("objective", "diffusion", "flow")}
    assert back.source == str(out / "model.safetensors")
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([0.2, 0.9]), torch.tensor([3, 10])
    with torch.no_grad():
        assert torch.equal(back.build().eval()(x, t, y), model(x, t, y))

    record = json.loads((out / "config.json").read_text())
    assert (record["format"], record["version"], record["license"], record["data_name"]) == (
        "ditforge-hub", 1, "apache-2.0", "imagenet-1k")
    assert "run_dir" not in record["training"] and "data" not in record["training"] and "/home/someone" not in json.dumps(record)
    assert record["training"]["optim"]["lr"] == config["optim"]["lr"]

    card = (out / "README.md").read_text()
    meta = front_matter(card)
    assert meta["library_name"] == "ditforge" and meta["license"] == "apache-2.0" and meta["datasets"] == ["imagenet-1k"]
    assert {"diffusion", "dit", "class-conditional", "flow-matching"} <= set(meta["tags"])
    assert "![Samples, one row per class](grid.png)" in card
    table = card.split("## Evaluation")[1].split("## Use it")[0]
    assert "| class_accuracy | 0.9123 |" in table and "| fid | 3.25 |" in table
    assert "classes" not in table and "fid_real" not in table  # lists and missing figures left out
    assert "ditforge sample hub --out grid.png" in card and "ditforge train --preset LightningDiT-B/2" in card
    assert "No diffusers export" in card and "--format diffusers" not in card


def test_hub_round_trip_of_a_pixel_space_model_and_a_latent_diffusion_card(dit_s2, tmp_path):
    w, model = weights_of(dict(name="DiT-Ti/2", input_size=8, in_channels=1, num_classes=10),
                          autoencoder={"kind": "identity", "channels": 1, "scale": 1.0, "downsample": 1}, step=None)
    data = tmp_path / "my data"  # a local folder: no `datasets:` entry, and its full path stays out of the card
    data.mkdir()
    out = write_hub(w, tmp_path / "pixels", license="mit", data_name=str(data))
    back = read_hub(out)
    assert_same_tensors(back.state_dict, w.state_dict)
    assert (back.model_args, back.autoencoder, back.objective_config, back.step) == (w.model_args, w.autoencoder, w.objective_config, None)
    card = (out / "README.md").read_text()
    meta = front_matter(card)
    assert meta["license"] == "mit" and "datasets" not in meta and "pixel-space" in meta["tags"]
    assert str(tmp_path) not in card and "a local folder (my data)" in card and "grid.png)" not in card
    assert "pixel-space models" in card  # why there is no diffusers export

    latent = write_hub(dit_s2[0], tmp_path / "latent", license="cc-by-nc-4.0", data_name="hf:ylecun/mnist")
    card = (latent / "README.md").read_text()
    assert front_matter(card)["datasets"] == ["ylecun/mnist"]
    assert "ditforge export latent --format diffusers --out latent-diffusers" in card


def test_hub_damaged_files_are_one_line_errors_naming_the_file(tmp_path):
    w, _ = weights_of(dict(name="DiT-Ti/4", input_size=8, in_channels=4, num_classes=10))
    out = write_hub(w, tmp_path / "hub", license="mit", data_name="digits")
    weights_file, config = out / "model.safetensors", out / "config.json"
    good_weights, good_config = weights_file.read_bytes(), config.read_text()

    weights_file.write_bytes(good_weights[: len(good_weights) // 2])  # cut short
    assert "model.safetensors" in one_line_error(CheckpointError, read_hub, out)
    weights_file.unlink()
    assert "model.safetensors" in one_line_error(CheckpointError, read_hub, out)
    weights_file.write_bytes(good_weights)

    config.write_text(good_config[:40])  # not whole JSON: still recognised as a (damaged) hub folder
    assert is_hub_folder(out) and "config.json" in one_line_error(CheckpointError, read_hub, out)
    record = json.loads(good_config)
    for change, expected in [
        (lambda r: r.pop("class_names"), "'class_names' is missing"),
        (lambda r: r.update(model_args=[1]), "'model_args' is not a dict"),
        (lambda r: r.update(version=2), "version 2"),
        (lambda r: r["class_names"].pop(), "9 class names for 10 classes"),
        (lambda r: r["model_args"].update(input_size=16), "do not fit"),  # weights of another model
    ]:
        damaged = json.loads(good_config)
        change(damaged)
        config.write_text(json.dumps(damaged))
        text = one_line_error(CheckpointError, read_hub, out)
        assert expected in text and ("config.json" in text or "model.safetensors" in text), text
    config.unlink()
    assert not is_hub_folder(out)
    assert "config.json" in one_line_error(CheckpointError, read_hub, out)
    config.write_text(json.dumps(record))

    (out / ".ditforge-export").mkdir()  # a kill after the staged files were complete, during the renames
    (out / ".ditforge-export" / "COMPLETE").write_text("")
    assert "interrupted" in one_line_error(CheckpointError, read_hub, out)
    write_hub(w, out, license="mit", data_name="digits")  # exporting again repairs it
    assert_same_tensors(read_hub(out).state_dict, w.state_dict)


def test_hub_out_folder_rules(tmp_path):
    w, _ = weights_of(dict(name="DiT-Ti/4", input_size=8, in_channels=4, num_classes=10))
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    assert "notes.txt" in one_line_error(UserError, write_hub, w, taken, license="mit", data_name="digits")
    assert sorted(p.name for p in taken.iterdir()) == ["notes.txt"]  # nothing written
    write_hub(w, taken, license="mit", data_name="digits", overwrite=True)
    assert (taken / "notes.txt").read_text() == "mine" and is_hub_folder(taken)  # other files are kept

    grid = tmp_path / "g.jpg"
    grid.write_bytes(b"jpeg")
    out = write_hub(w, tmp_path / "hub", license="mit", data_name="digits", grid=grid)
    assert (out / "grid.jpg").is_file()
    (out / ".ditforge-export").mkdir()  # a kill before the staged files were complete: the old export stands
    (out / ".ditforge-export" / "model.safetensors").write_bytes(b"half")
    assert_same_tensors(read_hub(out).state_dict, w.state_dict)
    write_hub(w, out, license="mit", data_name="digits")  # a previous export: replaced without --overwrite
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]  # old grid gone

    assert "license" in one_line_error(UserError, write_hub, w, tmp_path / "x", license="MIT License\nevil: 1", data_name="digits")
    assert "not a file" in one_line_error(UserError, write_hub, w, tmp_path / "x", license="mit", data_name="digits",
                                          grid=tmp_path / "missing.png")
    (tmp_path / "file").write_text("")
    assert "is a file" in one_line_error(UserError, write_hub, w, tmp_path / "file", license="mit", data_name="digits")
    assert not (tmp_path / "x").exists()
