"""diffusers' DiT: a `DiTPipeline` folder (transformer, VAE, scheduler, `id2label`), both ways.

Layout of the folder (what `DiTPipeline.from_pretrained(DIR)` reads, as `facebook/DiT-XL-2-256`):

    model_index.json                 pipeline classes + id2label {"0": "name", ...}
    transformer/config.json          DiTTransformer2DModel's arguments
    transformer/diffusion_pytorch_model.safetensors
    vae/config.json + weights        AutoencoderKL.save_pretrained (scaling_factor = ours)
    scheduler/scheduler_config.json  DDIMScheduler with our betas

The key map (ours = the official DiT's, `models/dit.py`; diffusers' from
`models/transformers/dit_transformer_2d.py`, `models/attention.py` `BasicTransformerBlock`,
`models/normalization.py` `AdaLayerNormZero`, `models/embeddings.py`
`CombinedTimestepLabelEmbeddings`):

| ours | diffusers |
|---|---|
| `x_embedder.proj` | `pos_embed.proj` |
| `pos_embed` (fixed sin-cos) | not stored: diffusers' `PatchEmbed` rebuilds it (in float32) |
| `t_embedder.mlp.0` / `.2` | `transformer_blocks.{i}.norm1.emb.timestep_embedder.linear_1` / `linear_2`, a copy in every block i |
| `y_embedder.embedding_table` (K + 1 rows) | `transformer_blocks.{i}.norm1.emb.class_embedder.embedding_table` (1001 rows), a copy in every block |
| `blocks.{i}.adaLN_modulation.1` | `transformer_blocks.{i}.norm1.linear` (same chunk order: shift, scale, gate of attention, then of the MLP) |
| `blocks.{i}.attn.qkv` (rows q; k; v) | `transformer_blocks.{i}.attn1.to_q` / `to_k` / `to_v` (its three thirds) |
| `blocks.{i}.attn.proj` | `transformer_blocks.{i}.attn1.to_out.0` |
| `blocks.{i}.mlp.fc1` / `fc2` | `transformer_blocks.{i}.ff.net.0.proj` / `ff.net.2` |
| `final_layer.adaLN_modulation.1` | `proj_out_1` (both chunk it as shift, scale: no swap) |
| `final_layer.linear` | `proj_out_2` |

The null class. `DiTPipeline.__call__` guides against the label 1000, hard-coded
(`class_null = torch.tensor([1000] * batch_size)`, diffusers issue 13616), and diffusers'
`LabelEmbedding` puts its null row after its `num_embeds_ada_norm` classes. So every export
has `num_embeds_ada_norm = 1000` and a 1001-row table: rows 0..K-1 our classes, row 1000 our
null row (our row K), and rows K..999 (K < 1000) copies of the null row, so that an unknown class
id in that range gives the unconditional model rather than noise. `id2label` holds exactly the K
class names, and `read_diffusers` takes K from it and puts the null row back at K. A model with
more than 1000 classes, or without a null row, cannot be guided by `DiTPipeline` and is refused.
`DiTPipeline.get_label_ids` splits each name at commas (ImageNet's "tench, Tinca tinca" is two
labels of class 0), so a class name with a comma is found by its parts.

Sampling. The scheduler is DDIM on 'leading' timesteps (0, T/N, ..., T - T/N), which is ADM's
``ddimN`` respacing, the grid our `diffusion.samplers.ddim_sample` walks with
`create_diffusion(f"ddim{N}")`; `ditforge sample --sampler ddim --steps N` walks ADM's plain "N"
respacing instead (0, ..., T - 1 evenly, e.g. 0, 42, ..., 999 for 25), so its samples differ from
DiTPipeline's by the grid, not only by the network.

Where diffusers' DiT computes differently from the official one (measured in
`benchmarks/export_differences.py`, recorded in the README):
- its timestep features use `downscale_freq_shift=1` (`CombinedTimestepLabelEmbeddings`):
  frequencies 10000 ** (-i / 127), DiT's 10000 ** (-i / 128) (`models/layers.py`). Not a
  setting of the config: every exported model sees slightly other timestep features in
  diffusers than in ditforge; this is the main difference of the outputs.
- the LayerNorm before the MLP (`norm3`) takes `norm_eps` from the config, default 1e-5; DiT's
  is 1e-6. Exports write `norm_eps: 1e-6`, so that one matches exactly (folders converted by
  diffusers itself, such as facebook/DiT-XL-2-256, run with 1e-5 there).
- the sin-cos position embedding is computed in float32 (DiT's in float64, then rounded).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ditforge.data.autoencoder.normalisation import is_plain_scale
from ditforge.diffusion.schedules import beta_schedule
from ditforge.errors import CheckpointError, UserError
from ditforge.formats.weights import ModelWeights
from ditforge.models.dit import MODEL_NAMES, MODEL_SIZES
from ditforge.models.positions import get_2d_sincos_pos_embed

__all__ = [
    "NULL_LABEL", "check_exportable", "to_diffusers_state_dict", "from_diffusers_state_dict",
    "transformer_config", "scheduler_config", "write_diffusers", "is_diffusers_folder", "read_diffusers",
]

#: The label `DiTPipeline` guides against (pipelines/dit/pipeline_dit.py: `class_null`).
NULL_LABEL = 1000
#: Class dropout of diffusers' label embedder (`CombinedTimestepLabelEmbeddings`, fixed there).
DIFFUSERS_CLASS_DROPOUT = 0.1
#: DiT's LayerNorm eps (models/blocks.py, the official `nn.LayerNorm(..., eps=1e-6)`).
DIT_NORM_EPS = 1e-6
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
TRANSFORMER_CLASSES = ("DiTTransformer2DModel", "Transformer2DModel")  # the latter: facebook/DiT-* folders

_EMBEDDERS = {  # ours -> diffusers, under transformer_blocks.{i}.norm1.emb.
    "t_embedder.mlp.0": "timestep_embedder.linear_1",
    "t_embedder.mlp.2": "timestep_embedder.linear_2",
}
_TABLE = "y_embedder.embedding_table.weight"
_DIFFUSERS_TABLE = "class_embedder.embedding_table.weight"
_BLOCK = {  # ours -> diffusers, under blocks.{i}. / transformer_blocks.{i}.
    "adaLN_modulation.1": "norm1.linear",
    "attn.proj": "attn1.to_out.0",
    "mlp.fc1": "ff.net.0.proj",
    "mlp.fc2": "ff.net.2",
}
_QKV = ("attn1.to_q", "attn1.to_k", "attn1.to_v")
_TOP = {  # ours -> diffusers
    "x_embedder.proj": "pos_embed.proj",
    "final_layer.adaLN_modulation.1": "proj_out_1",
    "final_layer.linear": "proj_out_2",
}
_OTHER_FORMATS = {  # reason -> the formats that do hold such a model
    "pixel": "'official' or 'hub'",
    "flow": "'official' (willisma/SiT's models.py) or 'hub'",
    "hub": "'hub'",
    "blocks": "'hub' (the official DiT and SiT code has no such blocks either)",
    "classes": "'official' or 'hub'",
}


# ----------------------------------------------------------------------------------------
# What diffusers can hold
# ----------------------------------------------------------------------------------------


def _refuse(reason: str, fits: str) -> UserError:
    return UserError(f"cannot export to diffusers: {reason}; export it as {_OTHER_FORMATS[fits]} instead")


def check_exportable(weights: ModelWeights) -> None:
    """UserError (one line: the reason and the formats that fit) unless `DiTPipeline` can run it."""
    args, ae = weights.model_args, weights.autoencoder
    if ae.get("kind") == "identity":
        raise _refuse("it is a pixel-space model (autoencoder 'identity') and DiTPipeline always decodes latents through a VAE", "pixel")
    if ae.get("kind") not in ("diffusers-kl", "sd-vae") or not is_plain_scale(ae):
        raise _refuse(f"its latents are those of {ae.get('kind')!r} normalised by shift {ae.get('shift', 0)}, scale "
                      f"{ae.get('scale')} and latent_norm {ae.get('latent_norm', 'scale')!r}, and DiTPipeline decodes an "
                      "AutoencoderKL's latents divided by one scaling factor only", "hub")
    kind = weights.objective_config.get("objective", "diffusion")
    if kind != "diffusion":
        raise _refuse(f"it was trained with the {kind} objective and diffusers' DiTPipeline samples only Gaussian "
                      "diffusion (epsilon prediction); diffusers has no flow-matching DiT pipeline (issue 6635)",
                      "flow" if kind == "flow" else "hub")
    modern = [f"{k}={args[k]!r}" for k, plain in (("norm", "layer"), ("mlp", "gelu"), ("rope", False), ("qk_norm", False))
              if args.get(k, plain) != plain]
    if args.get("mlp_ratio", 4.0) != 4.0:
        modern.append(f"mlp_ratio={args['mlp_ratio']!r}")
    if modern:
        raise _refuse(f"its blocks ({', '.join(modern)}) are not DiT's LayerNorm / GELU(tanh) 4x MLP blocks, the only "
                      "ones DiTTransformer2DModel has", "blocks")
    k = int(args["num_classes"])
    if k > NULL_LABEL:
        raise _refuse(f"it has {k} classes and DiTPipeline takes label {NULL_LABEL} as the null class, so at most "
                      f"{NULL_LABEL} fit", "classes")
    if not args.get("class_dropout_prob", 0.1) > 0:
        raise _refuse("it has no null class (trained with class_dropout_prob 0) and DiTPipeline guides against one", "classes")


def _structure(name: str) -> tuple[int, int, int, int]:
    """'DiT-XL/2' -> (depth, hidden, heads, patch), from the registry (models/dit.py)."""
    if name not in MODEL_NAMES:
        raise UserError(f"unknown model {name!r}; choose one of: {', '.join(MODEL_NAMES)}")
    size, patch = name[len("DiT-"):].split("/")
    return (*MODEL_SIZES[size], int(patch))


def _model_name(depth: int, hidden: int, heads: int, patch: int) -> str | None:
    for name in MODEL_NAMES:
        if _structure(name) == (depth, hidden, heads, patch):
            return name
    return None


# ----------------------------------------------------------------------------------------
# The key map
# ----------------------------------------------------------------------------------------


def to_diffusers_state_dict(state: dict[str, torch.Tensor], depth: int, num_classes: int) -> dict[str, torch.Tensor]:
    """Our state dict (official DiT keys) -> DiTTransformer2DModel's, every tensor its own copy
    (safetensors stores no shared memory). The label table (K + 1, D) becomes (1001, D) as the
    module docstring says."""
    try:
        out = {f"{new}.{p}": state[f"{old}.{p}"] for old, new in _TOP.items() for p in ("weight", "bias")}
        table = state[_TABLE]  # (K + 1, D), row K = null
        embedders = {f"{new}.{p}": state[f"{old}.{p}"] for old, new in _EMBEDDERS.items() for p in ("weight", "bias")}
        if table.shape[0] != num_classes + 1:
            raise CheckpointError(f"label table has {table.shape[0]} rows; a {num_classes}-class model with a null class has {num_classes + 1}")
        rows = torch.cat([table[:num_classes], table[num_classes:].expand(NULL_LABEL + 1 - num_classes, -1)])  # (1001, D)
        embedders[_DIFFUSERS_TABLE] = rows
        for i in range(depth):
            ours, theirs = f"blocks.{i}.", f"transformer_blocks.{i}."
            for key, value in embedders.items():
                out[f"{theirs}norm1.emb.{key}"] = value
            for old, new in _BLOCK.items():
                for p in ("weight", "bias"):
                    out[f"{theirs}{new}.{p}"] = state[f"{ours}{old}.{p}"]
            for p in ("weight", "bias"):
                for new, third in zip(_QKV, state[f"{ours}attn.qkv.{p}"].chunk(3, dim=0)):  # (D, ...) each: q, k, v
                    out[f"{theirs}{new}.{p}"] = third
    except KeyError as e:
        raise CheckpointError(f"not a DiT state dict: key {e} is missing") from None
    return {k: v.detach().clone().contiguous() for k, v in out.items()}


def from_diffusers_state_dict(
    tensors: dict[str, torch.Tensor], depth: int, num_classes: int, null_row: int, source: str = "the transformer"
) -> dict[str, torch.Tensor]:
    """DiTTransformer2DModel's state dict -> ours (official DiT keys), `pos_embed` rebuilt as DiT
    builds it. The embedders are taken from block 0 after checking that every block holds the same
    copy; the table keeps rows 0..K-1 and the null row (`null_row`, 1000 for DiTPipeline)."""
    tensors = dict(tensors)
    state: dict[str, torch.Tensor] = {}

    def take(key: str) -> torch.Tensor:
        try:
            return tensors.pop(key)
        except KeyError:
            raise CheckpointError(f"{source} is not a DiT transformer of depth {depth}: key {key!r} is missing") from None

    for old, new in _TOP.items():
        for p in ("weight", "bias"):
            state[f"{old}.{p}"] = take(f"{new}.{p}")
    first = {key: take(f"transformer_blocks.0.norm1.emb.{key}") for key in
             [f"{new}.{p}" for new in _EMBEDDERS.values() for p in ("weight", "bias")] + [_DIFFUSERS_TABLE]}
    for i in range(depth):
        theirs = f"transformer_blocks.{i}."
        if i:
            for key, value in first.items():
                other = take(f"{theirs}norm1.emb.{key}")
                if not torch.equal(other, value):
                    gap = (other.double() - value.double()).abs().max().item() if other.shape == value.shape else float("nan")
                    raise UserError(
                        f"{source}: {theirs}norm1.emb.{key} differs from block 0's (max abs difference {gap:.3g}); "
                        "ditforge's DiT has one timestep and one label embedder for all blocks, so only a model whose "
                        "per-block copies are equal (as DiT conversions are) can be read"
                    )
        for old, new in _BLOCK.items():
            for p in ("weight", "bias"):
                state[f"blocks.{i}.{old}.{p}"] = take(f"{theirs}{new}.{p}")
        for p in ("weight", "bias"):
            state[f"blocks.{i}.attn.qkv.{p}"] = torch.cat([take(f"{theirs}{new}.{p}") for new in _QKV])  # (3D, ...)
    for old, new in _EMBEDDERS.items():
        for p in ("weight", "bias"):
            state[f"{old}.{p}"] = first[f"{new}.{p}"]
    table = first[_DIFFUSERS_TABLE]  # (num_embeds_ada_norm + 1, D)
    if not num_classes <= null_row < table.shape[0]:
        raise CheckpointError(f"{source}: label table has {table.shape[0]} rows, too few for {num_classes} classes and the null row {null_row}")
    state[_TABLE] = torch.cat([table[:num_classes], table[null_row : null_row + 1]])  # (K + 1, D), row K = null
    if tensors:
        raise CheckpointError(f"{source} holds weights a DiT does not have: {', '.join(sorted(tensors)[:3])}")
    return state


def _pos_embed(hidden: int, grid: int, dtype: torch.dtype) -> torch.Tensor:
    """DiT's fixed position embedding, as `DiT.initialize_weights` writes it: (1, T, D)."""
    return get_2d_sincos_pos_embed(hidden, grid).to(dtype).unsqueeze(0)


