"""Checkpoint -> samples -> pictures.

`load_for_sampling` accepts a run folder (its latest checkpoint), a checkpoint folder, or an
official DiT or SiT checkpoint (a flat state dict `.pt` as published with the papers, given its
model name, and `objective="flow"` for SiT); `generate` draws class-conditional samples with
classifier-free guidance, with a sampler of the model's objective (``objectives.py``).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch

from ditforge.config import PRECISIONS
from ditforge.diffusion import guided_denoiser
from ditforge.diffusion.sampling import DEFAULT_SPACING, SPACINGS, Sampler
from ditforge.errors import CheckpointError, UserError
from ditforge.flags import flag
from ditforge.flow import FlowSampler
from ditforge.models import DiT, create_model
from ditforge.objectives import (
    OBJECTIVES, DiffusionObjective, Objective, default_sampler, default_steps, objective_from_config, objective_sampler,
    samplers_of,
)
from ditforge.train.checkpoint import SAMPLING_KEYS, latest_checkpoint, load_weights, read_state, read_tensors
from ditforge.train.device import autocast


@dataclass
class SamplingModel:
    model: DiT
    class_names: list[str]
    objective: Objective = field(default_factory=DiffusionObjective)
    source: str = ""
    step: int | None = None
    autoencoder: dict[str, Any] = field(default_factory=lambda: {"kind": "identity"})


def resolve_checkpoint(path: str | Path) -> Path:
    """A run folder -> its latest checkpoint folder; a checkpoint folder or file -> itself."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist; give a run folder, a checkpoint folder or a .pt file")
    if path.is_dir() and not (path / "state.json").exists():
        latest = latest_checkpoint(path)
        if latest is None:
            raise CheckpointError(f"run folder {str(path)!r} has no checkpoints (expected {str(path)}/checkpoints/step-*/)")
        return latest
    return path


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


#: SiT's networks are DiT's (same modules, same state-dict keys); only the objective differs.
SIT_PREFIX = "SiT-"


def _load_official(path: Path, model_name: str | None, objective: str | None) -> SamplingModel:
    if model_name is None:
        raise UserError(
            f"{str(path)!r} is a plain weights file; name its model with --model (e.g. --model DiT-XL/2, or SiT-XL/2 for SiT weights)"
        )
    if model_name.startswith(SIT_PREFIX):
        model_name, objective = "DiT-" + model_name[len(SIT_PREFIX) :], objective or "flow"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means the same to the user
        raise CheckpointError(f"cannot read {str(path)!r} as a weights-only PyTorch file: {str(e).splitlines()[0]}") from None
    if isinstance(state, dict) and "ema" in state and isinstance(state["ema"], dict):
        state = state["ema"]  # training checkpoints of the original code: {"model", "ema", "opt", ...}
    if not isinstance(state, dict):
        raise CheckpointError(f"{str(path)!r} does not hold a state dict")
    args = model_args_from_state_dict(state)
    model = create_model(model_name, class_dropout_prob=0.1, **args)
    load_weights(model, state, str(path))
    names = [str(i) for i in range(args["num_classes"])]
    autoencoder = {"kind": "sd-vae", "scale": 0.18215} if args["in_channels"] == 4 else {"kind": "identity"}
    # DiT: the paper's diffusion (linear betas, T = 1000); SiT: the linear path, velocity prediction
    chosen = objective_from_config({"objective": objective or "diffusion"}, args["learn_sigma"])
    return SamplingModel(model, names, chosen, source=str(path), autoencoder=autoencoder)


