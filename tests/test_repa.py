"""REPA (ditforge/repa): the loss against its closed form, the hidden-token path of the model,
where gradients go, the frozen encoder, the training step with and without it, checkpoints and
resume, and the errors. The encoder is a tiny random-weight DINOv2 saved with save_pretrained
(conftest's `dinov2_dir`); REPA on a latent store is in test_latent_pipeline.py."""

from __future__ import annotations

import copy
import json
import math
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import conftest
from test_distributed import torchrun
from ditforge.config import TrainConfig
from ditforge.errors import UserError
from ditforge.models import create_model
from ditforge.objectives import objective_of_run
from ditforge.repa import HiddenTokens, Projector, alignment_loss, load_encoder
from ditforge.repa.aligner import FeatureSource, build_aligner, cached_features
from ditforge.train.distributed import Dist
from ditforge.train.step import TrainStep, step_randomness

transformers = pytest.importorskip("transformers")

TINY = ["--model", "DiT-Ti/4", "--batch-size", "16", "--log-every", "2", "--sample-steps", "2", "--no-progress"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These tensors are tiny: one thread is faster than two fighting over a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def run_cli(*args: str, check: bool = True):
    """conftest's run_cli with one thread: these runs are tiny (two threads on a busy machine are 4x slower)."""
    proc = subprocess.run([sys.executable, "-m", "ditforge", *args], capture_output=True, text=True, timeout=600,
                          env=conftest.cpu_env(OMP_NUM_THREADS="1"))
    if check and proc.returncode != 0:
        raise AssertionError(f"ditforge {' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def _repa_args(folder: str) -> list[str]:
    return ["--repa-encoder", folder, "--repa-depth", "2", "--repa-projector-dim", "32", "--repa-resolution", "16"]


def test_alignment_loss_is_negative_mean_cosine():
    projected = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])  # (1, 2, 2)
    target = torch.tensor([[[3.0, 0.0], [1.0, 1.0]]])  # cos 1 and 1/sqrt(2)
    loss = alignment_loss(projected, target)
    assert loss.shape == (1,)
    assert loss.item() == pytest.approx(-(1 + 1 / math.sqrt(2)) / 2, abs=1e-6)
    assert alignment_loss(-projected, target).item() == pytest.approx((1 + 1 / math.sqrt(2)) / 2, abs=1e-6)
    with pytest.raises(ValueError, match="differ in shape"):
        alignment_loss(projected, target[:, :1])


def test_projector_is_three_linear_layers_with_silu():
    p = Projector(8, 16, 4)
    assert [type(m).__name__ for m in p] == ["Linear", "SiLU", "Linear", "SiLU", "Linear"]
    linears = [m for m in p if isinstance(m, torch.nn.Linear)]
    assert [tuple(m.weight.shape) for m in linears] == [(16, 8), (16, 16), (4, 16)]
    assert all(torch.all(m.bias == 0) for m in linears)


@pytest.mark.parametrize("spec", ["none", "ops", "full"])
def test_hidden_tokens_are_those_after_block_k_and_output_unchanged(spec):
    torch.manual_seed(0)
    model = create_model("DiT-Ti/2", input_size=8, in_channels=1, num_classes=10)
    for p in model.parameters():  # leave the adaLN-zero start, so every block does something
        torch.nn.init.normal_(p, std=0.05) if p.requires_grad else None
    model.grad_checkpointing = spec
    model.train()
    x, t, y = torch.randn(3, 1, 8, 8), torch.tensor([1, 500, 999]), torch.tensor([0, 3, 9])
    drop = torch.zeros(3, dtype=torch.bool)
    out = model(x, t, y, force_drop_ids=drop)
    for k in (1, 2, 3, 6):
        out_k, hidden = model(x, t, y, force_drop_ids=drop, return_hidden=k)
        assert torch.equal(out_k, out)
        h = model.x_embedder(x) + model.pos_embed
        c = model.t_embedder(t) + model.y_embedder(y, True, drop)
        for block in model.blocks[:k]:
            h = block(h, c)
        torch.testing.assert_close(hidden, h)
    with pytest.raises(ValueError, match="return_hidden"):
        model(x, t, y, return_hidden=7)


