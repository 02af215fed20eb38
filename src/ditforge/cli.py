"""`ditforge` command line: parse -> config -> call the library -> report.

    ditforge train  [--preset tiny] [--data digits|FOLDER] [--run-dir runs/digits] ...
    ditforge sample RUN_OR_CHECKPOINT [--classes 3 5 7] [--per-class 8] [--cfg 4.0] --out grid.png
    ditforge eval   RUN [--per-class 50] [--cfg 1.5] [--json report.json]
    ditforge export RUN --format diffusers|official|hub --out DIR
    ditforge bench  [--model DiT-XL/2] [--input-size 32] [--batch 64] [--precision bf16]

A user's mistake (bad value, missing file, checkpoint that does not fit) is one line on
stderr and exit status 2; a diverged run is one line and status 1; anything else is a bug of
ours: its traceback, a line asking for a report, and status 3. A command stopped by SIGTERM,
SIGUSR1 or a first Ctrl-C after saving its work is one line naming what it saved and the command
that continues, and status 75 (`preemption.py`); a second Ctrl-C, status 130.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import sys
import traceback
from pathlib import Path

import torch
from safetensors import SafetensorError

from ditforge import __version__
from ditforge.bench import BenchOptions
from ditforge.config import PRESETS, TrainConfig, option_fields, preset
from ditforge.data.store.extract import ExtractOptions
from ditforge.errors import UserError
from ditforge.evaluation.command import EvalOptions
from ditforge.export import ExportOptions
from ditforge.flags import add_option, add_options, options_from_args
from ditforge.preemption import EXIT_PREEMPTED, Stopped
from ditforge.write_failures import storage_errno
from ditforge.sampling.command import SampleOptions
from ditforge.verify import VerifyOptions

EXIT_DIVERGED = 1
EXIT_USER_ERROR = 2
EXIT_DAMAGED = 1  # `verify`: some file is not as written (train's 1 is a diverged run)
EXIT_BUG = 3
# EXIT_PREEMPTED (75): stopped by SIGTERM, SIGUSR1 or a first Ctrl-C after saving (preemption.py)
EXIT_INTERRUPTED = 130  # a second Ctrl-C: 128 + SIGINT, as a shell reports a process it interrupted


def rerun_command(argv: list[str] | None, distributed: bool) -> str:
    """The command line that continues this one (the same one), as a user would type it."""
    import shlex

    words = shlex.join(sys.argv[1:] if argv is None else argv)
    return f"torchrun ... -m ditforge {words}" if distributed else f"ditforge {words}"


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
    for path, f, kind in option_fields():  # default None: the preset's value stands unless the option is given
        add_option(p, path, f, kind, shown=_tiny_default)
    p.add_argument("--no-progress", action="store_true", help="no progress bar (log lines only) (default: False)")


#: The options of every command but train: one dataclass each, declared in the module that runs it.
OPTIONS = {"extract": ExtractOptions, "sample": SampleOptions, "eval": EvalOptions, "export": ExportOptions,
           "bench": BenchOptions, "verify": VerifyOptions}

_PARSERS = {
    "extract": dict(
        help="encode images once through the VAE into a latent store that `train --data` reads",
        description="Encode a data set through a VAE into FEATURES (shards + manifest.json). Resumable: rerun "
        "the same command after a crash. Under torchrun each rank encodes its own part.",
    ),
    "sample": dict(help="draw a labelled grid of samples from a run or checkpoint"),
    "eval": dict(
        help="measure samples: a run (did it learn its classes? FID against its held-out split), or an .npz "
        "against a reference (FID, sFID, precision, recall)",
        description="Two modes.\n  ditforge eval RUN                       samples of every class read by a judge "
        "trained on the run's own data (cached in RUN/judge/), per-class accuracy, FID / precision / recall against "
        "the held-out split (built-in sets: SVC accuracy and MLP Frechet distance)"
        "\n  ditforge eval --samples S.npz --ref REF  ADM metrics with Inception-v3; REF is an image "
        "folder, an .npz of images, or a statistics file from --save-ref",
    ),
    "export": dict(
        help="write a model for others: a diffusers DiTPipeline folder, the official DiT / SiT .pt, or a Hub folder",
        description="Export the EMA weights of a run (or checkpoint, hub or diffusers folder, official .pt) as --format "
        "diffusers (DiTPipeline.from_pretrained), official (facebookresearch/DiT or willisma/SiT models.py, strict) or "
        "hub (model.safetensors, config.json and a model card; ditforge sample / eval / train --init-from read it).",
    ),
    "bench": dict(help="training throughput: images/s, step time, peak memory, model FLOP/s and MFU"),
    "verify": dict(
        help="check that the files of a latent store, run, checkpoint, export or .npz are the bytes that were written",
        description="Check every file of PATH against the size and checksum recorded when it was written (a store's "
        "manifest, a checkpoint's state.json, an .npz's zip CRCs) and its header; name every damaged file with what is "
        "wrong. Exit status 0: all good; 1: some file is damaged; 2: PATH is nothing ditforge writes.",
    ),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ditforge",
        description="Train class-conditional Diffusion Transformers (DiT) on your images; sample and evaluate them.",
        formatter_class=_Formatter,
    )
    parser.add_argument("--version", action="version", version=f"ditforge {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="{extract,train,sample,eval,export,bench,verify}")
    for name in ("extract", "train", "sample", "eval", "export", "bench", "verify"):
        if name == "train":
            _add_train(sub)
        else:
            add_options(sub.add_parser(name, formatter_class=_Formatter, **_PARSERS[name]), OPTIONS[name])
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


# name in train/auto.py -> config path (and the train parser's dest)
_AUTO_FIELDS = {"model": "model.name", "precision": "precision", "steps": "steps", "batch": "global_batch", "lr": "optim.lr",
                "optimizer": "optim.optimizer", "objective": "objective",
                "time_dist": "flow.time_distribution", "norm": "model.norm", "mlp": "model.mlp", "rope": "model.rope",
                "qk_norm": "model.qk_norm"}


def _node(values: dict, path: str) -> tuple[dict, str]:
    *parents, leaf = path.split(".")
    for part in parents:
        values = values[part]
    return values, leaf


def auto_defaults(args: argparse.Namespace, cfg: TrainConfig) -> tuple[TrainConfig, list[str]]:
    """Model, precision, objective and steps the user left out, chosen for the device and the data
    (`train/auto.py`); a resumed run keeps the ones its folder recorded. Returns the config
    and one line per choice."""
    from ditforge.train.auto import adapts_to_data, choose_defaults, describe_device, measure_step_seconds, peek_data
    from ditforge.train.device import pick_device

    given = {k: getattr(args, path) for k, path in _AUTO_FIELDS.items() if getattr(args, path) is not None}
    values = cfg.to_dict()
    saved_path = Path(cfg.run_dir) / "config.json"
    if cfg.init_from and saved_path.is_file():  # a resume keeps what its fresh start took from the source
        adopted = _keep_adopted(args, values, given, Path(cfg.run_dir))
    elif cfg.init_from:
        adopted = _adopt_init_source(args, values, given) + _finetune_flow_share(args, values) + _distillation_settings(args, values, given)
    else:
        adopted = []
    if adopted:
        cfg = TrainConfig.from_dict(_preview_sampler_of_objective(args, values))
    if cfg.init_from:  # the source's network decides the blocks (official files record none: the flags, else DiT's)
        for k in ("norm", "mlp", "rope", "qk_norm"):
            given.setdefault(k, values["model"][k])
    adapt = args.preset == "tiny" and adapts_to_data(cfg.data)
    if adapt and saved_path.is_file():
        from ditforge.train.resume import saved_config  # also when config.json is damaged: the checkpoint's

        saved = saved_config(Path(cfg.run_dir))[0].to_dict()
        lines = []
        for k, path in _AUTO_FIELDS.items():
            if k not in given:
                node, leaf = _node(saved, path)
                given[k] = node[leaf]
                lines.append(f"{k} {given[k]}: kept from {saved_path}")
            node, leaf = _node(values, path)
            node[leaf] = given[k]
        return TrainConfig.from_dict(_preview_sampler_of_objective(args, values)), lines
    if len(given) == len(_AUTO_FIELDS) or not adapt:
        return cfg, adopted  # nothing to choose, the demo, or data that training will refuse with its own message
    shape, num_classes = peek_data(cfg.data, cfg.image_size)
    def measure(model: str, precision: str, blocks: dict, objective: str, batch: int, optimizer: str) -> float:  # a CPU's steps follow its speed
        return measure_step_seconds(model, shape, num_classes, batch, precision, blocks, objective, optimizer)

    given.setdefault("optimizer", values["optim"]["optimizer"])  # not chosen (train/auto.py rule 8): the step is the run's own
    ch = choose_defaults(describe_device(pick_device()), shape, num_classes, cfg.global_batch, given, args.preset, False, measure)
    for path, v in ch.as_overrides().items():
        node, leaf = _node(values, path)
        node[leaf] = v
    return TrainConfig.from_dict(_preview_sampler_of_objective(args, values)), adopted + ch.reasons


#: What a fresh `--init-from` run takes from the source's record unless given: the network's
#: shape and block options, and the objective with its settings.
_FROM_SOURCE = ("model.name", "model.learn_sigma", "model.norm", "model.mlp", "model.rope", "model.qk_norm", "objective")
#: What it does not take: how the source itself was trained from its own source (a distilled
#: model's teacher is not this run's).
_NOT_FROM_SOURCE = ("meanflow.velocity",)


def _adopt_init_source(args: argparse.Namespace, values: dict, given: dict) -> list[str]:
    """Fill `values` (and `given`, for train/auto.py) with the model and objective that the
    `--init-from` source records (a run, checkpoint or hub folder: `formats.read.recorded_model`)
    where no flag names them, under the tiny preset (a paper preset names its own model); one
    line per value taken. Sources that record no model of ours (diffusers, official .pt) take
    the flags, and `train/init_from.py` names the flag that would fit."""
    from ditforge.formats.read import recorded_model

    if args.preset != "tiny":
        return []
    record = recorded_model(values["init_from"])
    if record is None:
        return []
    model_args, source_config = record
    source = dict(model=dict(model_args), objective=source_config.get("objective", "diffusion"))
    source["model"]["learn_sigma"] = model_args.get("learn_sigma", True)
    objective = getattr(args, "objective", None) or source["objective"]
    section = source_config.get(objective, {}) if objective == source["objective"] else {}
    paths = list(_FROM_SOURCE) + [f"{objective}.{k}" for k in section if f"{objective}.{k}" not in _NOT_FROM_SOURCE]
    lines = []
    for path in paths:
        if getattr(args, path, None) is not None:
            continue
        *parents, leaf = path.split(".")
        node = source if parents == ["model"] or not parents else {objective: section}
        for part in parents:
            node = node.get(part, {})
        if leaf not in node:
            continue
        target, key = _node(values, path)
        if target.get(key) != node[leaf]:
            target[key] = node[leaf]
            name = "model" if path == "model.name" else path.removeprefix("model.")
            lines.append(f"{name} {node[leaf]}: from --init-from {values['init_from']}")
        for k, p in _AUTO_FIELDS.items():
            if p == path:
                given[k] = node[leaf]
    return lines


def _keep_adopted(args: argparse.Namespace, values: dict, given: dict, run_dir: Path) -> list[str]:
    """A resumed `--init-from` run: the settings a fresh start takes from the source
    (`_adopt_init_source`, `_finetune_flow_share`, `_distillation_settings`: the network, the objective and its section,
    the optimizer and its learning rate)
    from the run's saved config where no flag names them, so the command that started the run
    resumes it (the source is not read again). One line per value that differs from the flags'."""
    from ditforge.train.resume import saved_config  # also when config.json is damaged: the checkpoint's

    saved = saved_config(run_dir)[0].to_dict()
    objective = getattr(args, "objective", None) or saved["objective"]
    paths = list(_FROM_SOURCE) + [f"{objective}.{k}" for k in saved.get(objective, {})] + ["optim.optimizer", "optim.lr"] if objective == saved["objective"] else []
    lines = []
    for path in paths:
        if getattr(args, path, None) is not None:
            continue
        mine, key = _node(values, path)
        theirs, leaf = _node(saved, path)
        if mine.get(key) != theirs[leaf]:
            mine[key] = theirs[leaf]
            lines.append(f"{path.removeprefix('model.').removeprefix('optim.')} {theirs[leaf]}: kept from {run_dir / 'config.json'}")
        for k, p in _AUTO_FIELDS.items():
            if p == path:
                given[k] = theirs[leaf]
    return lines


