"""`train --init-from PATH` (train/init_from.py): weights of a run or an official `.pt` into a fresh
run, the label table resized to its classes, the position embedding of its input size, and a
one-line error for everything that does not fit."""

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import run_cli
from ditforge.cli import main
from ditforge.config import ModelConfig, TrainConfig, preset
from ditforge.data.training_data import open_training_data
from ditforge.errors import UserError
from ditforge.formats.weights import ModelWeights
from ditforge.meanflow import MeanFlowObjective
from ditforge.models import create_model
from ditforge.models.positions import get_2d_sincos_pos_embed
from ditforge.train import distributed
from ditforge.train.init_from import (
    adapt_state, check_objective, drop_sigma, map_classes, prepare, read_source, resize_label_table, weights_digest,
)
from ditforge.train.resume import find_run
from ditforge.train.step import TrainStep
from ditforge.train.trainer import build_model, train

TABLE = "y_embedder.embedding_table.weight"
QUICK = ["--batch-size", "8", "--precision", "fp32", "--sample-steps", "2", "--no-progress", "--log-every", "1"]


def _folder(root: Path, classes: list[str], mode: str, per_class: int = 3) -> Path:
    """ROOT/<class>/<i>.png, 8x8 images ('L': one channel, 'RGB': three)."""
    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            shape = (8, 8) if mode == "L" else (8, 8, 3)
            Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(root / c / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def source_run(tmp_path_factory) -> Path:
    """A DiT-Ti/2 diffusion run on the digits (1x8x8, classes '0'..'9', learned sigma), 2 steps
    (trained in this process, on the CPU: a subprocess would import torch again)."""
    run = tmp_path_factory.mktemp("source") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(distributed, "local_device", lambda: torch.device("cpu"))
        train(TrainConfig(data="digits", run_dir=str(run), model=ModelConfig("DiT-Ti/2"), steps=2, ckpt_every=2,
                          global_batch=8, precision="fp32", sample_steps="2", log_every=1), progress=False)
    return run


def _one_line_error(proc) -> str:
    """The one stderr line of a `run_cli` process that exited 2."""
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, (proc.returncode, proc.stderr)
    return lines[0]


def _refused(capsys, *args: str) -> str:
    """The one stderr line of `ditforge ARGS` run by the command's own `main` in this process
    (exit status 2); `run_cli` runs it as a process, at the cost of importing torch again."""
    capsys.readouterr()
    code = main(list(args))
    lines = [line for line in capsys.readouterr().err.strip().splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, (code, lines)
    return lines[0]


# -- the tensors that change ----------------------------------------------------------------


def test_classes_pair_by_name_when_a_name_is_shared_else_by_index():
    assert map_classes(["0", "1", "2", "3"], ["3", "cat", "1"]) == ([3, None, 1], "name")
    assert map_classes(["tench", "goldfish"], ["cat", "dog", "owl"]) == ([0, 1, None], "index")
    assert map_classes(["a", "a", "b"], ["a"]) == ([0], "name")  # a repeated name: its first row


def test_label_table_rows_mapped_new_classes_from_the_null_row_and_the_null_row_kept():
    table = torch.arange(5 * 2, dtype=torch.float32).reshape(5, 2)  # 4 classes + null (row 4)
    out = resize_label_table(table, 4, [3, None, 0], null_row=True)
    assert torch.equal(out, torch.stack([table[3], table[4], table[0], table[4]]))
    assert torch.equal(resize_label_table(table, 4, [1, 2], null_row=False), table[[1, 2]])  # label dropout 0 here
    no_null = table[:4]  # a source trained without label dropout: its class rows' mean instead
    mean = no_null.mean(0)
    assert torch.equal(resize_label_table(no_null, 4, [None, 2], null_row=True), torch.stack([mean, no_null[2], mean]))
    with pytest.raises(UserError, match="has 3 rows for 4 classes"):
        resize_label_table(table[:3], 4, [0], null_row=True)


def test_a_learned_sigma_source_into_a_run_without_keeps_its_prediction_exactly():
    torch.manual_seed(0)
    source = create_model("DiT-Ti/2", input_size=8, in_channels=3, num_classes=4, learn_sigma=True).eval()
    with torch.no_grad():  # the zero-initialised final layer would hide the order of its rows
        for p in source.final_layer.parameters():
            p.normal_()
    target = create_model("DiT-Ti/2", input_size=8, in_channels=3, num_classes=4, learn_sigma=False).eval()
    weights = ModelWeights(dict(name="DiT-Ti/2"), source.state_dict(), ["a", "b", "c", "d"])
    state, changes = adapt_state(weights, target.state_dict(), {}, ["a", "b", "c", "d"])
    assert changes["sigma_dropped"]
    target.load_state_dict(state, strict=True)
    x, t, y = torch.randn(3, 3, 8, 8), torch.tensor([1, 500, 999]), torch.tensor([0, 2, 4])
    with torch.no_grad():
        torch.testing.assert_close(target(x, t, y), source(x, t, y)[:, :3], rtol=0, atol=1e-6)  # eps (or velocity) only
    w, b = drop_sigma(torch.arange(2 * 2 * 2 * 3 * 1.0).reshape(-1, 1), torch.arange(24.0), patch=2, channels=3)
    assert b.tolist() == [0, 1, 2, 6, 7, 8, 12, 13, 14, 18, 19, 20] and torch.equal(w[:, 0], b)  # (p, p, C') rows, C' fastest


def test_an_xl2_shaped_official_file_adapts_to_three_classes_and_another_input_size(tmp_path):
    """DiT-XL/2 at 256 px (32x32x4 latents, 1000 classes) into an XL/2 run on 128-px latents of 3
    classes: the official reader, the label table and the position embedding at full size. The
    file holds real values where they change and one broadcast value elsewhere, so it is 80 kB
    (the real file is 2.7 GB; the target is shapes only, on the meta device)."""
    with torch.device("meta"):
        official = create_model("DiT-XL/2", input_size=32, in_channels=4, num_classes=1000).state_dict()
        target = create_model("DiT-XL/2", input_size=16, in_channels=4, num_classes=3).state_dict()
        no_sigma = create_model("DiT-XL/2", input_size=16, in_channels=4, num_classes=3, learn_sigma=False).state_dict()
    state = {k: torch.zeros((), dtype=v.dtype).expand(v.shape) for k, v in official.items()}
    g = torch.Generator().manual_seed(0)
    state[TABLE] = torch.randn(1001, 1152, generator=g)
    state["final_layer.linear.weight"], state["final_layer.linear.bias"] = torch.randn(32, 1152, generator=g), torch.randn(32, generator=g)
    state["pos_embed"] = get_2d_sincos_pos_embed(1152, 16).float().unsqueeze(0)  # (1, 256, 1152)
    torch.save(state, tmp_path / "DiT-XL-2-256x256.pt")
    own_pos = get_2d_sincos_pos_embed(1152, 8).float().unsqueeze(0)  # (1, 64, 1152): this run's input, 16 / 2 = 8 patches a side
    target["pos_embed"] = no_sigma["pos_embed"] = own_pos

    cfg = TrainConfig(model=ModelConfig("DiT-XL/2"), init_from=str(tmp_path / "DiT-XL-2-256x256.pt"))
    source = read_source(cfg)  # a plain .pt: read as this run's --model and --objective
    assert source.model_args["name"] == "DiT-XL/2" and source.objective_config["objective"] == "diffusion"
    assert len(source.class_names) == 1000 and source.step is None

    out, changes = adapt_state(source, target, {}, ["5", "cat", "999"])  # official names are "0".."999": by name
    table = state[TABLE]
    assert torch.equal(out[TABLE], torch.stack([table[5], table[1000], table[999], table[1000]]))
    assert changes["classes"] == {"paired_by": "name", "from_source": 2, "new": ["cat"]} and changes["label_rows"] == [1001, 4]
    assert out["pos_embed"].shape == (1, 64, 1152) and torch.equal(out["pos_embed"], own_pos) and changes["pos_embed_rebuilt"]
    assert torch.equal(out["final_layer.linear.weight"], state["final_layer.linear.weight"]) and not changes["sigma_dropped"]
    assert out["blocks.27.mlp.fc2.weight"].shape == (1152, 4608)

    out, changes = adapt_state(source, no_sigma, {}, ["cat", "dog", "owl"])  # no shared name: by index
    assert torch.equal(out[TABLE], table[[0, 1, 2, 1000]]) and changes["classes"]["paired_by"] == "index"
    assert out["final_layer.linear.weight"].shape == (16, 1152) and changes["sigma_dropped"]
    rows = torch.arange(32).reshape(4, 8)[:, :4].reshape(-1)  # per patch position 8 outputs: 4 eps, then 4 variance
    assert torch.equal(out["final_layer.linear.weight"], state["final_layer.linear.weight"][rows])


# -- what a fresh start holds ----------------------------------------------------------------


def _fresh_start(cfg: TrainConfig):
    """What `train` holds before its first step: model and EMA after --init-from, and the record."""
    d = distributed.Dist()
    data = open_training_data(cfg)
    torch.manual_seed(cfg.seed)
    model, model_args = build_model(cfg, data)
    init = prepare(cfg, d, model, model_args, data, find_run(cfg, d))
    stepper = TrainStep(cfg, model, d, "fp32")
    init.load(model, stepper.ema.module, d)
    return model.state_dict(), stepper.ema.module.state_dict(), init.record


def test_a_fresh_start_holds_the_source_ema_weights_exactly(source_run, tmp_path):
    ema = load_file(str(source_run / "checkpoints" / "step-0000002" / "ema.safetensors"))
    raw = load_file(str(source_run / "checkpoints" / "step-0000002" / "model.safetensors"))
    cfg = TrainConfig(data="digits", model=ModelConfig("DiT-Ti/2"), init_from=str(source_run), run_dir=str(tmp_path / "same"))
    model, ema_now, record = _fresh_start(cfg)
    for state in (model, ema_now):  # the same classes: every tensor, bit for bit, and the EMA starts equal
        assert state.keys() == ema.keys() and all(torch.equal(state[k], ema[k]) for k in ema)
    final = "final_layer.linear.weight"  # (the first tensor that 2 steps change: DiT's zero inits hold the rest back)
    assert not torch.equal(ema[final], raw[final])  # the EMA's weights, not the raw ones
    assert record["format"] == "ditforge" and record["step"] == 2 and record["source"].endswith("step-0000002/ema.safetensors")
    assert record["sha256"] == weights_digest(ema) and record["classes"]["paired_by"] == "name"

    folder = _folder(tmp_path / "imgs", ["3", "7", "cat"], "L")  # 1x8x8 like the digits; "cat" is new
    cfg = TrainConfig(data=str(folder), model=ModelConfig("DiT-Ti/2"), init_from=str(source_run), run_dir=str(tmp_path / "new"))
    model, ema_now, record = _fresh_start(cfg)
    assert torch.equal(model[TABLE], ema[TABLE][[3, 7, 10, 10]]) and torch.equal(ema_now[TABLE], model[TABLE])
    assert all(torch.equal(model[k], ema[k]) for k in ema if k != TABLE)
    assert record["classes"] == {"paired_by": "name", "from_source": 2, "new": ["cat"]} and record["label_rows"] == [11, 4]


def test_a_hub_folder_starts_the_same_as_its_run_with_the_same_digest(source_run, tmp_path):
    from ditforge.formats.hub import write_hub
    from ditforge.formats.read import read_model

    hub = write_hub(read_model(source_run), tmp_path / "hub", license="mit", data_name="digits")
    ema = load_file(str(source_run / "checkpoints" / "step-0000002" / "ema.safetensors"))
    cfg = TrainConfig(data="digits", model=ModelConfig("DiT-Ti/2"), init_from=str(hub), run_dir=str(tmp_path / "run"))
    model, _, record = _fresh_start(cfg)
    assert all(torch.equal(model[k], ema[k]) for k in ema)
    assert record["format"] == "hub" and record["step"] == 2 and record["sha256"] == weights_digest(ema)  # any format, one digest


def test_a_diffusers_folder_is_read_through_its_key_map_and_paired_by_id2label(tmp_path):
    """A DiTPipeline folder as facebook/DiT-XL-2-256 lays it out (written here by the format's own
    key map, without importing diffusers): its null row sits at 1000, its names in id2label."""
    from ditforge.formats.diffusers import WEIGHTS_NAME, scheduler_config, to_diffusers_state_dict
    from safetensors.torch import save_file

    torch.manual_seed(0)
    state = create_model("DiT-Ti/2", input_size=8, in_channels=4, num_classes=10).state_dict()
    folder = tmp_path / "pipe"
    for sub in ("transformer", "scheduler", "vae"):
        (folder / sub).mkdir(parents=True)
    save_file(to_diffusers_state_dict(state, 6, 10), str(folder / "transformer" / WEIGHTS_NAME))
    (folder / "transformer" / "config.json").write_text(json.dumps(dict(
        _class_name="DiTTransformer2DModel", num_layers=6, num_attention_heads=3, attention_head_dim=64, patch_size=2,
        in_channels=4, out_channels=8, sample_size=8, num_embeds_ada_norm=1000)))
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler_config("linear", 1000)))
    (folder / "vae" / "config.json").write_text(json.dumps(dict(latent_channels=4, scaling_factor=0.18215)))
    names = ["tench", "goldfish", "shark", "hen", "ostrich", "robin", "jay", "magpie", "owl", "newt"]
    (folder / "model_index.json").write_text(json.dumps(dict(
        _class_name="DiTPipeline", id2label={str(i): n for i, n in enumerate(names)})))
    with torch.device("meta"):
        target = create_model("DiT-Ti/2", input_size=8, in_channels=4, num_classes=2).state_dict()
    target["pos_embed"] = state["pos_embed"]

    source = read_source(TrainConfig(model=ModelConfig("DiT-Ti/2"), init_from=str(folder)))
    assert source.format == "diffusers" and source.class_names == names
    out, changes = adapt_state(source, target, {}, ["owl", "cat"])
    assert torch.equal(out[TABLE], state[TABLE][[8, 10, 10]]) and changes["classes"]["new"] == ["cat"]
    assert torch.equal(out["blocks.3.attn.qkv.weight"], state["blocks.3.attn.qkv.weight"])