def _tiny_setup(folder, objective="diffusion", **repa):
    cfg = TrainConfig(model=dict(name="DiT-Ti/4"), objective=objective, global_batch=8, steps=3,
                      repa=dict(encoder=folder, depth=2, projector_dim=32, resolution=16, **repa) if folder else {})
    torch.manual_seed(0)
    model = create_model("DiT-Ti/4", input_size=8, in_channels=1, num_classes=10)
    g = torch.Generator().manual_seed(1)
    batches = [[(torch.rand(8, 1, 8, 8, generator=g) * 2 - 1, torch.randint(0, 10, (8,), generator=g))] for _ in range(3)]
    return cfg, model, batches


class _Data:  # the part of TrainingData that build_aligner reads: what the model's inputs are
    def __init__(self, kind="identity"):
        self.autoencoder = {"kind": kind}


def test_gradient_reaches_projector_and_early_blocks_not_encoder(dinov2_dir):
    cfg, model, batches = _tiny_setup(dinov2_dir)
    aligner = build_aligner(cfg, model, _Data(), torch.device("cpu"))
    x, y = batches[0][0]
    model.train()
    fwd = HiddenTokens(model, aligner.depth, None)
    fwd(x, torch.full((8,), 10), y)
    aligner.loss(fwd.hidden, aligner.target(x)).mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in aligner.projector.parameters())
    assert model.x_embedder.proj.weight.grad.abs().sum() > 0
    for b in model.blocks[:2]:  # adaLN-zero: at the start the gates get the gradient
        assert b.adaLN_modulation[-1].weight.grad.abs().sum() > 0
    for b in model.blocks[2:]:
        assert all(p.grad is None for p in b.parameters())
    assert all(p.grad is None and not p.requires_grad for p in aligner.encoder.parameters())


def test_train_step_trains_model_and_projector_and_keeps_encoder_frozen(dinov2_dir):
    cfg, model, batches = _tiny_setup(dinov2_dir)
    aligner = build_aligner(cfg, model, _Data(), torch.device("cpu"))
    enc_before = copy.deepcopy(aligner.encoder.state_dict())
    proj_before = copy.deepcopy(aligner.projector.state_dict())
    stepper = TrainStep(cfg, model, Dist(), "fp32", aligner)
    for step, b in enumerate(batches):
        loss = stepper(step, b, [0])
        assert torch.isfinite(loss) and -1 <= stepper.terms["repa"].item() <= 1
    assert all(torch.equal(v, aligner.encoder.state_dict()[k]) for k, v in enc_before.items())
    assert not all(torch.equal(v, aligner.projector.state_dict()[k]) for k, v in proj_before.items())
    assert aligner.encoder.net.training is False


def test_cached_features_train_like_features_per_batch(dinov2_dir):
    results = []
    for cache in (False, True):
        cfg, model, batches = _tiny_setup(dinov2_dir)
        aligner = build_aligner(cfg, model, _Data(), torch.device("cpu"))
        stepper = TrainStep(cfg, model, Dist(), "fp32", aligner)
        for step, ((x, y),) in enumerate(batches):
            b = [(x, y, cached_features(aligner, x, torch.device("cpu"), batch_size=3))] if cache else [(x, y)]
            stepper(step, b, [0])
        results.append(model.state_dict())
    for k, v in results[0].items():
        torch.testing.assert_close(results[1][k], v, rtol=1e-5, atol=1e-6)


