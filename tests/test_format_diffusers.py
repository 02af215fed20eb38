"""formats/diffusers.py: export to, and import from, a diffusers `DiTPipeline` folder, checked
against real diffusers (random weights, small shapes, nothing downloaded).

Measured differences the tolerances below rest on (2-core AMD EPYC, fp32, torch 2.13, diffusers
0.42.1; `benchmarks/export_differences.py` has the full table):
- forward: diffusers' timestep features use `downscale_freq_shift=1` (frequencies over 127,
  DiT's over 128). With that set to 0 on the loaded module the exported transformer computes
  our forward bit for bit (max abs difference 0.0); as exported, DiT-S/2 at outputs of max abs
  about 1.3 differs by about 0.06.
- DDIM, 25 steps, guided: with the shift set to 0, DiTPipeline's latents equal our DDIM's to
  about 1e-6 of their size (float32 schedule tables there, float64 ones rounded here).
"""

import json

import pytest
import torch

from ditforge.data.autoencoder import load_autoencoder
from ditforge.diffusion import create_diffusion, ddim_sample, guided_denoiser
from ditforge.diffusion.schedules import beta_schedule
from ditforge.errors import UserError
from ditforge.formats.weights import ModelWeights
from ditforge.models import create_model

diffusers = pytest.importorskip("diffusers")
from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel  # noqa: E402

from ditforge.formats.diffusers import (  # noqa: E402
    NULL_LABEL, is_diffusers_folder, read_diffusers, write_diffusers,
)

NAMES = ["tench", "goldfish", "great white shark", "tiger shark", "hammerhead", "electric ray", "stingray", "cock",
         "hen", "ostrich"]
RECORDED_SCALE = 0.25  # not the VAE config's 0.18215: the export must carry the recorded one


@pytest.fixture(scope="module")
def vae(tmp_path_factory):
    """A tiny random AutoencoderKL folder (downsample 2, 4 latent channels) and its description."""
    folder = tmp_path_factory.mktemp("vae")
    torch.manual_seed(0)
    AutoencoderKL(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=32,
                  sample_size=16).save_pretrained(folder)
    return dict(load_autoencoder(str(folder), device="cpu").describe(), scale=RECORDED_SCALE)


def make_weights(vae, name="DiT-S/2", num_classes=10, schedule="linear", steps=1000, seed=0, learn_sigma=True) -> ModelWeights:
    """A random model whose outputs depend on t and y: DiT's zero-initialised adaLN and final
    layers drawn from N(0, 0.02^2) instead."""
    torch.manual_seed(seed)
    args = dict(name=name, input_size=8, in_channels=4, num_classes=num_classes, learn_sigma=learn_sigma,
                class_dropout_prob=0.1, norm="layer", mlp="gelu", rope=False, qk_norm=False)
    model = create_model(**args)
    with torch.no_grad():
        for layer in [b.adaLN_modulation[-1] for b in model.blocks] + [model.final_layer.adaLN_modulation[-1], model.final_layer.linear]:
            layer.weight.normal_(0, 0.02)
            layer.bias.normal_(0, 0.02)
    names = NAMES if num_classes == 10 else [f"class {i}" for i in range(num_classes)]
    return ModelWeights(args, model.state_dict(), names,
                        {"objective": "diffusion", "diffusion": {"noise_schedule": schedule, "diffusion_steps": steps}}, vae)


@pytest.fixture(scope="module")
def exported(vae, tmp_path_factory):
    """DiT-S/2 (8x8x4 latents, 10 classes) and its export."""
    weights = make_weights(vae)
    return weights, write_diffusers(weights, tmp_path_factory.mktemp("export") / "dit-s2")


@pytest.fixture(scope="module")
def tiny(vae, tmp_path_factory):
    """DiT-Ti/2 (the registry's CPU size) and its export, for the 25-step pipeline runs."""
    weights = make_weights(vae, name="DiT-Ti/2", seed=1)
    return weights, write_diffusers(weights, tmp_path_factory.mktemp("export") / "dit-ti2")