# -- the command -----------------------------------------------------------------------------


@pytest.mark.slow
def test_an_official_file_fine_tunes_a_three_class_folder_trains_and_resumes(tmp_path, caplog):
    """An official-format `.pt` (the flat state dict, 16x16 RGB inputs, 1000 classes) on a 3-class
    8x8 RGB folder: the record in state.json and config.json, one step from the source's weights,
    a resume that ignores --init-from, and another --init-from for the same run refused. The file
    holds a DiT-Ti/2 to keep the test quick (an XL/2 needs some 16 GB to train on a CPU, a DiT-S/2
    takes 20 s a step here: their shapes go through the same code above)."""
    torch.manual_seed(1)
    model = create_model("DiT-Ti/2", input_size=16, in_channels=3, num_classes=1000)
    with torch.no_grad():  # as trained weights: DiT's zero-initialised layers would let no gradient reach the blocks
        for name, p in model.named_parameters():
            if "adaLN" in name or "final_layer.linear" in name:
                p.normal_(std=0.02)
    official = model.state_dict()
    pt = tmp_path / "DiT-Ti-2-16px.pt"
    torch.save(official, pt)
    folder = _folder(tmp_path / "imgs", ["cat", "dog", "owl"], "RGB")
    run = tmp_path / "run"
    args = ["train", "--data", str(folder), "--run-dir", str(run), "--model", "DiT-Ti/2", "--objective", "diffusion",
            "--init-from", str(pt), "--ckpt-every", "1", "--keep-last", "1", "--batch-size", "4", "--lr", "1e-3",
            *QUICK[2:]]
    out = run_cli(*args, "--steps", "1").stdout
    assert "initialised from" in out and "1001 -> 4 rows" in out

    ckpt = run / "checkpoints" / "step-0000001"
    record = json.loads((ckpt / "state.json").read_text())["init_from"]
    assert record["format"] == "official" and record["step"] is None and record["source"] == str(pt)
    assert record["sha256"] == weights_digest(official) and record["label_rows"] == [1001, 4]
    assert record["classes"]["paired_by"] == "index" and record["pos_embed_rebuilt"] and not record["sigma_dropped"]
    assert json.loads((run / "config.json").read_text())["init_from"] == str(pt)
    after = load_file(str(ckpt / "model.safetensors"))
    worst = max((after[k] - official[k]).abs().max().item() for k in after if k.startswith("blocks."))
    assert 0 < worst <= 1.01e-3  # one AdamW step (at most lr per value) from the source, not from random weights

    # the same command, in this process (a second process would import torch again): it resumes
    with caplog.at_level(logging.INFO, logger="ditforge.train"):
        assert main([*args, "--steps", "2"]) == 0
    assert "resumed from" in caplog.text and "ignored" in caplog.text and "initialised from" not in caplog.text
    assert json.loads((run / "checkpoints" / "step-0000002" / "state.json").read_text())["init_from"] == record

    other = [a if a != str(pt) else str(tmp_path / "other.pt") for a in args]  # refused as a process: its exit status
    line = _one_line_error(run_cli(*other, "--steps", "3", check=False))
    assert "init_from" in line and "other.pt" in line


