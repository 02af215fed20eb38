"""Start a run from trained weights: `ditforge train --init-from PATH` (issue 26 item 2; the
MeanFlow issue's fine-tune from a flow run, issue 25 item 4, is the same option).

PATH is anything `formats.read.read_model` reads: a ditforge run (its latest checkpoint) or
checkpoint folder, a hub folder, a diffusers DiT folder, or an official DiT / SiT `.pt`. A `.pt`
records neither its model nor its objective, so it is read as what this run says it trains (its
`--model` and `--objective`: SiT weights need `--objective flow`); the other formats record both,
and they are checked against the run's. Of a ditforge checkpoint the EMA weights are taken (what
`sample` draws from).

Only a fresh start reads PATH: the weights go into the freshly built model and into its EMA (so
the EMA starts equal to them), with a fresh optimizer at step 0. A run that resumes from its own
checkpoint ignores PATH (its checkpoint wins); a different `--init-from` for a run folder that
already holds a run is refused like any other change of recipe (`resume.check_same_run`).

How each tensor of this run's model is filled (`adapt_state`):

| tensor | from the source |
|---|---|
| `pos_embed` | nothing: this run's own fixed sin-cos table (never trained; a function of the input size and width, so another input size simply gets its own) |
| `y_embedder.embedding_table.weight` | resized to this run's classes (`map_classes`, `resize_label_table`): paired by name when the two share a class name, else by index; a class the source lacks starts at the source's null row; the null row stays the null row |
| `final_layer.linear.*` | as is; a source that learns sigma into a run that does not: its variance half dropped (`drop_sigma`) |
| every other tensor | as is: the same key and shape, or a one-line error naming both shapes |

A different patch size, channel count, width, depth or block option (norm, mlp, rope, qk-norm),
a run that learns sigma from a source that does not, and another objective (diffusion vs flow:
the outputs mean another thing) are one-line `UserError`s. RoPE has no weights to resize.
A MeanFlow run may start from a flow model on the linear path that predicts the velocity
(`COMPATIBLE`; the MeanFlow issue's fine-tune): its network sees the same time and predicts the
same velocity at r = t, and the interval embedder it lacks starts as this run's own with its
output layer at zero (`meanflow.interval_embedder_state`), so at the first step the MeanFlow
model is exactly the flow model.

Under torchrun rank 0 alone reads and adapts (its errors are every rank's:
`distributed.raise_together`) and broadcasts the result into each rank's model and EMA after
they are wrapped (`distributed.load_full_state`, as a resume does), so every rank holds the same
weights under DDP and FSDP2 alike, and no other rank holds the whole source in host memory.

A run that distils its source (MeanFlow's `--mf-velocity teacher`, `objectives.uses_teacher`)
also keeps the adapted source as a frozen teacher on every rank (`Init.teacher`: rank 0's
tensors broadcast into a copy of the fresh model). A resume reads it again from the checkpoint
folder (or file) the first checkpoint recorded, and refuses it in one line when it is gone or its
digest differs from the recorded one (`read_teacher_again`); a class the teacher was not trained
on is refused at the start (`check_teacher_classes`).

Where the run came from: `config.json`'s `init_from` is PATH as given; every checkpoint's
`state.json` records what it resolved to under `init_from` (`Init.record`: format, file, step,
a digest of the source's tensors, how the classes were paired), kept by every later checkpoint.
"""

from __future__ import annotations

import copy
import hashlib
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ditforge.config import ModelConfig, TrainConfig
from ditforge.data.training_data import TrainingData
from ditforge.errors import CheckpointError, UserError
from ditforge.formats.weights import ModelWeights
from ditforge.meanflow.init import added_embedders, check_flow_source
from ditforge.models.dit import MODEL_PATCH_SIZES, MODEL_SIZES
from ditforge.objectives import objective_from_config, objective_of_run, uses_teacher
from ditforge.train import distributed
from ditforge.train.resume import Found

log = logging.getLogger("ditforge.train")

LABELS = "y_embedder.embedding_table.weight"
PATCHES = "x_embedder.proj.weight"
FINAL = ("final_layer.linear.weight", "final_layer.linear.bias")
#: keys that keep this run's freshly initialised value (not trained, or new to this run's model)
OWN_KEYS = ("pos_embed",)
#: (source objective, this run's) pairs that fit besides the same objective
COMPATIBLE: frozenset[tuple[str, str]] = frozenset({("flow", "meanflow")})
#: settings within one objective that change what the network's output means: a warning when they differ
MEANING = {"diffusion": ("noise_schedule", "diffusion_steps"), "flow": ("path", "prediction"), "meanflow": ()}
BLOCK_OPTIONS = ("norm", "mlp", "rope", "qk_norm")