def load_pipe(folder) -> DiTPipeline:
    pipe = DiTPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def set_time_shift(transformer: DiTTransformer2DModel, shift: float) -> None:
    """diffusers' timestep-feature convention on a loaded transformer: 1 as it ships, 0 as DiT."""
    for block in transformer.transformer_blocks:
        block.norm1.emb.time_proj.downscale_freq_shift = shift


def pipeline_latents(pipe: DiTPipeline, labels, seed: int, cfg: float, steps: int) -> torch.Tensor:
    """The latents DiTPipeline hands its VAE (already divided by the scaling factor): `vae.decode`
    wrapped for one call, the pipeline itself unchanged."""
    seen = {}
    decode = pipe.vae.decode

    def keep(z, *args, **kwargs):
        seen["z"] = z.clone()
        return decode(z, *args, **kwargs)

    pipe.vae.decode = keep
    try:
        pipe(labels, guidance_scale=cfg, generator=torch.Generator().manual_seed(seed), num_inference_steps=steps,
             output_type="pt")
    finally:
        del pipe.vae.decode
    return seen["z"]


def our_ddim_latents(weights: ModelWeights, labels, seed: int, cfg: float, steps: int, scale: float) -> torch.Tensor:
    """Our DDIM (ADM's `ddimN` respacing = diffusers' 'leading' grid) from the noise DiTPipeline
    draws (`randn_tensor` = `torch.randn` with its generator on the CPU), scaled as it scales."""
    model = weights.build().eval()
    noise = torch.randn((len(labels), 4, 8, 8), generator=torch.Generator().manual_seed(seed))
    denoise = guided_denoiser(model, torch.tensor(labels), cfg, model.num_classes, model.in_channels)
    with torch.no_grad():
        x0 = ddim_sample(create_diffusion(f"ddim{steps}", "linear", True, 1000), denoise, noise)
    return 1 / scale * x0  # DiTPipeline: `latents = 1 / self.vae.config.scaling_factor * latents`


# -- the key map ------------------------------------------------------------------------


@pytest.mark.parametrize("name,num_classes,learn_sigma", [("DiT-S/2", 10, True), ("DiT-S/2", 1000, True), ("DiT-Ti/2", 10, False)])
def test_export_then_import_returns_the_same_tensors_bit_for_bit(vae, tmp_path, name, num_classes, learn_sigma):
    weights = make_weights(vae, name=name, num_classes=num_classes, learn_sigma=learn_sigma)
    back = read_diffusers(write_diffusers(weights, tmp_path / "out"))
    assert sorted(back.state_dict) == sorted(weights.state_dict)
    for key, value in weights.state_dict.items():
        assert back.state_dict[key].dtype == value.dtype and torch.equal(back.state_dict[key], value), key
    assert back.model_args == weights.model_args
    assert back.class_names == weights.class_names
    assert back.objective_config == weights.objective_config
    assert back.autoencoder == load_autoencoder(str(tmp_path / "out" / "vae"), device="cpu").describe()
    back.build()  # strict: every key and shape


def test_exported_label_table_has_our_null_row_at_1000(exported):
    weights, folder = exported
    from safetensors.torch import load_file

    tensors = load_file(str(folder / "transformer" / "diffusion_pytorch_model.safetensors"))
    ours = weights.state_dict["y_embedder.embedding_table.weight"]  # (11, 384), row 10 = null
    for i in range(12):  # one copy per block, all equal
        table = tensors[f"transformer_blocks.{i}.norm1.emb.class_embedder.embedding_table.weight"]
        assert table.shape == (NULL_LABEL + 1, 384)
        assert torch.equal(table[:10], ours[:10])
        assert torch.equal(table[NULL_LABEL], ours[10])
        assert torch.equal(table[10:NULL_LABEL], ours[10].expand(NULL_LABEL - 10, -1))  # the filler: null copies
        assert torch.equal(tensors[f"transformer_blocks.{i}.norm1.emb.timestep_embedder.linear_2.weight"],
                           weights.state_dict["t_embedder.mlp.2.weight"])
    config = json.loads((folder / "transformer" / "config.json").read_text())
    assert config["num_embeds_ada_norm"] == NULL_LABEL and config["norm_eps"] == 1e-6