def _finetune_flow_share(args: argparse.Namespace, values: dict) -> list[str]:
    """A fresh MeanFlow run from a model that is not MeanFlow's (a flow or diffusion run, an
    official or diffusers file) trains FINETUNE_FLOW_SHARE of each batch at r = t, not the
    from-scratch 0.75, unless --mf-flow-share is given: its instantaneous velocity is learned
    already, and the intervals are what it lacks (Kim et al. 2025, arXiv 2511.19065: the
    average velocity over long intervals is learned once the instantaneous one is). One line
    when it applies."""
    from ditforge.formats.read import recorded_model
    from ditforge.meanflow import MeanFlowObjective
    from ditforge.meanflow.init import FINETUNE_FLOW_SHARE

    if values.get("objective") != "meanflow" or getattr(args, "meanflow.flow_share", None) is not None:
        return []
    record = recorded_model(values["init_from"])
    source = record[1].get("objective", "diffusion") if record is not None else "published"
    if source == "meanflow":
        return []  # its own share, adopted with its other settings
    values.setdefault("meanflow", {})["flow_share"] = FINETUNE_FLOW_SHARE
    return [f"mf-flow-share {FINETUNE_FLOW_SHARE:g}: a MeanFlow fine-tune of a {source} model, which knows its "
            f"instantaneous velocity (r = t): more of each batch on intervals (from scratch: {MeanFlowObjective().flow_share:g})"]