@pytest.mark.parametrize("extra, says", [
    (["--model", "DiT-Ti/4"], "x_embedder.proj.weight: source (192, 1, 2, 2) vs this run (192, 1, 4, 4)"),
    (["--objective", "flow"], "holds a diffusion-objective model and this run trains flow"),
    (["--rope"], "pass --no-rope"),
    (["--data", "RGB"], "train on 1-channel data"),
], ids=["patch", "objective", "rope", "channels"])
def test_what_does_not_fit_is_a_one_line_error(source_run, tmp_path, capsys, extra, says):
    if extra == ["--data", "RGB"]:
        extra = ["--data", str(_folder(tmp_path / "rgb", ["a", "b"], "RGB"))]
    args = ["train", "--run-dir", str(tmp_path / "run"), "--data", "digits", "--model", "DiT-Ti/2", "--objective", "diffusion",
            "--steps", "1", "--init-from", str(source_run), *QUICK, *extra]
    line = _refused(capsys, *args)
    assert says in line, line
    assert not (tmp_path / "run").exists()  # refused before the run folder is made


def test_depth_width_blocks_keys_and_a_learned_sigma_the_source_lacks_are_refused():
    small = create_model("DiT-Ti/2", input_size=8, in_channels=1, num_classes=10, learn_sigma=False)
    target = create_model("DiT-Ti/2", input_size=8, in_channels=1, num_classes=10).state_dict()
    names = [str(i) for i in range(10)]
    fewer = {k: v for k, v in target.items() if not k.startswith("blocks.5.")}
    cases = [
        (ModelWeights(dict(name="DiT-Ti/2"), fewer, names), "blocks: the source has 5 blocks, this run 6"),
        (ModelWeights(dict(name="DiT-Ti/2"), small.state_dict(), names),
         "final_layer.linear.weight: source (4, 192) vs this run (8, 192): the source predicts no variance"),
        (ModelWeights(dict(name="DiT-S/2"), create_model("DiT-S/2", input_size=8, in_channels=1, num_classes=10).state_dict(),
                      names), "source (384, 1, 2, 2) vs this run (192, 1, 2, 2): --init-from needs the same patch size, "
                              "channels and width; choose --model DiT-S/2"),
        (ModelWeights(dict(name="DiT-Ti/2", norm="rms"), target, names), "pass --norm rms"),
        (ModelWeights(dict(name="DiT-Ti/2"), {k: v for k, v in target.items() if k != "t_embedder.mlp.0.bias"}, names),
         "t_embedder.mlp.0.bias: in this run's model but not in the source"),
    ]
    for source, says in cases:
        with pytest.raises(UserError) as e:
            adapt_state(source, target, {}, names)
        assert says in str(e.value) and "\n" not in str(e.value), str(e.value)