def load_for_sampling(
    path: str | Path, model_name: str | None = None, use_ema: bool = True, objective: str | None = None
) -> SamplingModel:
    """The model of a run or checkpoint folder (its objective from the recorded config), or of an
    official weights file (``model_name`` and ``objective`` say what it is: a DiT by default, a
    SiT for the names ``SiT-XL/2`` etc., whose flat state dicts have DiT's keys)."""
    if objective is not None and objective not in OBJECTIVES:
        raise UserError(f"unknown objective {objective!r}; choose one of: {', '.join(OBJECTIVES)}")
    path = resolve_checkpoint(path)
    if path.is_file():
        return _load_official(path, model_name, objective)
    state = read_state(path, SAMPLING_KEYS)
    try:
        args = state["model_args"]
        trained = objective_from_config(state["config"], args.get("learn_sigma", True))
        model = create_model(**args)
    except (KeyError, TypeError) as e:
        raise CheckpointError(f"checkpoint {str(path)!r} has an unreadable state.json ({type(e).__name__}: {e})") from None
    if model_name is not None and model_name != args["name"]:
        raise CheckpointError(f"checkpoint {str(path)!r} holds a {args['name']}, not the requested {model_name}; drop --model or name {args['name']}")
    if objective is not None and objective != trained.name:
        raise CheckpointError(f"checkpoint {str(path)!r} was trained with the {trained.name} objective, not {objective}; drop --objective")
    weights = path / ("ema.safetensors" if use_ema else "model.safetensors")
    load_weights(model, read_tensors(weights), str(weights))
    return SamplingModel(
        model,
        state["data"]["class_names"],
        trained,
        source=str(path),
        step=state["step"],
        autoencoder=state.get("autoencoder", {"kind": "identity"}),
    )


def check_classes(classes: list[int], num_classes: int) -> None:
    bad = [c for c in classes if not 0 <= c < num_classes]
    if bad:
        raise UserError(f"class id {bad[0]} is out of range; this model knows classes 0..{num_classes - 1}")


def choose_sampler(
    model: DiT, objective: Objective, steps: int, cfg_scale: float, sampler: str | None,
    spacing: str = DEFAULT_SPACING, cfg_interval: tuple[float, float] | None = None,
) -> Sampler | FlowSampler:
    """The sampler for these arguments (None: the objective's default), after checking them all."""
    if spacing not in SPACINGS:
        raise UserError(f"unknown time spacing {spacing!r}; choose one of: {', '.join(SPACINGS)}")
    if cfg_interval is not None and not (len(cfg_interval) == 2 and 0.0 <= cfg_interval[0] <= cfg_interval[1] <= 1.0):
        raise UserError(f"cfg interval must be LO HI with 0 <= LO <= HI <= 1 (fractions of the noise level: 0 = data, 1 = noise), got {cfg_interval}")
    chosen = objective_sampler(objective, sampler, steps, spacing)
    if cfg_scale < 0:
        raise UserError(f"cfg must be >= 0 (1 = no guidance), got {cfg_scale}")
    if cfg_scale != 1.0 and not model.y_embedder.has_null_class:
        raise UserError(f"cfg {cfg_scale:g} needs a model trained with label dropout (it has no null class); use --cfg 1")
    return chosen


#: What each random stream of sampling is for: the starting noise x_T of a sample, and the noise
#: that stochastic samplers (DDPM, SDE solvers) add at each step of a batch.
NOISE_PURPOSES = ("start", "steps")