# ----------------------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------------------


def transformer_config(model_args: dict[str, Any]) -> dict[str, Any]:
    """DiTTransformer2DModel's arguments for a model of `model_args` (`create_model`'s)."""
    import diffusers

    depth, hidden, heads, patch = _structure(model_args["name"])
    c = int(model_args.get("in_channels", 4))
    return {
        "_class_name": "DiTTransformer2DModel",
        "_diffusers_version": diffusers.__version__,
        "num_attention_heads": heads,
        "attention_head_dim": hidden // heads,
        "in_channels": c,
        "out_channels": 2 * c if model_args.get("learn_sigma", True) else c,
        "num_layers": depth,
        "dropout": 0.0,
        "norm_num_groups": 32,
        "attention_bias": True,
        "sample_size": int(model_args.get("input_size", 32)),
        "patch_size": patch,
        "activation_fn": "gelu-approximate",  # DiT's GELU(tanh)
        "num_embeds_ada_norm": NULL_LABEL,  # so that the null row is 1000, where DiTPipeline looks
        "upcast_attention": False,
        "norm_type": "ada_norm_zero",
        "norm_elementwise_affine": False,
        "norm_eps": DIT_NORM_EPS,  # diffusers' default 1e-5 would differ from DiT's feed-forward LayerNorm
    }


