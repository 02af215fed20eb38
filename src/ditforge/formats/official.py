"""The official checkpoints of facebookresearch/DiT and willisma/SiT: a flat state dict `.pt`.

DiT and SiT publish their networks as `torch.save(model.state_dict())` (or a training
checkpoint `{"model", "ema", "opt", "args"}`) with the same module tree and keys as ours
(`models/dit.py`), so the weights load with `strict=True`; what the file does not say (the model
name, and for SiT the objective) is given by the user. Input size, channels, classes and learned
sigma follow from the shapes.

Writing (`write_official`, `ditforge export --format official`) makes the pair their code reads:

    OUT/DiT-XL-2-256x256.pt     torch.save of a plain dict {key: tensor}, CPU, contiguous, float32
                                (the name of their published files: model, patch, pixels; SiT-* for
                                a flow model); loads into their `models.py` with strict=True and
                                through their `download.find_model`
    OUT/DiT-XL-2-256x256.json   the arguments of their `sample.py` (`command`, `sample_args`), the
                                edits their `sample.py` needs for this model (`notes`), and
                                ditforge's own record (`ditforge`), from which `read_official`
                                restores the model without `--model`

Only what their code can build and sample is written; anything else is one `UserError` line
naming the reasons and the formats that fit (`official_refusals`):

- block options other than the paper's (RMSNorm, SwiGLU, RoPE, qk-norm): their `models.py` has
  LayerNorm + GELU blocks only;
- sizes outside their registry (DiT-Ti/*): their `--model` cannot name them;
- pixel-space models, or latents of a VAE other than an SD-style KL VAE (4 channels, 8x
  downsampling, scale 0.18215): their `sample.py` always draws 4 x (image/8)^2 noise and decodes
  with `stabilityai/sd-vae-ft-{ema,mse}` after dividing by 0.18215, so a pixel-space model's
  samples could never be decoded by it (refused rather than written with a note: nothing of
  their pipeline would run);
- no null class (class dropout 0): their `sample.py` always guides with the null label;
- objectives other than DiT's diffusion and SiT's flow, and flows on a path or prediction SiT's
  `create_transport` has no name for.

What their code can express with a constructor argument or a changed constant (class counts
other than 1000, image sizes other than 256/512, learned sigma differing from their
`sample.py`'s, a cosine schedule or T != 1000, mlp_ratio) is written, and each such edit is a
line in the JSON's `notes`.
"""

from __future__ import annotations

import json
import os
import shlex
from pathlib import Path
from typing import Any

import torch

from ditforge.data.autoencoder.normalisation import is_plain_scale
from ditforge.errors import CheckpointError, UserError
from ditforge.formats.hub import diffusers_applies
from ditforge.formats.weights import ModelWeights
from ditforge.models import create_model
from ditforge.train.checkpoint import check_weights

#: SiT's networks are DiT's (same modules, same state-dict keys); only the objective differs.
SIT_PREFIX = "SiT-"
#: The marker of the JSON written beside an official `.pt` (`write_official`).
ARGS_FORMAT = {"format": "ditforge-official", "version": 1}
#: Their registries (`DiT_models`, `SiT_models` in each `models.py`): sizes S, B, L, XL, patches 2, 4, 8.
OFFICIAL_SIZES, OFFICIAL_PATCHES = ("S", "B", "L", "XL"), (2, 4, 8)
#: Our flow paths and predictions -> SiT's `--path-type` / `--prediction` (`train_utils.py`).
SIT_PATHS = {"linear": "Linear", "gvp": "GVP"}
SIT_PREDICTIONS = ("velocity", "noise", "score")
#: Our beta schedules -> the names of DiT's `gaussian_diffusion.get_named_beta_schedule`.
DIT_SCHEDULES = {"linear": "linear", "cosine": "squaredcos_cap_v2"}
#: The SD VAEs their `sample.py --vae ema|mse` loads, and the latent scale it divides by.
SD_VAES = {"stabilityai/sd-vae-ft-ema": "ema", "stabilityai/sd-vae-ft-mse": "mse"}
SD_VAE_SCALE = 0.18215
#: ImageNet labels their sample.py conditions on (hard-coded in DiT's and SiT's sample.py).
THEIR_LABELS = [207, 360, 387, 974, 88, 979, 417, 279]