def _distillation_settings(args: argparse.Namespace, values: dict, given: dict) -> list[str]:
    """A fresh distillation (MeanFlow's --mf-velocity teacher: unguided, with one scale built in by
    --train-cfg, or with the scale as an input, --train-cfg-max) draws its times wider and weighs
    its errors plainly (DISTIL_TIME_STD, DISTIL_WEIGHT_P), steps with Muon (DISTIL_OPTIMIZER;
    AdamW under --parallel fsdp, which Muon does not fit), and takes its optimizer's rate cap
    (DISTIL_MAX_LR) or less, into `given` so that the device's choice does not raise it again:
    `meanflow/init.py` says why and what was measured; each unless its flag is given. One line per
    value set."""
    from ditforge.meanflow import MeanFlowObjective
    from ditforge.meanflow.init import DISTIL_MAX_LR, DISTIL_OPTIMIZER, DISTIL_TIME_STD, DISTIL_WEIGHT_P

    section = values.get("meanflow", {})
    paper = MeanFlowObjective()
    if values.get("objective") != "meanflow" or section.get("velocity") != "teacher":
        return []
    lines = []
    for key, flag, value, why in (("time_std", "mf-time-std", DISTIL_TIME_STD, "more long intervals, the one-step jump"),
                                  ("weight_p", "mf-weight-p", DISTIL_WEIGHT_P, "the plain squared error")):
        if getattr(args, f"meanflow.{key}", None) is None and section.get(key, getattr(paper, key)) != value:
            values.setdefault("meanflow", {})[key] = value
            lines.append(f"{flag} {value:g}: a distillation of the teacher, {why} (the paper's, which "
                         f"learns from the data's velocity: {getattr(paper, key):g})")
    optim = values.setdefault("optim", {})
    if getattr(args, "optim.optimizer", None) is None and values.get("parallel") != "fsdp" and optim.get("optimizer") != DISTIL_OPTIMIZER:
        lines.append(f"optimizer {DISTIL_OPTIMIZER}: a distillation learns the teacher's one-step map in fewer steps "
                     f"with it (the digits, unguided: 1.13x the teacher's 20-step distance at 1 evaluation, AdamW 1.26x)")
        optim["optimizer"] = DISTIL_OPTIMIZER
    given["optimizer"] = optim.get("optimizer", "adamw")  # the step that train/auto.py measures is its own
    cap = DISTIL_MAX_LR.get(optim.get("optimizer", "adamw"), max(DISTIL_MAX_LR.values()))
    if getattr(args, "optim.lr", None) is None:
        if optim["lr"] > cap:
            lines.append(f"lr {cap:g}: a distillation with {optim['optimizer']} takes at most {cap:g}, not the "
                         f"preset's {optim['lr']:g} (meanflow/init.py: measured on the digits and MNIST)")
            optim["lr"] = cap
        given["lr"] = optim["lr"]  # the device's choice (train/auto.py) does not raise it
    return lines