def test_forward_equals_diffusers_but_for_its_timestep_convention(exported):
    """Same (x, t, y): bit for bit once diffusers' downscale_freq_shift is DiT's 0; as exported
    (shift 1) within 0.1 at outputs of max abs about 1.3 (measured 0.058)."""
    weights, folder = exported
    model = weights.build().eval()
    theirs = DiTTransformer2DModel.from_pretrained(folder / "transformer").eval()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 4, 8, 8, generator=g)
    t = torch.tensor([0, 10, 500, 999])
    y = torch.tensor([0, 3, 9, 10])  # 10 = our null class, 1000 in diffusers
    with torch.no_grad():
        ours = model(x, t, y)
        shipped = theirs(x, timestep=t, class_labels=torch.tensor([0, 3, 9, NULL_LABEL])).sample
        set_time_shift(theirs, 0)
        dit_convention = theirs(x, timestep=t, class_labels=torch.tensor([0, 3, 9, NULL_LABEL])).sample
    assert ours.abs().max() > 0.5  # a model whose output depends on its weights
    assert (dit_convention - ours).abs().max().item() <= 1e-5
    gap = (shipped - ours).abs().max().item()
    assert 1e-3 < gap < 0.1, gap  # the convention alone makes this gap


def test_dit_pipeline_ddim_reaches_our_ddim_latents(tiny):
    """DiTPipeline, 25 DDIM steps, guidance 4, from the same noise as our DDIM sampler: equal to
    1e-5 of the latents' size with DiT's timestep convention; further apart as shipped."""
    weights, folder = tiny
    labels = [0, 3, 9]
    pipe = load_pipe(folder)
    ours = our_ddim_latents(weights, labels, seed=5, cfg=4.0, steps=25, scale=pipe.vae.config.scaling_factor)
    shipped = pipeline_latents(pipe, labels, seed=5, cfg=4.0, steps=25)
    set_time_shift(pipe.transformer, 0)
    dit_convention = pipeline_latents(pipe, labels, seed=5, cfg=4.0, steps=25)
    size = ours.abs().max().item()
    close = (dit_convention - ours).abs().max().item()
    assert close <= 1e-5 * size, (close, size)
    assert (shipped - ours).abs().max().item() > 100 * close


def test_guided_pipeline_uses_our_null_row(vae, tiny, tmp_path):
    """Another null row (ours, row 10) changes DiTPipeline's guided samples and nothing else."""
    weights, folder = tiny
    changed = make_weights(vae, name="DiT-Ti/2", seed=1)
    table = changed.state_dict["y_embedder.embedding_table.weight"]
    changed.state_dict["y_embedder.embedding_table.weight"] = torch.cat([table[:10], table[10:] + 0.5])
    other = write_diffusers(changed, tmp_path / "other-null")
    a, b = load_pipe(folder), load_pipe(other)
    guided = [pipeline_latents(p, [2, 7], seed=1, cfg=4.0, steps=5) for p in (a, b)]
    plain = [pipeline_latents(p, [2, 7], seed=1, cfg=1.0, steps=5) for p in (a, b)]
    assert (guided[0] - guided[1]).abs().max() > 1e-3
    assert torch.equal(plain[0], plain[1])


def test_class_names_come_back_through_the_pipeline_and_the_reader(exported):
    weights, folder = exported
    pipe = load_pipe(folder)
    assert pipe.get_label_ids(["great white shark", "ostrich"]) == [2, 9]
    assert pipe.labels == {name: i for i, name in enumerate(NAMES)}
    assert read_diffusers(folder).class_names == NAMES