def test_batch_target_reads_stored_pixels_as_images_and_passes_cached_features(dinov2_dir):
    cfg, model, _ = _tiny_setup(dinov2_dir)
    aligner = build_aligner(cfg, model, _Data(), torch.device("cpu"))
    x = torch.zeros(3, 1, 8, 8)  # the model's input: a latent store's latents, say
    stored = torch.randint(0, 256, (3, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(aligner.batch_target(x, [stored]), aligner.target(stored.float() / 127.5 - 1), rtol=0, atol=0)
    features = torch.randn(3, 4, 32)
    assert aligner.batch_target(x, [features]) is features
    torch.testing.assert_close(aligner.batch_target(x, []), aligner.target(x), rtol=0, atol=0)


def test_pixel_space_store_feeds_its_inputs_to_the_encoder_and_needs_no_kept_pixels(dinov2_dir, tmp_path):
    from ditforge.data.autoencoder import IdentityAutoencoder
    from ditforge.data.store import extract, finalize_store
    from ditforge.data.training_data import open_training_data
    from ditforge.repa.aligner import training_source

    ident, g = IdentityAutoencoder(1), torch.Generator().manual_seed(0)
    images = {f"img-{k}": torch.randint(0, 256, (8, 8), generator=g, dtype=torch.uint8).numpy() for k in range(4)}
    extract([(key, 0) for key in images], images.__getitem__, ident, tmp_path / "px")
    finalize_store(tmp_path / "px", {"autoencoder": ident.describe(), "class_names": ["a"], "image_size": 8})
    cfg, model, _ = _tiny_setup(dinov2_dir)
    cfg.data = str(tmp_path / "px")
    data = open_training_data(cfg)
    aligner = build_aligner(cfg, model, data, torch.device("cpu"))  # not refused: its inputs are the pixels
    assert training_source(cfg, aligner, data, torch.device("cpu")) is data.source


def test_feature_source_gives_each_image_its_features():
    from ditforge.data.loader import InfiniteLoader, TensorSource

    images = torch.arange(10.0).view(10, 1, 1, 1)
    feats = torch.arange(10.0).view(10, 1, 1) * 2
    loader = InfiniteLoader(FeatureSource(TensorSource(images, torch.zeros(10, dtype=torch.long)), feats), 4, seed=3)
    for _ in range(4):
        ((x, _, f),) = loader.next_step()
        assert torch.equal(f.flatten(), x.flatten() * 2)


def test_flow_objective_with_repa_trains(dinov2_dir):
    cfg, model, batches = _tiny_setup(dinov2_dir, objective="flow")
    stepper = TrainStep(cfg, model, Dist(), "fp32", build_aligner(cfg, model, _Data(), torch.device("cpu")))
    for step, b in enumerate(batches):
        assert torch.isfinite(stepper(step, b, [0]))
    assert torch.isfinite(stepper.terms["repa"])


def test_repa_off_step_is_the_plain_objective_step():
    """REPA off trains exactly as the step did before REPA: one AdamW over the model, the
    objective's loss, the step's randomness and nothing else."""
    cfg, model, batches = _tiny_setup("")
    cfg.optim.grad_clip = 0.5
    ref = copy.deepcopy(model)
    stepper = TrainStep(cfg, model, Dist(), "fp32")
    opt = torch.optim.AdamW(ref.parameters(), lr=cfg.optim.lr, betas=cfg.optim.betas, weight_decay=0.0, fused=True)
    objective = objective_of_run(cfg)
    ref.train()
    for step, b in enumerate(batches):
        stepper(step, b, [0])
        t, noise, drop = step_randomness(cfg, step, (1, 8, 8), objective, torch.device("cpu"))
        (x, y), = b
        opt.zero_grad(set_to_none=True)
        loss = objective.training_losses(lambda a, s, c: ref(a, s, c, force_drop_ids=drop), x, t, y, noise)["loss"].mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5)
        opt.step()
    assert stepper.terms == {} and stepper.repa_opt is None
    for k, v in ref.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k


def test_run_folder_written_before_repa_resumes(tmp_path):
    from ditforge.train.resume import check_same_run

    cfg = TrainConfig(run_dir=str(tmp_path))
    old = cfg.to_dict()
    del old["repa"]
    (tmp_path / "config.json").write_text(json.dumps(old))
    check_same_run(cfg, tmp_path)  # the same run: no error
    with pytest.raises(UserError, match="repa"):
        check_same_run(TrainConfig(run_dir=str(tmp_path), repa=dict(encoder="inception")), tmp_path)


def test_config_without_repa_loads_as_off_and_depth_resolves():
    d = TrainConfig().to_dict()
    del d["repa"]
    assert TrainConfig.from_dict(d).repa.encoder == ""
    cfg = TrainConfig(model=dict(name="DiT-XL/2"), repa=dict(encoder="inception"))
    assert cfg.repa.depth == 9  # depth // 3
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))).repa == cfg.repa