def _linear_ends(steps: int) -> tuple[float, float]:
    """ADM's linear betas, 1e-4 .. 0.02 for T = 1000 and scaled by 1000 / T (diffusion/schedules.py)."""
    scale = 1000.0 / steps
    return scale * 1e-4, scale * 0.02


def scheduler_config(noise_schedule: str, steps: int) -> dict[str, Any]:
    """DDIMScheduler's arguments for our betas. DDIM as ADM runs it with ``ddimN`` respacing:
    'leading' timesteps (0, T/N, 2T/N, ...), x^_0 not clipped (DiT samples latents with
    clip_denoised=False), alpha_bar before the first step = 1 (ADM's alphas_cumprod_prev[0])."""
    common = dict(num_train_timesteps=steps, clip_sample=False, set_alpha_to_one=True, steps_offset=0,
                  prediction_type="epsilon", timestep_spacing="leading")
    if noise_schedule == "linear":
        start, end = _linear_ends(steps)
        return dict(beta_schedule="linear", beta_start=start, beta_end=end, **common)
    if noise_schedule == "cosine":  # Nichol & Dhariwal's eq. 17 with beta <= 0.999, as `betas_for_alpha_bar`
        return dict(beta_schedule="squaredcos_cap_v2", **common)
    raise UserError(f"cannot export to diffusers: unknown noise schedule {noise_schedule!r}; expected 'linear' or 'cosine'")