# -- reading ---------------------------------------------------------------------------------


def read_source(cfg: TrainConfig, path: str | None = None) -> ModelWeights:
    """The model at `path` (default `cfg.init_from`; EMA weights of a ditforge checkpoint). A single file is an
    official `.pt` (`read_model`'s table), which names neither model nor objective: it is read as
    this run's; the other formats' records are compared in `check_objective` / `check_architecture`."""
    from ditforge.formats.read import read_model  # noqa: PLC0415 - the format readers only where used

    path = path or cfg.init_from
    plain_file = Path(path).is_file()
    objective = "flow" if cfg.objective == "meanflow" else cfg.objective  # no published MeanFlow .pt: a SiT's
    return read_model(path, model_name=cfg.model.name if plain_file else None,
                      objective=objective if plain_file else None, use_ema=True)


def weights_digest(state: dict[str, Tensor]) -> str:
    """sha256 over the tensors (sorted keys, each key, dtype, shape and bytes), first 16 hex digits:
    the same weights give the same digest whichever format they were read from."""
    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()[:16]


# -- checks ----------------------------------------------------------------------------------


def check_objective(source: ModelWeights, cfg: TrainConfig) -> None:
    """Another objective is an error; within one, settings that change what the output means
    (`MEANING`) are a warning: the fine-tune starts from weights that predict something else."""
    theirs, ours = source.objective_config.get("objective", "diffusion"), cfg.objective
    if theirs != ours and (theirs, ours) not in COMPATIBLE:
        raise UserError(
            f"--init-from {cfg.init_from!r} holds a {theirs}-objective model and this run trains {ours}: the network's "
            f"outputs mean another thing under each; pass --objective {theirs}, or start from a {ours} model")
    if (theirs, ours) == ("flow", "meanflow"):
        check_flow_source(source.objective_config.get("flow", {}))
    if theirs == ours:
        a, b = objective_from_config(source.objective_config), objective_of_run(cfg)
        changed = [f"{k} {getattr(a, k)!r} -> {getattr(b, k)!r}" for k in MEANING.get(ours, ()) if getattr(a, k) != getattr(b, k)]
        if changed:
            log.warning("--init-from %s: the source was trained with other %s settings (%s); the fine-tune starts "
                        "from weights that predict for those", cfg.init_from, ours, ", ".join(changed))


def _depth(state: dict[str, Tensor]) -> int:
    return len({k.split(".")[1] for k in state if k.startswith("blocks.")})


def _model_name(depth: int, hidden: int, patch: int) -> str | None:
    """The registry name of a DiT of this depth, width and patch size (None: not one of ours)."""
    for size, (d, h, _) in MODEL_SIZES.items():
        if (d, h) == (depth, hidden) and patch in MODEL_PATCH_SIZES[size]:
            return f"DiT-{size}/{patch}"
    return None


def _choose(state: dict[str, Tensor]) -> str:
    hidden, _, patch, _ = state[PATCHES].shape
    name = _model_name(_depth(state), hidden, patch)
    return f"choose --model {name}" if name else f"the source (depth {_depth(state)}, width {hidden}, patch {patch}) is no registry model"