@pytest.mark.parametrize("repa, words", [
    (dict(encoder="./no/such/encoder"), "./no/such/encoder"),
    (dict(encoder="a/b/c"), "a/b/c"),
    (dict(encoder="timm:"), "timm:"),
    (dict(encoder="timm:vit_small_patch14_dinov2=/no/such/weights.safetensors"), "/no/such/weights.safetensors"),
    (dict(encoder="inception", depth=7), "7"),
    (dict(encoder="inception", weight=-0.5), "-0.5"),
    (dict(encoder="inception", projector_dim=0), "0"),
    (dict(encoder="inception", cache="maybe"), "maybe"),
])
def test_bad_repa_settings_are_user_errors(repa, words):
    with pytest.raises(UserError, match=words.replace(".", r"\.")):
        TrainConfig(model=dict(name="DiT-Ti/4"), repa=repa)


def test_encoders_that_cannot_load_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="could not be loaded"):
        load_encoder(str(tmp_path))  # a folder without a model
    with pytest.raises(UserError, match="patch size"):
        load_encoder(_save_tiny(tmp_path), resolution=18)


def _save_tiny(tmp_path) -> str:
    cfg = transformers.Dinov2Config(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16, patch_size=4)
    transformers.Dinov2Model(cfg).save_pretrained(tmp_path / "tiny")
    return str(tmp_path / "tiny")


def test_timm_encoder_without_timm_says_so():
    import importlib.util

    if importlib.util.find_spec("timm") is not None:
        pytest.skip("timm is installed")
    with pytest.raises(UserError, match="timm"):
        load_encoder("timm:vit_small_patch14_dinov2")


@pytest.fixture(scope="module")
def timm_vit(tmp_path_factory):
    """A random-weight DINOv2 ViT-S/14 of timm (built at its own 518 px) saved as safetensors, and
    the model."""
    timm = pytest.importorskip("timm")
    from safetensors.torch import save_file

    torch.manual_seed(0)
    net = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0)
    path = tmp_path_factory.mktemp("timm") / "vit_s14.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    return str(path), net


def test_timm_encoder_reads_local_weights_at_the_asked_resolution(timm_vit):
    from timm.layers import resample_abs_pos_embed

    path, net = timm_vit
    enc = load_encoder(f"timm:vit_small_patch14_dinov2={path}", resolution=28)
    assert (enc.dim, enc.resolution) == (384, 28)
    mine = enc.net.state_dict()
    torch.testing.assert_close(mine["blocks.3.mlp.fc1.weight"], net.state_dict()["blocks.3.mlp.fc1.weight"], rtol=0, atol=0)
    # the 37x37 position embedding of 518 px resampled to the 2x2 grid of 28 px (CLS kept)
    want = resample_abs_pos_embed(net.pos_embed, (2, 2), num_prefix_tokens=1)
    torch.testing.assert_close(mine["pos_embed"], want)
    x = torch.rand(3, 1, 8, 8) * 2 - 1
    f = enc.features(x, 2)  # the 2x2 patch grid is the token grid: no averaging
    assert f.shape == (3, 4, 384) and f.dtype == torch.float32
    tokens = enc.net.forward_features(enc.preprocess(x))  # (3, 1 + 4, 384): CLS first
    torch.testing.assert_close(f, tokens[:, 1:].float())
    # ImageNet's normalisation from timm's pretrained config, after [-1, 1] -> [0, 1]
    torch.testing.assert_close(enc.preprocess(torch.ones(1, 3, 28, 28))[0, :, 0, 0],
                               (1 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225]))


@pytest.mark.slow
def test_train_with_a_timm_encoder(timm_vit, tmp_path):
    run = tmp_path / "r"
    out = run_cli("train", "--run-dir", str(run), "--steps", "2", "--ckpt-every", "2", *TINY,
                  "--repa-encoder", f"timm:vit_small_patch14_dinov2={timm_vit[0]}", "--repa-resolution", "28",
                  "--repa-projector-dim", "32")
    assert "| repa " in out.stdout
    assert load_file(str(run / "checkpoints" / "step-0000002" / "projector.safetensors"))


def test_encoder_features_on_the_token_grid(dinov2_dir):
    enc = load_encoder(dinov2_dir, 16)
    f = enc.features(torch.rand(3, 1, 8, 8) * 2 - 1, 2)
    assert f.shape == (3, 4, 32) and f.dtype == torch.float32
    # patch tokens only: the CLS token is dropped, the 4x4 patch grid is averaged onto 2x2
    x = enc.preprocess(torch.zeros(1, 3, 8, 8))
    tokens = enc.net(pixel_values=x).last_hidden_state[:, 1:]  # (1, 16, 32)
    grid = tokens.view(1, 4, 4, 32)
    torch.testing.assert_close(enc.features(torch.zeros(1, 3, 8, 8), 2)[0, 0], grid[0, :2, :2].mean((0, 1)))