def test_vae_keeps_the_recorded_scale(exported):
    weights, folder = exported
    pipe = load_pipe(folder)
    assert pipe.vae.config.scaling_factor == RECORDED_SCALE
    assert read_diffusers(folder).autoencoder["scale"] == RECORDED_SCALE
    z = torch.randn(1, 4, 8, 8)
    ours = load_autoencoder(weights.autoencoder, device="cpu").decode(z)  # decodes z / scale
    with torch.no_grad():
        theirs = pipe.vae.decode(z / pipe.vae.config.scaling_factor).sample.clamp(-1, 1)
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("schedule,steps", [("linear", 1000), ("linear", 500), ("cosine", 1000)])
def test_scheduler_has_our_betas(vae, tmp_path, schedule, steps):
    weights = make_weights(vae, name="DiT-Ti/2", schedule=schedule, steps=steps)
    folder = write_diffusers(weights, tmp_path / "out")
    scheduler = DDIMScheduler.from_pretrained(folder / "scheduler")
    assert scheduler.config.clip_sample is False and scheduler.config.set_alpha_to_one is True
    torch.testing.assert_close(scheduler.betas.double(), torch.from_numpy(beta_schedule(schedule, steps)), rtol=1e-6, atol=0)
    assert read_diffusers(folder).objective_config["diffusion"] == {"noise_schedule": schedule, "diffusion_steps": steps}


def test_reads_a_folder_that_diffusers_itself_wrote(vae, tmp_path):
    """As facebook/DiT-XL-2-256 is laid out: the class name Transformer2DModel, norm_eps 1e-5,
    1000 classes, diffusers' own init; DiTPipeline.save_pretrained plus id2label."""
    torch.manual_seed(2)
    transformer = DiTTransformer2DModel(num_attention_heads=3, attention_head_dim=64, in_channels=4, out_channels=8,
                                        num_layers=6, sample_size=8, patch_size=2).eval()
    for block in transformer.transformer_blocks[1:]:  # diffusers' own init draws a copy per block; a conversion has one
        block.norm1.emb.load_state_dict(transformer.transformer_blocks[0].norm1.emb.state_dict())
    ae = AutoencoderKL.from_pretrained(vae["id"])
    DiTPipeline(transformer, ae, DDIMScheduler(clip_sample=False)).save_pretrained(tmp_path / "hub")
    index = json.loads((tmp_path / "hub" / "model_index.json").read_text())
    index["id2label"] = {str(i): f"class {i}" for i in range(1000)}
    (tmp_path / "hub" / "model_index.json").write_text(json.dumps(index))
    config = json.loads((tmp_path / "hub" / "transformer" / "config.json").read_text())
    (tmp_path / "hub" / "transformer" / "config.json").write_text(json.dumps(dict(config, _class_name="Transformer2DModel")))
    assert is_diffusers_folder(tmp_path / "hub")

    weights = read_diffusers(tmp_path / "hub")
    assert weights.model_args["name"] == "DiT-Ti/2" and weights.model_args["num_classes"] == 1000
    assert weights.autoencoder["scale"] == 0.18215 and weights.autoencoder["id"] == str((tmp_path / "hub" / "vae").resolve())
    model = weights.build().eval()
    theirs = transformer.state_dict()
    assert torch.equal(model.blocks[4].attn.qkv.weight, torch.cat([theirs[f"transformer_blocks.4.attn1.to_{n}.weight"] for n in "qkv"]))
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([3, 700]), torch.tensor([5, 1000])
    set_time_shift(transformer, 0)
    with torch.no_grad():
        ours = model(x, t, y)
        gap = (ours - transformer(x, timestep=t, class_labels=y).sample).abs().max().item()
        for block in transformer.transformer_blocks:
            block.norm3.eps = 1e-6  # DiT's
        same = transformer(x, timestep=t, class_labels=y).sample
    assert 0 < gap < 1e-4  # their feed-forward LayerNorm's eps 1e-5 (measured 7.5e-6 at outputs of max abs 2) ...
    assert torch.equal(ours, same)  # ... and nothing else