def check_architecture(source: ModelWeights, target: dict[str, Tensor], target_args: dict[str, Any]) -> None:
    """One-line UserError unless the source's network is this run's up to the tensors that
    `adapt_state` resizes: the same patch size, channels, width, depth, block options; learned
    sigma in this run only if the source has it; then every other key and shape."""
    state = source.state_dict
    if PATCHES not in state or LABELS not in state or FINAL[0] not in state:
        missing = next(k for k in (PATCHES, LABELS, FINAL[0]) if k not in state)
        raise CheckpointError(f"--init-from {source.source!r} is not a DiT: it has no {missing}")
    s, t = tuple(state[PATCHES].shape), tuple(target[PATCHES].shape)
    if s != t:
        hints = [_choose(state)] if (s[0], s[2:]) != (t[0], t[2:]) else []
        if s[1] != t[1]:
            hints.append(f"train on {s[1]}-channel data (the source's inputs: e.g. latents of its autoencoder), "
                         f"this run's data has {t[1]}")
        raise UserError(f"{PATCHES}: source {s} vs this run {t}: --init-from needs the same patch size, channels and "
                        f"width; {' and '.join(hints)}")
    if _depth(state) != _depth(target):
        raise UserError(f"blocks: the source has {_depth(state)} blocks, this run {_depth(target)}: --init-from needs the "
                        f"same depth; {_choose(state)}")
    defaults = ModelConfig()
    theirs = {k: source.model_args.get(k, getattr(defaults, k)) for k in BLOCK_OPTIONS}
    ours = {k: target_args.get(k, getattr(defaults, k)) for k in BLOCK_OPTIONS}
    if theirs != ours:
        flags = [f"--{k.replace('_', '-')} {v}" if isinstance(v, str) else f"--{'' if v else 'no-'}{k.replace('_', '-')}"
                 for k, v in theirs.items() if v != ours[k]]
        say = lambda o: ", ".join(f"{k}={v}" for k, v in o.items())  # noqa: E731
        raise UserError(f"block options: the source has {say(theirs)}, this run {say(ours)}: --init-from needs the same "
                        f"blocks; pass {' '.join(flags)}")
    s, t = tuple(state[FINAL[0]].shape), tuple(target[FINAL[0]].shape)
    if s[0] < t[0]:
        raise UserError(f"{FINAL[0]}: source {s} vs this run {t}: the source predicts no variance and this run learns it; "
                        "pass --no-learn-sigma")
    if s[0] not in (t[0], 2 * t[0]):
        raise UserError(f"{FINAL[0]}: source {s} vs this run {t}: --init-from needs the same output channels")
    skip = {LABELS, *FINAL, *OWN_KEYS}
    mine, others = set(target) - skip, set(state) - skip
    if mine - others:
        raise UserError(f"{min(mine - others)}: in this run's model but not in the source {source.source!r}: --init-from "
                        "needs the same network")
    if others - mine:
        raise UserError(f"{min(others - mine)}: in the source {source.source!r} but not in this run's model: --init-from "
                        "needs the same network")
    wrong = sorted(k for k in mine if state[k].shape != target[k].shape)
    if wrong:
        k = wrong[0]
        raise UserError(f"{k}: source {tuple(state[k].shape)} vs this run {tuple(target[k].shape)}: --init-from needs the "
                        "same network")


# -- the tensors that change -----------------------------------------------------------------


def map_classes(source_names: list[str], target_names: list[str]) -> tuple[list[int | None], str]:
    """For each of this run's classes, the source's label row it starts from (None: a class the
    source never saw), and how they were paired: by "name" when the two share a class name (the
    others are new), else by "index" (class i takes row i; those beyond the source's are new)."""
    index: dict[str, int] = {}
    for i, name in enumerate(source_names):
        index.setdefault(name, i)
    if any(name in index for name in target_names):
        return [index.get(name) for name in target_names], "name"
    return [i if i < len(source_names) else None for i in range(len(target_names))], "index"


def resize_label_table(table: Tensor, source_classes: int, rows: list[int | None], null_row: bool) -> Tensor:
    """(K [+1], D) -> (K' [+1], D): row i of the result is source row `rows[i]`, or, where that is
    None, the source's null row (row K); then the null row again when `null_row`.

    Why the null row for a new class, not the mean of the class rows: the null row is what the
    network was trained to draw any image of its data from, so a new class starts as the
    unconditional model (guidance on it starts at zero: conditional = unconditional) and the
    fine-tune learns its difference from there; the mean of the class embeddings is a point the
    network never saw in training. A source without a null row (trained with label dropout 0)
    gives the mean of its class rows instead, for new classes and for a null row alike."""
    if table.shape[0] not in (source_classes, source_classes + 1):
        raise CheckpointError(f"{LABELS} has {table.shape[0]} rows for {source_classes} classes (expected "
                              f"{source_classes} or {source_classes + 1} with the null class)")
    null = table[source_classes] if table.shape[0] > source_classes else table[:source_classes].mean(0)  # (D,)
    out = [table[r] if r is not None else null for r in rows] + ([null] if null_row else [])
    return torch.stack(out).clone()  # (K' [+1], D)