def _preview_sampler_of_objective(args: argparse.Namespace, values: dict) -> dict:
    """The previews' sampler, steps and guidance follow the (maybe chosen) objective unless
    --sample-sampler, --sample-steps, --sample-cfg were given."""
    if getattr(args, "sample_sampler", None) is None:
        values["sample_sampler"] = ""  # "" = the objective's default (TrainConfig)
    if getattr(args, "sample_steps", None) is None and "sample_steps" not in preset(args.preset):
        values["sample_steps"] = ""  # "" = 50, or a few-step objective's own (TrainConfig)
    if getattr(args, "sample_cfg", None) is None and "sample_cfg" not in preset(args.preset):
        values["sample_cfg"] = None  # None = 4, or a MeanFlow model's built-in guidance (TrainConfig)
    return values


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
        print("(--model, --precision, --objective, --time-dist, --batch-size, --lr, --steps and the block flags given on the command line "
              "override these choices)")
    result = train(cfg, progress=not args.no_progress)
    if not result.is_main:
        return 0
    print(f"trained {cfg.model.name} to step {result.step}; checkpoint: {result.checkpoint}")
    print(f"samples of every class (cfg {cfg.sample_cfg:g}): {result.preview}")
    return 0


def _write_json(path: str | None, report: dict | None) -> None:
    if path and report is not None:
        Path(path).write_text(json.dumps(report, indent=2) + "\n")