def _noise_schedule(config: dict[str, Any], source: str) -> tuple[str, int]:
    """(our schedule name, T) of a diffusers scheduler config; UserError if it is neither of ours."""
    steps = int(config.get("num_train_timesteps", 1000))
    if config.get("prediction_type", "epsilon") != "epsilon":
        raise UserError(f"{source}: prediction_type {config['prediction_type']!r}; ditforge's DiT predicts 'epsilon'")
    trained = config.get("trained_betas")
    if trained is not None:
        for name in ("linear", "cosine"):
            if len(trained) == steps and np.allclose(trained, beta_schedule(name, steps), rtol=1e-6, atol=0):
                return name, steps
        raise UserError(f"{source}: trained_betas are neither the linear nor the cosine schedule of {steps} steps")
    kind = config.get("beta_schedule", "linear")
    if kind == "squaredcos_cap_v2":
        return "cosine", steps
    start, end = config.get("beta_start", 1e-4), config.get("beta_end", 0.02)
    want = _linear_ends(steps)
    if kind == "linear" and np.allclose((start, end), want, rtol=1e-9, atol=0):
        return "linear", steps
    raise UserError(f"{source}: beta schedule {kind!r} from {start} to {end}; ditforge knows 'linear' from {want[0]:g} "
                    f"to {want[1]:g} (for {steps} steps) and 'squaredcos_cap_v2' (cosine)")