def drop_sigma(weight: Tensor, bias: Tensor, patch: int, channels: int) -> tuple[Tensor, Tensor]:
    """The final linear layer of a learned-sigma DiT, (p*p*2C, D) and (p*p*2C,), without its
    variance half: (p*p*C, D) and (p*p*C,). Its outputs per token are ordered (p, p, C') with the
    channel fastest (`DiT.unpatchify`), and channels [0, C) are the prediction (epsilon, or the
    velocity of a flow, which never uses the rest), [C, 2C) the variance interpolation v."""
    w = weight.reshape(patch * patch, 2 * channels, -1)[:, :channels]  # (p*p, C, D)
    b = bias.reshape(patch * patch, 2 * channels)[:, :channels]  # (p*p, C)
    return w.reshape(patch * patch * channels, -1).clone(), b.reshape(-1).clone()


def adapt_state(source: ModelWeights, target: dict[str, Tensor], target_args: dict[str, Any],
                class_names: list[str]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """This run's full state dict from the source's weights (module docstring's table), in the
    dtypes of `target` (this run's fresh state dict: shapes, dtypes and its own `pos_embed`), and
    what was changed. `class_names`: this run's data's classes."""
    added = added_embedders(target, source.state_dict)  # a flow model into a MeanFlow run, a MeanFlow one into iMF
    if added:
        source = replace(source, state_dict={**source.state_dict, **added})
    check_architecture(source, target, target_args)
    state = source.state_dict
    out = {k: (target[k] if k in OWN_KEYS else state[k]).to(target[k].dtype) for k in target if k not in (LABELS, *FINAL)}

    rows, paired_by = map_classes(list(source.class_names), list(class_names))
    null_row = target[LABELS].shape[0] > len(class_names)
    out[LABELS] = resize_label_table(state[LABELS], len(source.class_names), rows, null_row).to(target[LABELS].dtype)

    weight, bias = state[FINAL[0]], state[FINAL[1]]
    sigma_dropped = weight.shape[0] != target[FINAL[0]].shape[0]
    if sigma_dropped:
        weight, bias = drop_sigma(weight, bias, state[PATCHES].shape[2], state[PATCHES].shape[1])
    out[FINAL[0]], out[FINAL[1]] = weight.to(target[FINAL[0]].dtype), bias.to(target[FINAL[1]].dtype)
    changes = dict(
        classes=dict(paired_by=paired_by, from_source=sum(r is not None for r in rows),
                     new=[n for n, r in zip(class_names, rows) if r is None]),
        label_rows=[int(state[LABELS].shape[0]), int(out[LABELS].shape[0])],
        pos_embed_rebuilt="pos_embed" not in state or state["pos_embed"].shape != target["pos_embed"].shape,
        sigma_dropped=sigma_dropped,
    )
    return out, changes


# -- the run's part --------------------------------------------------------------------------


@dataclass
class Init:
    """What a run starts from: `state` the full weights for this run's model (rank 0 of a fresh
    start with --init-from; empty elsewhere, or None when there is nothing to load), `record`
    what `state.json` says of the source (None: the run starts from random weights)."""

    state: dict[str, Tensor] | None = None
    record: dict[str, Any] | None = None
    #: the teacher's weights, for a run that distils its source (`objectives.uses_teacher`): the
    #: source as adapted to this run's model (a fresh start's `state`; read again at a resume), on
    #: rank 0; empty elsewhere; None without a teacher
    teacher_state: dict[str, Tensor] | None = None

    def teacher(self, model: nn.Module, d: distributed.Dist) -> nn.Module | None:
        """The frozen teacher on every rank: a copy of `model` (this run's freshly built network,
        before it is wrapped) holding `teacher_state` (rank 0's, broadcast), in eval mode without
        gradients, on the run's device; None without one. A collective under torchrun."""
        if self.teacher_state is None:
            return None
        teacher = copy.deepcopy(model).to(d.device)
        distributed.load_full_state(teacher, dict(self.teacher_state), None, None, d)
        return teacher.eval().requires_grad_(False)

    def load(self, model: nn.Module, ema: nn.Module, d: distributed.Dist) -> None:
        """Into the (wrapped) model and its EMA, on every rank: rank 0's tensors, broadcast. A
        collective under torchrun: every rank calls it (a no-op where nothing is loaded)."""
        if self.state is None:
            return
        for module in (model, ema):  # a copy each: under FSDP2 the broadcast puts the shards into the dict it is given
            distributed.load_full_state(module, dict(self.state), None, None, d)


def prepare(cfg: TrainConfig, d: distributed.Dist, model: nn.Module, model_args: dict[str, Any], data: TrainingData,
            found: Found) -> Init:
    """Before the model is wrapped: at a fresh start with --init-from, rank 0 reads the source and
    adapts it to `model` (this run's freshly built model, unwrapped); a run that resumes (`found`
    a checkpoint) keeps what its checkpoint recorded (`state.json`'s `init_from`) and reads
    nothing, unless it distils the source (its teacher, `read_teacher_again`)."""
    distils = uses_teacher(objective_of_run(cfg))
    if found.checkpoint is not None:
        record = found.recorded("init_from")
        if cfg.init_from and d.is_main and not distils:
            log.info("--init-from %s ignored: the run resumes from its own checkpoint %s", cfg.init_from, found.checkpoint)
        if not distils:
            return Init(None, record)
        return Init(None, record, distributed.raise_together(d, lambda: read_teacher_again(cfg, d, model, model_args, data, record)))
    if not cfg.init_from:
        return Init()

    def read() -> Init:
        if not d.is_main:
            return Init({}, None, {} if distils else None)
        source = read_source(cfg)
        check_objective(source, cfg)
        state, changes = adapt_state(source, model.state_dict(), model_args, data.class_names)
        record = dict(path=cfg.init_from, format=source.format, source=source.source, step=source.step,
                      sha256=weights_digest(source.state_dict), **changes)
        log.info("initialised from %s (%s%s, sha256 %s): label table %d -> %d rows, classes paired by %s, %d new%s%s",
                 source.source, record["format"], f", step {source.step}" if source.step is not None else "",
                 record["sha256"], *record["label_rows"], changes["classes"]["paired_by"], len(changes["classes"]["new"]),
                 ", pos_embed rebuilt" if changes["pos_embed_rebuilt"] else "",
                 ", variance outputs dropped" if changes["sigma_dropped"] else "")
        if distils:
            check_teacher_classes(changes["classes"]["new"], cfg.init_from)
        return Init(state, record, state if distils else None)

    return distributed.raise_together(d, read)


def check_teacher_classes(new: list[str], source: str) -> None:
    """A teacher has a velocity only for the classes it was trained on: a class of this run's data
    that the source lacks (it starts at the source's null row) would be distilled as the null class."""
    if new:
        shown = ", ".join(map(repr, new[:5])) + (f" and {len(new) - 5} more" if len(new) > 5 else "")
        raise UserError(f"--mf-velocity teacher: the data has class(es) {shown} that --init-from {source} was not trained on; "
                        "the teacher would teach them as the unconditional model: distil on the data the teacher learned, "
                        "or fine-tune with the sample's velocity (drop --mf-velocity teacher)")


def read_teacher_again(cfg: TrainConfig, d: distributed.Dist, model: nn.Module, model_args: dict[str, Any],
                       data: TrainingData, record: dict[str, Any] | None) -> dict[str, Tensor]:
    """A resumed distillation's teacher (rank 0; {} elsewhere): its source read again from where the
    run's first checkpoint recorded it (`record`'s resolved `source`, else its `path`) and adapted as
    then; a one-line UserError when it is gone or its weights differ from the digest recorded then
    (the run would go on towards another teacher)."""
    if not d.is_main:
        return {}
    if not record or not (record.get("source") or record.get("path")):
        raise UserError("this run distils its --init-from model (--mf-velocity teacher), but its checkpoint records no "
                        "source to read it from again; start a new run")
    where = Path(str(record.get("source") or record.get("path")))
    where = str(where.parent if where.suffix == ".safetensors" else where)  # a checkpoint's or hub folder's weights file: its folder
    if not Path(where).exists():
        raise UserError(f"the teacher of this run (--mf-velocity teacher), {where}, is gone: the run cannot go on "
                        f"distilling it; put it back, or start a new run")
    source = read_source(cfg, where)
    digest = weights_digest(source.state_dict)
    if record.get("sha256") and digest != record["sha256"]:
        raise UserError(f"the teacher of this run (--mf-velocity teacher), {where}, has other weights now (sha256 "
                        f"{digest}, recorded {record['sha256']} when the run started): put the original back, or start a "
                        "new run")
    state, _ = adapt_state(source, model.state_dict(), model_args, data.class_names)
    log.info("the teacher (--mf-velocity teacher) read again from %s (sha256 %s)", where, digest)
    return state