@pytest.mark.slow
def test_two_processes_under_fsdp_start_from_the_same_weights(source_run, tmp_path):
    """Rank 0 alone reads the source and broadcasts it after FSDP2 has sharded the model: a step
    on two processes gives the weights of one process (a rank that kept its random shards would
    not), as `tests/test_distributed.py` checks for training itself."""
    from test_distributed import torchrun

    args = dict(preset("tiny"), model=dict(preset("tiny")["model"], name="DiT-Ti/2"), init_from=str(source_run), steps=1,
                ckpt_every=1, global_batch=8, precision="fp32", sample_steps="2", log_every=1)  # QUICK
    train(TrainConfig.from_dict(dict(args, run_dir=str(tmp_path / "one"))), progress=False)
    torchrun("train", "--run-dir", str(tmp_path / "two"), "--parallel", "fsdp", "--data", "digits", "--model", "DiT-Ti/2",
             "--init-from", str(source_run), "--steps", "1", "--ckpt-every", "1", *QUICK)
    for name in ("model", "ema"):
        one, two = (load_file(str(tmp_path / r / "checkpoints" / "step-0000001" / f"{name}.safetensors")) for r in ("one", "two"))
        assert one.keys() == two.keys() and max((one[k] - two[k]).abs().max().item() for k in one) <= 1e-6