# ----------------------------------------------------------------------------------------
# Writer
# ----------------------------------------------------------------------------------------


def write_diffusers(weights: ModelWeights, out: str | Path) -> Path:
    """A folder that `DiTPipeline.from_pretrained(out)` loads offline and samples with. `out` must
    not exist or be empty; the folder appears whole (written beside it, then renamed)."""
    from diffusers import DDIMScheduler
    from safetensors.torch import save_file

    from ditforge.data.autoencoder import load_autoencoder

    out = Path(out)
    check_exportable(weights)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out {out}: exists and is not an empty folder; choose a new folder or remove it")
    args = weights.model_args
    k = int(args["num_classes"])
    if len(weights.class_names) != k:
        raise CheckpointError(f"{weights.source or 'the model'} records {len(weights.class_names)} class names for {k} classes")
    objective = weights.objective  # DiffusionObjective: noise_schedule, diffusion_steps
    scheduler = DDIMScheduler(**scheduler_config(objective.noise_schedule, objective.diffusion_steps))
    ae = load_autoencoder(weights.autoencoder, device="cpu")
    if ae.channels != int(args.get("in_channels", 4)):
        raise CheckpointError(f"the recorded autoencoder has {ae.channels} latent channels but the model takes {args.get('in_channels')}")
    config = transformer_config(args)
    tensors = to_diffusers_state_dict(weights.state_dict, config["num_layers"], k)

    partial = out.with_name(f".{out.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    (partial / "transformer").mkdir(parents=True)
    save_file(tensors, str(partial / "transformer" / WEIGHTS_NAME), metadata={"format": "pt"})
    _write_json(partial / "transformer" / "config.json", config)
    ae.vae.register_to_config(scaling_factor=ae.scale)  # DiTPipeline decodes latents / vae.config.scaling_factor
    ae.vae.save_pretrained(str(partial / "vae"))
    scheduler.save_pretrained(str(partial / "scheduler"))
    _write_json(partial / "model_index.json", {
        "_class_name": "DiTPipeline",
        "_diffusers_version": config["_diffusers_version"],
        "id2label": {str(i): name for i, name in enumerate(weights.class_names)},  # DiTPipeline(id2label=...)
        "scheduler": ["diffusers", type(scheduler).__name__],
        "transformer": ["diffusers", "DiTTransformer2DModel"],
        "vae": ["diffusers", type(ae.vae).__name__],
    })
    if out.exists():
        out.rmdir()  # empty, checked above
    os.replace(partial, out)
    return out


def _write_json(path: Path, value: dict[str, Any]) -> None:
    path.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n")


# ----------------------------------------------------------------------------------------
# Reader
# ----------------------------------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {path}: {type(e).__name__}: {e}") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path} does not hold a JSON object")
    return value


def is_diffusers_folder(path: str | Path) -> bool:
    """True for a folder holding a diffusers `DiTPipeline` (model_index.json and a transformer)."""
    path = Path(path)
    try:
        index = json.loads((path / "model_index.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(index, dict) and index.get("_class_name") == "DiTPipeline" and (path / "transformer" / "config.json").is_file()


def _read_transformer_tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    single = folder / WEIGHTS_NAME
    if single.is_file():
        return load_file(str(single))
    index = folder / f"{WEIGHTS_NAME}.index.json"
    if index.is_file():  # sharded: {"weight_map": {key: file}}
        tensors: dict[str, torch.Tensor] = {}
        for shard in sorted(set(_read_json(index).get("weight_map", {}).values())):
            tensors.update(load_file(str(folder / shard)))
        return tensors
    legacy = folder / "diffusion_pytorch_model.bin"
    if legacy.is_file():
        return torch.load(legacy, map_location="cpu", weights_only=True)
    raise CheckpointError(f"{folder}: no {WEIGHTS_NAME} (nor a sharded index or diffusion_pytorch_model.bin)")


def _check_transformer_config(config: dict[str, Any], source: str) -> None:
    """UserError unless the config is a DiT that ditforge's model can hold."""
    want = {"norm_type": "ada_norm_zero", "activation_fn": "gelu-approximate", "attention_bias": True,
            "norm_elementwise_affine": False}
    if config.get("_class_name") not in TRANSFORMER_CLASSES:
        raise UserError(f"{source}: transformer class {config.get('_class_name')!r}; expected one of {', '.join(TRANSFORMER_CLASSES)}")
    for key, value in want.items():
        if config.get(key, value) != value:
            raise UserError(f"{source}: {key} {config[key]!r} is not DiT's ({value!r})")
    for key in ("patch_size", "num_embeds_ada_norm"):
        if config.get(key) is None:
            raise UserError(f"{source}: {key} is not set; a DiT transformer has one")


def _class_names(index: dict[str, Any], rows: int, source: str) -> list[str]:
    """Names by class id from id2label (its K entries must be ids 0..K-1); without one, `rows` numbers."""
    id2label = index.get("id2label")
    if not id2label:
        return [str(i) for i in range(rows)]
    try:
        ids = sorted(int(i) for i in id2label)
    except ValueError:
        raise UserError(f"{source}: id2label keys must be class ids, got {sorted(id2label)[:3]}") from None
    if ids != list(range(len(ids))):
        raise UserError(f"{source}: id2label must name the classes 0..K-1 without gaps, got ids {ids[:3]}...{ids[-1]}")
    return [str(id2label[str(i)] if str(i) in id2label else id2label[i]) for i in ids]


def read_diffusers(path: str | Path) -> ModelWeights:
    """The model of a diffusers DiT folder (our export, or e.g. facebook/DiT-XL-2-256 saved
    locally) under ditforge's keys, with its classes, objective and VAE."""
    path = Path(path)
    if not is_diffusers_folder(path):
        raise UserError(f"{path}: not a diffusers DiTPipeline folder (expected model_index.json naming DiTPipeline and transformer/config.json)")
    index = _read_json(path / "model_index.json")
    config = _read_json(path / "transformer" / "config.json")
    source = str(path / "transformer")
    _check_transformer_config(config, source)
    depth, heads, head_dim = int(config["num_layers"]), int(config["num_attention_heads"]), int(config["attention_head_dim"])
    hidden, patch, c = heads * head_dim, int(config["patch_size"]), int(config["in_channels"])
    name = _model_name(depth, hidden, heads, patch)
    if name is None:
        raise UserError(f"{source}: a DiT of depth {depth}, hidden {hidden}, {heads} heads, patch {patch} is none of ditforge's "
                        f"models ({', '.join(MODEL_NAMES)})")
    out_channels = config.get("out_channels") or c
    if out_channels not in (c, 2 * c):
        raise UserError(f"{source}: out_channels {out_channels} is neither in_channels {c} nor twice it (learned sigma)")
    null_row = int(config["num_embeds_ada_norm"])
    names = _class_names(index, null_row, str(path / "model_index.json"))
    if len(names) > null_row:
        raise UserError(f"{path}: id2label names {len(names)} classes but the transformer's label table has {null_row}")
    state = from_diffusers_state_dict(_read_transformer_tensors(path / "transformer"), depth, len(names), null_row, source)
    size = int(config["sample_size"])
    state["pos_embed"] = _pos_embed(hidden, size // patch, state["x_embedder.proj.weight"].dtype)
    state = {k: state[k] for k in sorted(state)}

    if not (path / "scheduler").is_dir():
        raise UserError(f"{path}: no scheduler/ folder; a DiTPipeline folder has one (it gives the noise schedule)")
    schedule, steps = _noise_schedule(_read_json(path / "scheduler" / "scheduler_config.json"), str(path / "scheduler"))
    vae = path / "vae"
    if not (vae / "config.json").is_file():
        raise UserError(f"{path}: no vae/config.json; a DiTPipeline folder holds its AutoencoderKL there")
    vae_config = _read_json(vae / "config.json")
    autoencoder = {  # what DiffusersKL(str(vae)).describe() says, read without loading the VAE
        "kind": "diffusers-kl",
        "id": str(vae.resolve()),
        "scale": float(vae_config.get("scaling_factor", 0.18215)),  # AutoencoderKL's default
        "channels": int(vae_config.get("latent_channels", 4)),
        "in_channels": int(vae_config.get("in_channels", 3)),
        "downsample": 2 ** (len(vae_config.get("block_out_channels", (64,))) - 1),
    }
    return ModelWeights(
        model_args=dict(name=name, input_size=size, in_channels=c, num_classes=len(names), learn_sigma=out_channels == 2 * c,
                        class_dropout_prob=DIFFUSERS_CLASS_DROPOUT, norm="layer", mlp="gelu", rope=False, qk_norm=False),
        state_dict=state,
        class_names=names,
        objective_config={"objective": "diffusion", "diffusion": {"noise_schedule": schedule, "diffusion_steps": steps}},
        autoencoder=autoencoder,
        source=str(path),
    )