# -- refusals: one line each ------------------------------------------------------------


def one_line_error(call) -> str:
    with pytest.raises(UserError) as e:
        call()
    message = str(e.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("change,words", [
    (dict(autoencoder={"kind": "identity", "channels": 1}), "pixel-space"),
    (dict(objective_config={"objective": "flow"}), "flow objective"),
    (dict(objective_config={"objective": "meanflow"}), "meanflow objective"),
    (dict(model_args={"norm": "rms"}), "norm='rms'"),
    (dict(model_args={"mlp": "swiglu"}), "mlp='swiglu'"),
    (dict(model_args={"rope": True}), "rope=True"),
    (dict(model_args={"qk_norm": True}), "qk_norm=True"),
    (dict(model_args={"mlp_ratio": 2.0}), "mlp_ratio=2.0"),
    (dict(model_args={"num_classes": 1001}), "1001 classes"),
    (dict(model_args={"class_dropout_prob": 0.0}), "no null class"),
])
def test_export_refuses_what_diffusers_cannot_hold(vae, tmp_path, change, words):
    base = ModelWeights(dict(name="DiT-Ti/2", input_size=8, in_channels=4, num_classes=10), {}, NAMES,
                        {"objective": "diffusion"}, vae)
    weights = ModelWeights(dict(base.model_args, **change.get("model_args", {})), {}, NAMES,
                           change.get("objective_config", base.objective_config), change.get("autoencoder", vae))
    message = one_line_error(lambda: write_diffusers(weights, tmp_path / "out"))
    assert message.startswith("cannot export to diffusers") and words in message and "'hub'" in message
    assert not (tmp_path / "out").exists()


def test_export_refuses_a_folder_in_use(tiny, tmp_path):
    weights, _ = tiny
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "keep.txt").write_text("mine")
    assert "not an empty folder" in one_line_error(lambda: write_diffusers(weights, tmp_path / "used"))
    assert (tmp_path / "used" / "keep.txt").read_text() == "mine"


def copy_of(folder, tmp_path):
    import shutil

    return shutil.copytree(folder, tmp_path / "copy")


def test_import_refuses_per_block_embedders_that_differ(tiny, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = copy_of(tiny[1], tmp_path)
    path = folder / "transformer" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(str(path))
    tensors["transformer_blocks.3.norm1.emb.timestep_embedder.linear_1.bias"] += 1e-3  # as fine-tuning in diffusers does
    save_file(tensors, str(path))
    message = one_line_error(lambda: read_diffusers(folder))
    assert "transformer_blocks.3.norm1.emb.timestep_embedder.linear_1.bias differs from block 0's" in message


@pytest.mark.parametrize("edit,words", [
    (("transformer", {"num_layers": 5}), "none of ditforge's models"),
    (("transformer", {"norm_type": "ada_norm_single"}), "norm_type 'ada_norm_single'"),
    (("scheduler", {"beta_schedule": "scaled_linear"}), "beta schedule 'scaled_linear'"),
    (("scheduler", {"prediction_type": "v_prediction"}), "prediction_type 'v_prediction'"),
])
def test_import_refuses_what_ditforge_cannot_hold(tiny, tmp_path, edit, words):
    folder = copy_of(tiny[1], tmp_path)
    part, values = edit
    path = folder / part / ("config.json" if part == "transformer" else "scheduler_config.json")
    path.write_text(json.dumps(dict(json.loads(path.read_text()), **values)))
    assert words in one_line_error(lambda: read_diffusers(folder))


def test_is_diffusers_folder_tells_a_pipeline_from_anything_else(exported, tmp_path):
    assert is_diffusers_folder(exported[1])
    assert not is_diffusers_folder(exported[1] / "transformer")
    assert not is_diffusers_folder(tmp_path)
    (tmp_path / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    assert not is_diffusers_folder(tmp_path)
    assert "not a diffusers DiTPipeline folder" in one_line_error(lambda: read_diffusers(tmp_path))