def test_other_settings_of_the_same_objective_are_a_warning_another_objective_an_error(caplog):
    names = [str(i) for i in range(10)]
    state = create_model("DiT-Ti/2", input_size=8, in_channels=1, num_classes=10).state_dict()
    source = ModelWeights(dict(name="DiT-Ti/2"), state, names, {"objective": "flow", "flow": {"prediction": "noise"}})
    check_objective(source, TrainConfig(objective="flow", init_from="SiT.pt", flow=dict(prediction="noise")))
    assert not caplog.records
    check_objective(source, TrainConfig(objective="flow", init_from="SiT.pt"))
    assert "prediction 'noise' -> 'velocity'" in caplog.text
    with pytest.raises(UserError, match="holds a flow-objective model and this run trains diffusion: .*pass --objective flow"):
        check_objective(source, TrainConfig(init_from="SiT.pt"))


def test_a_run_source_gives_a_fresh_run_its_model_blocks_and_objective_unless_a_flag_names_them(tmp_path, capsys):
    """`train --init-from RUN` with no --model / --objective / block flags takes them from the
    source's record (one line each), so the plain command fits; a flag given still wins."""
    source = tmp_path / "source"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(distributed, "local_device", lambda: torch.device("cpu"))
        train(TrainConfig(data="digits", run_dir=str(source), objective="flow", steps=1, ckpt_every=1, global_batch=8,
                          model=ModelConfig("DiT-Ti/4", learn_sigma=False, norm="rms", rope=True), precision="fp32",
                          sample_steps="2", log_every=1), progress=False)
    run = tmp_path / "run"
    assert main(["train", "--run-dir", str(run), "--steps", "1", "--init-from", str(source), *QUICK]) == 0
    out = capsys.readouterr().out
    assert f"model DiT-Ti/4: from --init-from {source}" in out and "objective flow: from --init-from" in out
    saved = json.loads((run / "config.json").read_text())
    assert saved["objective"] == "flow" and saved["model"]["name"] == "DiT-Ti/4"
    assert (saved["model"]["norm"], saved["model"]["rope"], saved["model"]["learn_sigma"]) == ("rms", True, False)
    line = _refused(capsys, "train", "--run-dir", str(tmp_path / "other"), "--steps", "1", "--init-from", str(source),
                    "--model", "DiT-Ti/2", *QUICK)
    assert "DiT-Ti/4" in line  # the flag won, and the error names the model that fits