def cmd_sample(args: argparse.Namespace) -> int:
    from ditforge.sampling.bulk import sample_npz
    from ditforge.sampling.command import sample_grid

    opts = options_from_args(SampleOptions, args)
    out = Path(opts.out)
    _check_writable(out)
    bulk = out.suffix == ".npz"
    if opts.num_samples is not None and not bulk:
        raise UserError(f"--num-samples needs an .npz output (ADM format), got --out {opts.out!r}")
    result = sample_npz(opts) if bulk else sample_grid(opts)
    if result.is_main:
        print(result.line())
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from ditforge.evaluation.command import evaluate_options

    opts = options_from_args(EvalOptions, args)
    for path in (opts.json, opts.save_ref):
        if path:
            _check_writable(Path(path))
    result = evaluate_options(opts)
    for line in result.lines:
        print(line)
    _write_json(opts.json, result.report)
    return 0


def cmd_extract(args: argparse.Namespace) -> int:
    from ditforge.data.store.extract import extract_store

    result = extract_store(options_from_args(ExtractOptions, args))
    if result.is_main:
        print(result.line)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from ditforge.export import export

    print(export(options_from_args(ExportOptions, args)).line())
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from ditforge.bench import benchmark

    opts = options_from_args(BenchOptions, args)
    if opts.json:
        _check_writable(Path(opts.json))
    result = benchmark(opts)
    print(result.line())
    _write_json(opts.json, result.to_dict())
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from ditforge.verify import verify_command

    report = verify_command(options_from_args(VerifyOptions, args))
    for line in report.lines():
        print(line)
    return 0 if report.ok else EXIT_DAMAGED


COMMANDS = {"extract": cmd_extract, "train": cmd_train, "sample": cmd_sample, "eval": cmd_eval, "export": cmd_export,
            "bench": cmd_bench, "verify": cmd_verify}


# What fits in less GPU memory, per command: its own options.
LESS_MEMORY = {
    "train": "lower --batch-size, or keep it and split each step with --grad-accum N, or keep less for "
             "backward with --grad-checkpoint ops (half the activations, no matrix product twice) or full",
    "bench": "lower --batch, or keep less for backward with --grad-checkpoint ops or full",
    "sample": "lower --batch-size",
    "eval": "lower --batch-size",
    "extract": "lower --batch-size",
    "export": "export on a CPU (CUDA_VISIBLE_DEVICES=)",
}


def out_of_memory_message(command: str, error: BaseException) -> str:
    """One paragraph for a GPU out of memory: torch's own figures (what it asked for, what the GPU
    has), then what to change. The settings asked for more than the GPU holds: not a bug."""
    figures = str(error).split(" Including non-PyTorch")[0].strip()  # drop the allocator's long advice
    return f"{figures} The settings need more GPU memory than there is: {LESS_MEMORY[command]}."