@pytest.mark.slow
def test_train_with_repa_end_to_end_then_resume(dinov2_dir, tmp_path):
    whole, part = tmp_path / "whole", tmp_path / "part"
    run_cli("train", "--run-dir", str(whole), "--steps", "4", "--ckpt-every", "4", *TINY, *_repa_args(dinov2_dir))
    run_cli("train", "--run-dir", str(part), "--steps", "2", "--ckpt-every", "2", *TINY, *_repa_args(dinov2_dir))
    proc = run_cli("train", "--run-dir", str(part), "--steps", "4", "--ckpt-every", "2", *TINY, *_repa_args(dinov2_dir))
    assert "resumed from" in proc.stderr + proc.stdout and "| repa -" in proc.stderr + proc.stdout
    a, b = whole / "checkpoints" / "step-0000004", part / "checkpoints" / "step-0000004"
    for name in ("model", "ema", "optimizer", "projector", "projector_optimizer"):
        ta, tb = load_file(a / f"{name}.safetensors"), load_file(b / f"{name}.safetensors")
        assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta), name
    # the model's weights keep the DiT keys; the projector lives beside them
    dit_keys = create_model("DiT-Ti/4", input_size=8, in_channels=1, num_classes=10).state_dict().keys()
    assert load_file(a / "model.safetensors").keys() == dit_keys
    state = json.loads((a / "state.json").read_text())
    assert state["config"]["repa"]["encoder"] == dinov2_dir and "projector" in state["extras"]
    assert json.loads((whole / "config.json").read_text())["repa"]["depth"] == 2
    run_cli("sample", str(a), "--out", str(tmp_path / "s.png"), "--steps", "3", "--per-class", "1")
    assert (tmp_path / "s.png").is_file()


def test_bad_repa_options_on_the_command_line(tmp_path):
    proc = run_cli("train", "--run-dir", str(tmp_path / "r"), "--steps", "1", *TINY, "--repa-encoder", "inception",
                   "--repa-depth", "9", check=False)
    assert proc.returncode == 2 and "repa depth 9" in proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_with_repa_match_one(dinov2_dir, tmp_path, parallel):
    """Under torchrun the projector is averaged over ranks like the model (DDP, also beside FSDP),
    and one gradient norm is clipped over both (sharded model, whole projector): a clip this small
    scales every step, so a norm of one shard alone would show in the weights."""
    args = ["--steps", "2", "--ckpt-every", "2", "--grad-clip", "0.01", *TINY, *_repa_args(dinov2_dir)]
    run_cli("train", "--run-dir", str(tmp_path / "one"), *args)
    torchrun("train", "--run-dir", str(tmp_path / "two"), "--parallel", parallel, *args)
    for name in ("model", "projector", "projector_optimizer"):
        a = load_file(tmp_path / "one" / "checkpoints" / "step-0000002" / f"{name}.safetensors")
        b = load_file(tmp_path / "two" / "checkpoints" / "step-0000002" / f"{name}.safetensors")
        assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-5, name


def test_cache_is_used_only_for_unflipped_pixels_in_memory(dinov2_dir):
    from ditforge.data.training_data import open_training_data
    from ditforge.repa.aligner import training_source, use_cache

    cfg, model, _ = _tiny_setup(dinov2_dir)
    data = open_training_data(cfg)
    aligner = build_aligner(cfg, model, data, torch.device("cpu"))
    assert use_cache(cfg, aligner, data)
    src = training_source(cfg, aligner, data, torch.device("cpu"))
    assert isinstance(src, FeatureSource) and src.features.shape == (len(data), 4, 32)
    cfg.repa.cache = "off"
    assert training_source(cfg, aligner, data, torch.device("cpu")) is data.source
    cfg.hflip, cfg.repa.cache = True, "auto"
    assert not use_cache(cfg, aligner, data)
    cfg.repa.cache = "on"
    with pytest.raises(UserError, match="hflip"):
        use_cache(cfg, aligner, data)