def test_a_meanflow_run_starts_from_a_flow_run_as_exactly_that_flow_model(tmp_path):
    """Issue 25 item 4: `--objective meanflow --init-from FLOW_RUN` holds the flow EMA's weights and
    an interval embedder whose output layer is zero, so the MeanFlow network at any interval
    predicts what the flow network predicts; a flow source of another path is refused."""
    flow = tmp_path / "flow"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(distributed, "local_device", lambda: torch.device("cpu"))
        train(TrainConfig(data="digits", run_dir=str(flow), objective="flow", steps=2, ckpt_every=2, global_batch=8,
                          model=ModelConfig("DiT-Ti/2"), precision="fp32", sample_steps="2", log_every=1), progress=False)
    ema = load_file(str(flow / "checkpoints" / "step-0000002" / "ema.safetensors"))
    cfg = TrainConfig(data="digits", model=ModelConfig("DiT-Ti/2"), objective="meanflow", init_from=str(flow),
                      run_dir=str(tmp_path / "mf"))
    state, ema_now, record = _fresh_start(cfg)
    assert all(torch.equal(state[k], ema[k]) and torch.equal(ema_now[k], ema[k]) for k in ema)
    extra = sorted(set(state) - set(ema))
    assert extra and all(k.startswith("h_embedder.") for k in extra)
    assert all(not state[k].any() for k in extra if k.startswith("h_embedder.mlp.2."))
    flow_net, mf_net = create_model("DiT-Ti/2", input_size=8, in_channels=1, num_classes=10), create_model(
        "DiT-Ti/2", input_size=8, in_channels=1, num_classes=10, interval_embedding=True)
    flow_net.load_state_dict(ema)
    mf_net.load_state_dict(state)
    x, t, y = torch.randn(3, 1, 8, 8), torch.rand(3), torch.tensor([1, 2, 10])
    assert torch.equal(mf_net.eval()(x, t, y, interval=torch.rand(3)), flow_net.eval()(x, t, y))
    assert record["format"] == "ditforge"

    gvp = tmp_path / "gvp"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(distributed, "local_device", lambda: torch.device("cpu"))
        train(TrainConfig(data="digits", run_dir=str(gvp), objective="flow", flow=dict(path="gvp"), steps=1, ckpt_every=1,
                          global_batch=8, model=ModelConfig("DiT-Ti/2"), precision="fp32", sample_steps="2"),
              progress=False)
    with pytest.raises(UserError, match="linear path that predicts the velocity"):
        _fresh_start(TrainConfig(data="digits", model=ModelConfig("DiT-Ti/2"), objective="meanflow", init_from=str(gvp),
                                 run_dir=str(tmp_path / "mf2")))