def main(argv: list[str] | None = None) -> int:
    """Run one command; its exit status. A process that led a torchrun process group exits here
    (`distributed.end_process`)."""
    from ditforge.train import distributed

    return distributed.end_process(_run(argv))


def _run(argv: list[str] | None) -> int:
    from ditforge.errors import NonFiniteLossError, is_quiet

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USER_ERROR
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stdout)
    from ditforge.train.device import keep_freed_host_memory

    keep_freed_host_memory()  # every command allocates and frees the same tensors over and over
    _python_stacks_on_a_crash()
    try:
        return COMMANDS[args.command](args)
    except Stopped as e:  # SIGTERM, SIGUSR1 or a first Ctrl-C, after the work in flight was saved
        if not is_quiet(e):
            print(f"ditforge {args.command}: {e}; to continue, rerun the same command: {rerun_command(argv, e.distributed)}",
                  file=sys.stderr)
        return EXIT_PREEMPTED
    except KeyboardInterrupt:  # the second Ctrl-C
        print(f"ditforge {args.command}: interrupted; what was saved before (the last checkpoint, shard or part) is "
              "intact: rerun the same command to continue from it", file=sys.stderr)
        return EXIT_INTERRUPTED
    except NonFiniteLossError as e:
        if not is_quiet(e):  # under torchrun: rank 0 prints, the others exit alike
            print(f"ditforge {args.command}: error: {e}", file=sys.stderr)
        return EXIT_DIVERGED
    except UserError as e:
        if not is_quiet(e):
            print(f"ditforge {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except torch.cuda.OutOfMemoryError as e:
        print(f"ditforge {args.command}: error: {out_of_memory_message(args.command, e)}", file=sys.stderr)
        return EXIT_USER_ERROR
    except (OSError, SafetensorError) as e:
        line = storage_error_line(e)
        if line is None:  # not about a file the user named, nor the machine's storage: ours to fix
            return _report_bug(args.command)
        print(f"ditforge {args.command}: error: {line}", file=sys.stderr)
        return EXIT_USER_ERROR
    except Exception:
        return _report_bug(args.command)


def _python_stacks_on_a_crash() -> None:
    """Print every thread's Python stack to stderr if the process dies of a fatal signal (SIGSEGV,
    SIGABRT, ...), as `python -X faulthandler` does. A crash in native code (a gloo collective
    under torchrun, a kernel) otherwise leaves only torchrun's "Signal 11 received" and no line
    saying which step of the command it was in. Unchanged where the handler is already on (pytest,
    PYTHONFAULTHANDLER) or stderr has no file descriptor."""
    import faulthandler
    import io

    if not faulthandler.is_enabled():
        try:
            faulthandler.enable()
        except (AttributeError, ValueError, io.UnsupportedOperation):  # sys.stderr None, closed or not a file
            pass


def _report_bug(command: str) -> int:
    """The traceback of the exception being handled, a request to report it, and EXIT_BUG."""
    traceback.print_exc()
    print(
        f"ditforge {command}: internal error: the lines above are a bug in ditforge {__version__}, "
        "not a mistake in your input; please report them with the command you ran",
        file=sys.stderr,
    )
    return EXIT_BUG


def storage_error_line(e: BaseException) -> str | None:
    """One line for an OSError about a named file or about the machine's storage (also as raised
    by safetensors), saying that what was written before is intact; None for any other error.
    The writes of checkpoints, shards and `.npz` files say more (`write_failures.py`: which file,
    the bytes it needs); this is for any other write a full disk stops."""
    if isinstance(e, OSError) and e.filename is not None:
        return str(e)  # names the file and the reason
    code = storage_errno(e)  # a full disk, a quota, a file-size limit, a read-only or failing mount
    if code is None:
        return None
    reason = (e.strerror if isinstance(e, OSError) else None) or os.strerror(code)
    return (f"{reason} ({errno.errorcode[code]}) while reading or writing files; free space, or raise the quota or limit, and rerun the "
            "same command: files are written under temporary names and renamed when complete, so the checkpoints, "
            "shards and outputs already written are intact (a run resumes from its last checkpoint)")


if __name__ == "__main__":
    sys.exit(main())