def noise_seed(seed: int, index: int, purpose: str) -> int:
    """The seed of one random stream of sampling: the first 63 bits of BLAKE2b over (`seed`,
    `index`, `purpose`), where `index` is the sample (starting noise) or the first sample of the
    batch (step noise) and `purpose` one of `NOISE_PURPOSES`. Distinct triples give unrelated
    streams (seeding the step noise with seed + 1, as before, made it the starting noise of the
    next seed or batch), and the stream is the same in whichever process, batch or order it is
    drawn."""
    if purpose not in NOISE_PURPOSES:
        raise ValueError(f"unknown noise purpose {purpose!r}; choose one of: {', '.join(NOISE_PURPOSES)}")
    digest = hashlib.blake2b(f"{int(seed)}:{int(index)}:{purpose}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1  # < 2**63: any device's manual_seed takes it


def start_noise(seed: int, indices: range, shape: tuple[int, ...]) -> torch.Tensor:
    """(len(indices), *shape) starting noise on the CPU, row k that of sample `indices[k]` alone
    (its own generator), so a sample's noise depends neither on its batch nor on the device."""
    rows = [torch.randn(shape, generator=torch.Generator().manual_seed(noise_seed(seed, i, "start"))) for i in indices]
    return torch.stack(rows)  # (N, *shape)


def step_generator(seed: int, index: int, device: torch.device) -> torch.Generator:
    """The generator of the step noise of the batch that begins at sample `index`, on `device`."""
    return torch.Generator(device=device).manual_seed(noise_seed(seed, index, "steps"))


@torch.no_grad()
def sample_batch(
    model: DiT,
    sampler: Sampler | FlowSampler,
    y: torch.Tensor,  # (B,) on the model's device
    noise: torch.Tensor,  # (B, C, H, W) on the model's device
    generator: torch.Generator,
    cfg_scale: float,
    legacy_three_channel: bool = False,
    progress: bool = False,
    cfg_interval: tuple[float, float] | None = None,
    precision: str = "fp32",
) -> torch.Tensor:
    """One batch through the guided sampler: (B, C, H, W) samples in data space.
    ``cfg_interval``: guide only at noise levels in [LO, HI] (None: at every step). The network runs
    in `precision` (autocast), the sampler's arithmetic in fp32."""

    def network(x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        with autocast(precision, x.device):
            return model(x, t, labels).float()

    denoise = guided_denoiser(
        network, y, cfg_scale, model.num_classes, model.in_channels, legacy_three_channel,
        interval=sampler.guidance_times(cfg_interval),
    )
    return sampler(denoise, noise, generator=generator, progress=progress)


@torch.no_grad()
def generate(
    model: DiT,
    classes: list[int],
    per_class: int,
    cfg_scale: float = 4.0,
    steps: int = 250,
    sampler: str | None = None,
    seed: int = 0,
    objective: Objective = DiffusionObjective(),
    legacy_three_channel: bool = False,
    batch_size: int = 500,
    progress: bool = False,
    *,
    spacing: str = DEFAULT_SPACING,
    cfg_interval: tuple[float, float] | None = None,
    precision: str = "fp32",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Samples (N, C, H, W) in data space and their labels (N,), N = len(classes) * per_class,
    grouped by class in the order given. Deterministic for a seed and batch size.
    ``sampler`` names a sampler of ``objective`` (None: its default); ``spacing`` the diffusion
    solvers' time grid."""
    chosen = choose_sampler(model, objective, steps, cfg_scale, sampler, spacing, cfg_interval)
    if per_class <= 0:
        raise UserError(f"per-class must be a positive number of samples, got {per_class}")
    if batch_size <= 0:
        raise UserError(f"batch size must be a positive number of samples, got {batch_size}")
    check_classes(classes, model.num_classes)
    device = next(model.parameters()).device
    model.eval()
    labels = torch.tensor(classes, dtype=torch.long).repeat_interleave(per_class)  # (N,)
    shape = (labels.numel(), model.in_channels, model.input_size, model.input_size)
    noise = start_noise(seed, range(labels.numel()), shape[1:])  # (N, C, H, W), device-independent
    gen = step_generator(seed, 0, device)  # one stream for the step noise of all batches, in order
    out = []
    for start in range(0, labels.numel(), batch_size):
        y = labels[start : start + batch_size].to(device)
        z = noise[start : start + batch_size].to(device)
        x = sample_batch(model, chosen, y, z, gen, cfg_scale, legacy_three_channel, progress, cfg_interval, precision)
        out.append(x.float().cpu())
    return torch.cat(out), labels


# -- the `sample` command's library side: options, set-up, the grid --------------------------


ALL_SAMPLERS = (*samplers_of("diffusion"), *samplers_of("flow"))
SAMPLE_CFG, EVAL_CFG = 4.0, 1.5  # as the paper: 4.0 makes the clearest pictures, 1.5 gives the best FID


def sampler_option(what: str) -> Any:
    """--sampler, of `sample` and `eval` (the objective's default when not given); `what` begins its help."""
    return field(default=None, metadata=flag(
        "--sampler", f"{what} (default: {default_sampler('diffusion')}; flow: {default_sampler('flow')})", choices=ALL_SAMPLERS))


def spacing_option() -> Any:
    return field(default=DEFAULT_SPACING, metadata=flag(
        "--spacing", "time grid of dpm++2m, dpm++2m-sde and unipc: uniform in log-SNR or in time (DDPM / DDIM: ADM's respacing)",
        choices=SPACINGS))


def interval_text(cfg_interval: tuple[float, float] | list[float] | None) -> str:
    """How a report line names a guidance interval: ", guided for t/T in [LO, HI]", or "" without one."""
    return "" if cfg_interval is None else f", guided for t/T in [{cfg_interval[0]:g}, {cfg_interval[1]:g}]"


def cfg_interval_option() -> Any:
    return field(default=None, metadata=flag(
        "--cfg-interval", "guide only while the noise level is in [LO, HI] (0 = data, 1 = noise); elsewhere the "
        "conditional model alone (default: guide at every step)", metavar=("LO", "HI")))


def objective_option() -> Any:
    return field(default=None, metadata=flag(
        "--objective", "what an official .pt file was trained with: diffusion (DiT) or flow (SiT) (default: what the "
        "run recorded; .pt files: diffusion, or flow for a SiT-* --model)", choices=OBJECTIVES))


def precision_option() -> Any:
    return field(default="auto", metadata=flag(
        "--precision", "autocast precision of the network; auto = bf16 on GPU, fp32 on CPU (as train)", choices=PRECISIONS))


@dataclass
class SampleOptions:
    """What `ditforge sample` asks for, each field its option; `out` ending in .npz means many
    samples (`sample_bulk.sample_npz`)."""

    checkpoint: str = field(metadata=flag(
        "checkpoint", "run folder (latest checkpoint), checkpoint folder, or official DiT / SiT .pt file"))
    classes: list[int] | None = field(default=None, metadata=flag(  # grid rows
        "--classes", "class ids, one grid row each (default: all classes, at most 10 spread over the range)", nargs="+"))
    per_class: int = field(default=8, metadata=flag("--per-class", "samples per class (grid columns)"))
    cfg: float = field(default=SAMPLE_CFG, metadata=flag(
        "--cfg", "classifier-free guidance scale; 1 = none (the paper: 4.0 for pictures, 1.5 for FID)"))
    legacy_three_channel: bool = field(default=False, metadata=flag(
        "--legacy-three-channel-guidance", "guide only the first 3 channels, as the original DiT code did", action="store_true"))
    steps: int | None = field(default=None, metadata=flag(  # None: the objective's default
        "--steps", f"sampling steps: model evaluations (diffusion: respaced from the training steps), or intervals for "
        f"flow solvers (Heun: 2 evaluations each) (default: {default_steps('diffusion')}; flow: {default_steps('flow')})"))
    sampler: str | None = sampler_option(
        "diffusion: DDPM ancestral sampling, deterministic DDIM, the fast ODE solvers DPM-Solver++(2M) and UniPC; flow: "
        "Euler, Heun, Adams-Bashforth 2 (ODE) or SiT's Euler-Maruyama SDE")
    spacing: str = spacing_option()
    cfg_interval: tuple[float, float] | None = cfg_interval_option()
    objective: str | None = objective_option()  # None: recorded / from the name
    compile: bool = field(default=False, metadata=flag(
        "--compile", "torch.compile the model first (pays off for many samples)", action="store_true"))
    seed: int = field(default=0, metadata=flag("--seed", "seed of the noise: same seed, same picture"))
    raw_weights: bool = field(default=False, metadata=flag(
        "--raw-weights", "sample the raw weights instead of the EMA", action="store_true"))
    model_name: str | None = field(default=None, metadata=flag(
        "--model", "model name, required for an official .pt file (e.g. DiT-XL/2)"))
    vae: str | None = field(default=None, metadata=flag(  # overrides the autoencoder the checkpoint records
        "--vae", "decode latents with this VAE (hub id, 'ema'/'mse', or a save_pretrained folder) instead of the one "
        "the checkpoint records (default: the recorded one; official .pt: stabilityai/sd-vae-ft-ema)"))
    out: str = field(default="samples.png", metadata=flag(
        "--out", "PNG grid, or .npz for many samples in the ADM evaluator's format"))
    num_samples: int | None = field(default=None, metadata=flag(
        "--num-samples", "with --out X.npz: how many samples (default: 50000)"))
    balanced: bool = field(default=False, metadata=flag(
        "--balanced", "with .npz: equal counts per class instead of uniform random classes", action="store_true"))
    batch_size: int = field(default=64, metadata=flag("--batch-size", "samples per forward batch"))
    shard_size: int = field(default=1024, metadata=flag(
        "--shard-size", "with .npz: samples per resumable shard (a multiple of --batch-size)"))
    precision: str = precision_option()

    @property
    def use_ema(self) -> bool:
        return not self.raw_weights

    def for_model(self, sm: SamplingModel) -> "SampleOptions":
        """These options with the sampler and steps the model's objective picks where none were given."""
        return replace(
            self,
            sampler=self.sampler or default_sampler(sm.objective),
            steps=self.steps if self.steps is not None else default_steps(sm.objective),
        )


@dataclass
class Sampling:
    """A checkpoint ready to sample on this process's device."""

    sm: SamplingModel
    model: torch.nn.Module  # sm.model on the device, compiled when asked
    decode: Callable[[torch.Tensor], torch.Tensor] | None  # latents -> pictures; None in pixel space
    precision: str


def load_decoder(autoencoder: dict[str, Any] | str, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The decode function of a recorded autoencoder (`describe()` output) or a `--vae` string;
    None for the identity recorded by pixel-space runs."""
    if isinstance(autoencoder, dict) and autoencoder.get("kind") == "identity":
        return None
    from ditforge.data.autoencoder import load_autoencoder

    return load_autoencoder(autoencoder, device=device).decode


def prepare_sampling(sm: SamplingModel, opts: SampleOptions, device: torch.device) -> Sampling:
    """Model on `device` (compiled if asked), the decoder (`opts.vae` over the recorded one), precision."""
    from ditforge.train.device import enable_tf32, resolve_precision

    precision = resolve_precision(opts.precision, device)
    enable_tf32()
    model = sm.model.to(device)
    if opts.compile:
        model = torch.compile(model)
    decode = load_decoder(opts.vae if opts.vae is not None else sm.autoencoder, device)
    return Sampling(sm, model, decode, precision)


@dataclass
class GridResult:
    out: Path
    classes: list[int]
    opts: SampleOptions
    precision: str
    device: str
    is_main: bool = True  # every rank writes the grid (the same one) and reports it

    def line(self) -> str:
        o = self.opts
        return (f"wrote {self.out}: classes {self.classes}, {o.per_class} each, cfg {o.cfg:g}, {o.steps} {o.sampler.upper()} "
                f"steps{interval_text(o.cfg_interval)}, seed {o.seed}, {self.precision} on {self.device}")


def sample_grid(opts: SampleOptions) -> GridResult:
    """`opts.per_class` samples of each class in `opts.classes` as a labelled PNG grid at `opts.out`."""
    from ditforge.pictures import make_grid, save_png_atomic
    from ditforge.train import distributed
    from ditforge.train.previewer import preview_classes

    sm = load_for_sampling(opts.checkpoint, opts.model_name, use_ema=opts.use_ema, objective=opts.objective)
    opts = opts.for_model(sm)
    d = distributed.init()
    try:
        s = prepare_sampling(sm, opts, d.device)
        classes = opts.classes if opts.classes is not None else preview_classes(s.model.num_classes)
        x, _ = generate(
            s.model, classes, opts.per_class, opts.cfg, opts.steps, opts.sampler, opts.seed,
            sm.objective, opts.legacy_three_channel, opts.batch_size, progress=True,
            spacing=opts.spacing, cfg_interval=opts.cfg_interval, precision=s.precision,
        )
        if s.decode is not None:
            x = s.decode(x.to(d.device)).cpu()
        names = [sm.class_names[c] if c < len(sm.class_names) else str(c) for c in classes]
        out = save_png_atomic(make_grid(x, names, opts.per_class), Path(opts.out))
        return GridResult(out, classes, opts, s.precision, d.device.type)
    finally:
        distributed.shutdown()