# -- reading -------------------------------------------------------------------------------------


def model_args_from_state_dict(state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Input size, channels, classes and learn_sigma implied by an official checkpoint's shapes."""
    try:
        hidden, in_channels, p, _ = state["x_embedder.proj.weight"].shape
        tokens = state["pos_embed"].shape[1]
        rows = state["y_embedder.embedding_table.weight"].shape[0]
        out = state["final_layer.linear.weight"].shape[0]
    except KeyError as e:
        raise CheckpointError(f"not a DiT state dict: key {e} is missing") from None
    side = round(tokens**0.5)
    return dict(
        input_size=side * p,
        in_channels=in_channels,
        num_classes=rows - 1,  # the last row is the null class of classifier-free guidance
        learn_sigma=out == p * p * 2 * in_channels,
    )


def args_file(pt: Path) -> Path:
    """The JSON that `write_official` writes beside `pt`."""
    return pt.with_suffix(".json")


def read_args_file(pt: Path) -> dict[str, Any] | None:
    """The JSON `write_official` wrote beside `pt`, or None if there is none (a file of another
    kind under that name is ignored: official downloads carry no JSON)."""
    path = args_file(pt)
    if not path.is_file():
        return None
    try:
        args = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{str(path)!r}, the arguments written beside {pt.name}, is damaged ({e}); "
                              "delete it and name the model with --model") from None
    if not (isinstance(args, dict) and args.get("format") == ARGS_FORMAT["format"]):
        return None
    if args.get("version") != ARGS_FORMAT["version"] or not isinstance(args.get("ditforge"), dict):
        raise CheckpointError(f"{str(path)!r} is a version {args.get('version')!r} record this ditforge cannot read "
                              f"(it reads version {ARGS_FORMAT['version']}); delete it and name the model with --model")
    return args


def read_official(path: str | Path, model_name: str | None, objective: str | None = None) -> ModelWeights:
    """The weights of an official `.pt` (`model_name`: e.g. DiT-XL/2, or SiT-XL/2 for SiT's,
    which implies `objective="flow"`). A file written by `write_official` needs no `model_name`:
    the JSON beside it names the model, and its model, objective, autoencoder, class names and
    step are restored as they were written."""
    path = Path(path)
    record = read_args_file(path)
    if model_name is None and record is None:
        raise UserError(
            f"{str(path)!r} is a plain weights file; name its model with --model (e.g. --model DiT-XL/2, or SiT-XL/2 for SiT weights)"
        )
    if model_name is not None and model_name.startswith(SIT_PREFIX):
        model_name, objective = "DiT-" + model_name[len(SIT_PREFIX) :], objective or "flow"
    state = _load_state(path)
    if record is not None:
        return _from_record(path, state, record["ditforge"], model_name, objective)
    args = model_args_from_state_dict(state)
    autoencoder = {"kind": "sd-vae", "scale": SD_VAE_SCALE} if args["in_channels"] == 4 else {"kind": "identity"}
    # DiT: the paper's diffusion (linear betas, T = 1000); SiT: the linear path, velocity prediction
    return ModelWeights(
        model_args=dict(name=model_name, class_dropout_prob=0.1, **args),
        state_dict=state,
        class_names=[str(i) for i in range(args["num_classes"])],
        objective_config={"objective": objective or "diffusion"},
        autoencoder=autoencoder,
        source=str(path),
    )