def test_a_meanflow_fine_tune_of_a_flow_model_trains_more_of_each_batch_on_intervals(tmp_path):
    """From a flow run, `--objective meanflow` trains FINETUNE_FLOW_SHARE of each batch at r = t
    (not the from-scratch 0.75) and says so; --mf-flow-share wins; a fine-tune of that MeanFlow run
    keeps its recorded share, and a run from scratch the paper's."""
    from ditforge.meanflow.init import FINETUNE_FLOW_SHARE

    assert FINETUNE_FLOW_SHARE < MeanFlowObjective().flow_share
    flow = tmp_path / "flow"
    run_cli("train", "--run-dir", str(flow), "--data", "digits", "--model", "DiT-Ti/2", "--objective", "flow",
            "--steps", "1", *QUICK)

    def share(name: str, *extra: str) -> tuple[float, str]:
        out = run_cli("train", "--run-dir", str(tmp_path / name), "--data", "digits", "--objective", "meanflow",
                      "--steps", "1", *QUICK, *extra).stdout
        return json.loads((tmp_path / name / "config.json").read_text())["meanflow"]["flow_share"], out

    got, out = share("mf", "--init-from", str(flow))
    assert got == FINETUNE_FLOW_SHARE and f"mf-flow-share {FINETUNE_FLOW_SHARE:g}: a MeanFlow fine-tune of a flow model" in out
    assert share("mf-given", "--init-from", str(flow), "--mf-flow-share", "0.6")[0] == 0.6
    assert share("mf-of-mf", "--init-from", str(tmp_path / "mf-given"))[0] == 0.6
    got, out = share("scratch", "--model", "DiT-Ti/2")
    assert got == MeanFlowObjective().flow_share and "mf-flow-share" not in out