def _load_state(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means the same to the user
        raise CheckpointError(f"cannot read {str(path)!r} as a weights-only PyTorch file: {str(e).splitlines()[0]}") from None
    if isinstance(state, dict) and "ema" in state and isinstance(state["ema"], dict):
        state = state["ema"]  # training checkpoints of the original code: {"model", "ema", "opt", ...}
    if not isinstance(state, dict):
        raise CheckpointError(f"{str(path)!r} does not hold a state dict")
    return state


def _from_record(path: Path, state: dict[str, torch.Tensor], record: dict[str, Any],
                 model_name: str | None, objective: str | None) -> ModelWeights:
    """The model `write_official` recorded in the JSON beside `path`, checked against the file."""
    where = str(args_file(path))
    try:
        model_args, objective_config = dict(record["model_args"]), dict(record["objective_config"])
        autoencoder, class_names = dict(record["autoencoder"]), [str(n) for n in record["class_names"]]
        step = record.get("step")
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{where!r} is damaged: its 'ditforge' record lacks {e}; delete it and name the model with --model") from None
    try:
        with torch.device("meta"):
            model = create_model(**model_args)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{where!r} is damaged: its model_args {model_args} do not build a model ({e})") from None
    try:
        check_weights(model, state, str(path))
    except CheckpointError as e:
        raise CheckpointError(f"{where!r} does not describe {path.name} ({e}); delete the .json (or write both again) "
                              "and name the model with --model") from None
    if model_name is not None and model_name != model_args.get("name"):
        raise CheckpointError(f"{str(path)!r} holds a {model_args.get('name')} (as {Path(where).name} records), not the "
                              f"requested {model_name}; drop --model")
    trained = objective_config.get("objective", "diffusion")
    if objective is not None and objective != trained:
        raise CheckpointError(f"{str(path)!r} was trained with the {trained} objective (as {Path(where).name} records), "
                              f"not {objective}; drop --objective")
    return ModelWeights(model_args=model_args, state_dict=state, class_names=class_names, objective_config=objective_config,
                        autoencoder=autoencoder, source=str(path), step=step if isinstance(step, int) else None)


# -- writing -------------------------------------------------------------------------------------


def _meta_model(weights: ModelWeights):
    """The model of `weights.model_args`, on the meta device (no memory): its resolved attributes."""
    try:
        with torch.device("meta"):
            return create_model(**weights.model_args)
    except (TypeError, ValueError) as e:
        raise UserError(f"model arguments {weights.model_args} of {weights.source!r} do not build a model: {e}") from None


def _vae(autoencoder: dict[str, Any]) -> tuple[str | None, str | None]:
    """(their `--vae` choice, the VAE's own id where it is not one of theirs) of a latent model;
    (None, None) where their sample.py cannot decode its latents."""
    kind = autoencoder.get("kind")
    if kind == "sd-vae":  # an official .pt read back: no id recorded, the SD VAE assumed
        return "ema", None
    if kind != "diffusers-kl":
        return None, None
    fits = (autoencoder.get("channels", 4) == 4 and autoencoder.get("downsample", 8) == 8
            and is_plain_scale(autoencoder)  # no shift, no channel statistics: their sample.py only divides by the scale
            and abs(float(autoencoder.get("scale", SD_VAE_SCALE)) - SD_VAE_SCALE) < 1e-9)
    if not fits:
        return None, None
    vae_id = str(autoencoder.get("id", "stabilityai/sd-vae-ft-ema"))
    return (SD_VAES[vae_id], None) if vae_id in SD_VAES else ("ema", vae_id)


def official_refusals(weights: ModelWeights) -> list[str]:
    """Why the official DiT / SiT code cannot build or sample `weights` (empty: it can)."""
    model = _meta_model(weights)
    name = weights.model_args["name"]
    reasons = []
    kind = weights.objective_config.get("objective", "diffusion")
    if kind not in ("diffusion", "flow"):
        reasons.append(f"the {kind} objective has no official code (DiT samples diffusion, SiT flow)")
    options = model.options
    modern = [f"norm {options.norm}" if options.norm != "layer" else "", f"mlp {options.mlp}" if options.mlp != "gelu" else "",
              "rope" if options.rope else "", "qk_norm" if options.qk_norm else ""]
    if any(modern):
        reasons.append(f"its blocks use {', '.join(m for m in modern if m)} (their models.py builds LayerNorm + GELU blocks only)")
    size, patch = name.removeprefix("DiT-").split("/")
    if size not in OFFICIAL_SIZES or int(patch) not in OFFICIAL_PATCHES:
        reasons.append(f"{name} is not in their registry (DiT-S, B, L, XL with patch 2, 4, 8)")
    vae, _ = _vae(weights.autoencoder)
    if weights.autoencoder.get("kind") == "identity":
        reasons.append("it is a pixel-space model and their sample.py always decodes SD-VAE latents")
    elif vae is None or model.in_channels != 4:
        reasons.append(f"its autoencoder {weights.autoencoder} is not an SD VAE (4 channels, 8x, scale {SD_VAE_SCALE}), "
                       "the only one their sample.py decodes")
    if not model.y_embedder.has_null_class:
        reasons.append("it has no null class (class dropout 0) and their sample.py always guides with it")
    if kind == "flow":
        flow = weights.objective_config.get("flow", {})
        path, prediction = flow.get("path", "linear"), flow.get("prediction", "velocity")
        if path not in SIT_PATHS:
            reasons.append(f"SiT has no flow path {path!r} (it has {', '.join(SIT_PATHS)})")
        if prediction not in SIT_PREDICTIONS:
            reasons.append(f"SiT has no prediction {prediction!r} (it has {', '.join(SIT_PREDICTIONS)})")
    return reasons


def _fitting_formats(weights: ModelWeights) -> str:
    return "diffusers or hub" if diffusers_applies(weights) else "hub"


def official_args(weights: ModelWeights, checkpoint: str, cfg_scale: float = 4.0) -> dict[str, Any]:
    """The JSON written beside the official `.pt` named `checkpoint` (module docstring); a
    UserError naming the reasons if their code cannot build or sample the model."""
    reasons = official_refusals(weights)
    name = weights.model_args["name"]
    if reasons:
        raise UserError(f"cannot write {name} in the official DiT/SiT format: {'; '.join(reasons)}; "
                        f"export --format {_fitting_formats(weights)} instead")
    model = _meta_model(weights)
    flow = weights.objective_config.get("objective", "diffusion") == "flow"
    their_name = (SIT_PREFIX if flow else "DiT-") + name.removeprefix("DiT-")
    vae, vae_id = _vae(weights.autoencoder)
    image_size = model.input_size * 8
    sample_args = ["--model", their_name, "--image-size", str(image_size), "--num-classes", str(model.num_classes),
                   "--vae", vae, "--cfg-scale", f"{cfg_scale:g}"]
    facts: dict[str, Any] = dict(code="willisma/SiT" if flow else "facebookresearch/DiT")
    notes = []
    if flow:
        f = weights.objective_config.get("flow", {})
        transport = dict(path_type=SIT_PATHS[f.get("path", "linear")], prediction=f.get("prediction", "velocity"))
        sample_args = ["ODE"] + sample_args + ["--path-type", transport["path_type"], "--prediction", transport["prediction"]]
        facts["transport"] = transport
        if model.learn_sigma:
            notes.append("SiT's sample.py builds learn_sigma=False models for a --ckpt file: set learn_sigma = True there "
                         "(this model has 2C output channels; SiT's forward keeps the first C, as ditforge does)")
    else:
        d = weights.objective_config.get("diffusion", {})
        schedule, steps = d.get("noise_schedule", "linear"), int(d.get("diffusion_steps", 1000))
        facts["diffusion"] = dict(noise_schedule=DIT_SCHEDULES[schedule], diffusion_steps=steps, learn_sigma=model.learn_sigma)
        edits = [f"noise_schedule={DIT_SCHEDULES[schedule]!r}"] * (schedule != "linear") + [f"diffusion_steps={steps}"] * (steps != 1000)
        if not model.learn_sigma:
            edits.append("learn_sigma=False")
            notes.append("this model has no learned sigma: pass learn_sigma=False to DiT_models[args.model](...)")
        if edits:
            notes.append(f"sample.py's create_diffusion(str(args.num_sampling_steps)) needs {', '.join(edits)} for this model")
    if model.num_classes != 1000:
        notes.append(f"sample.py hard-codes the null label 1000 and ImageNet class labels {THEIR_LABELS}: for these "
                     f"{model.num_classes} classes set y_null to {model.num_classes} and class_labels to labels in "
                     f"[0, {model.num_classes})")
    if image_size not in (256, 512):
        notes.append(f"sample.py's --image-size accepts 256 or 512 (argparse choices): drop the choices to pass {image_size}")
    if model.mlp_ratio != 4.0:
        notes.append(f"pass mlp_ratio={model.mlp_ratio} to the model constructor (their registry builds 4.0)")
    if vae_id is not None:
        notes.append(f"trained on latents of the VAE {vae_id!r}: sample.py loads stabilityai/sd-vae-ft-{vae}; load that VAE instead")
    notes.append("their forward_with_cfg guides only the first 3 of the 4 latent channels (a GLIDE legacy, which "
                 "`ditforge sample --legacy-three-channel-guidance` reproduces); ditforge guides all 4 by default, so at "
                 "cfg != 1 the two differ")
    sample_args += ["--ckpt", checkpoint]
    return dict(
        ARGS_FORMAT,
        **facts,
        checkpoint=checkpoint,
        command="python sample.py " + shlex.join(sample_args),
        sample_args=sample_args,
        model=their_name,
        image_size=image_size,
        latent_size=model.input_size,
        num_classes=model.num_classes,
        null_class=model.num_classes,
        in_channels=model.in_channels,
        learn_sigma=model.learn_sigma,
        vae=vae_id or f"stabilityai/sd-vae-ft-{vae}",
        vae_scale=SD_VAE_SCALE,
        cfg_scale=cfg_scale,
        notes=notes,
        ditforge=dict(model_args=weights.model_args, objective_config=weights.objective_config,
                      autoencoder=weights.autoencoder, class_names=list(weights.class_names), step=weights.step),
    )


def official_file_name(weights: ModelWeights) -> str:
    """Their naming of published weights: `DiT-XL-2-256x256.pt` (model, patch, pixels), SiT-* for flows."""
    flow = weights.objective_config.get("objective", "diffusion") == "flow"
    px = int(weights.model_args.get("input_size", 32)) * 8
    name = (SIT_PREFIX if flow else "DiT-") + weights.model_args["name"].removeprefix("DiT-")
    return f"{name.replace('/', '-')}-{px}x{px}.pt"


def _plain_fp32(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A plain dict of CPU float32 tensors, each on its own compact storage (torch.save writes
    whole storages: a view would carry the rest of its storage into the file)."""
    out = {}
    for k, v in state.items():
        t = v.detach().to(device="cpu", dtype=torch.float32).contiguous()
        if t.untyped_storage().nbytes() != t.numel() * t.element_size() or t.storage_offset():
            t = t.clone()
        out[str(k)] = t
    return out


def _replace_atomically(final: Path, write) -> None:
    """`write(tmp)` into a hidden file beside `final`, flushed to disk, then renamed over it."""
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


def write_official(weights: ModelWeights, out: str | Path, *, cfg_scale: float = 4.0, overwrite: bool = False) -> list[Path]:
    """Write `weights` as the official DiT (diffusion) or SiT (flow) `.pt` and the JSON of their
    `sample.py`'s arguments beside it; return both paths (.pt first). `out` is a folder (created;
    the file takes their naming, `official_file_name`) or a path ending in `.pt`. Existing files
    of those names are replaced only with `overwrite`. Each file is written to a temporary name
    and renamed into place, the `.pt` first. A model their code cannot build is a UserError."""
    out = Path(out)
    pt = out if out.suffix == ".pt" else out / official_file_name(weights)
    record = official_args(weights, pt.name, cfg_scale)  # refuses before anything is written
    existing = [p for p in (pt, args_file(pt)) if p.exists()]
    if existing and not overwrite:
        raise UserError(f"{str(existing[0])!r} exists; choose another --out or pass --overwrite to replace it")
    if pt.parent.exists() and not pt.parent.is_dir():
        raise UserError(f"--out {str(pt.parent)!r} is a file; give a folder or a path ending in .pt")
    state = _plain_fp32(weights.state_dict)
    check_weights(_meta_model(weights), state, weights.source)  # what is written loads strictly into a model of these arguments
    pt.parent.mkdir(parents=True, exist_ok=True)
    _replace_atomically(pt, lambda tmp: torch.save(state, tmp))
    _replace_atomically(args_file(pt), lambda tmp: tmp.write_text(json.dumps(record, indent=2) + "\n"))
    return [pt, args_file(pt)]
