"""Checkpoints: one folder per step, written atomically, loaded without pickle.

Layout of `RUN/checkpoints/step-0001200/`:

    model.safetensors       unwrapped weights (no `module.` / `_orig_mod.` prefixes)
    ema.safetensors         EMA weights (what sampling uses by default)
    optimizer.safetensors   optimizer tensors, keyed "<parameter name>/<state name>"
    rng.safetensors         torch CPU (and CUDA) generator states
    projector.safetensors   with REPA only: the projector's weights (never in model.safetensors,
    projector_optimizer.safetensors   whose keys stay the official DiT's) and its optimizer
    state.json              step, data position, optimizer hyper-parameters, the resolved
                            config, the model's constructor arguments, the autoencoder

A save writes everything into `.step-0001200.tmp`, flushes it to disk, then renames the folder:
a kill at any moment leaves either the complete new checkpoint or none, and "latest" is the
highest complete step by name (never by file size or time). A folder named `step-N` is only
ever a whole checkpoint, and nothing but renames touch that name:

- saving a step that is already there (a resumed run saving the step it resumed at) renames the
  old folder aside to `.step-N.old` first, then the new one into place, then deletes the old;
- deleting (keep-last-k, after the new one is in place) renames the folder to `.step-N.deleting`
  before `rmtree` removes its files one by one, in no set order.

So a kill leaves at most those hidden names beside the checkpoints, and `tidy_checkpoints` (run
at every start) removes them, or, where a re-save was killed between its two renames, renames
`.step-N.old` back: it is that step's checkpoint. As a second guard (folders half-deleted by an
earlier version, which deleted in place), a checkpoint counts as complete only when all of
`FILES` are there.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ditforge.errors import CheckpointError

STEP_DIR = re.compile(r"^step-(\d+)$")
FILES = ("model.safetensors", "ema.safetensors", "optimizer.safetensors", "rng.safetensors", "state.json")
# hidden names of a step folder: being written, set aside by a re-save, being deleted
TMP, OLD, DELETING = ".tmp", ".old", ".deleting"
HIDDEN_DIR = re.compile(r"^\.(step-\d+)(\.tmp|\.old|\.deleting)$")


def step_dir_name(step: int) -> str:
    return f"step-{step:07d}"


def checkpoint_dir(run_dir: str | Path, step: int) -> Path:
    """The folder of checkpoint `step`: a function of the step alone, so every rank knows it."""
    return Path(run_dir) / "checkpoints" / step_dir_name(step)


def _hidden(final: Path, suffix: str) -> Path:
    return final.with_name(f".{final.name}{suffix}")


def is_complete(folder: Path) -> bool:
    return folder.is_dir() and all((folder / name).is_file() for name in FILES)


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoint folders of a run, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = STEP_DIR.match(p.name)
        if m and is_complete(p):
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def remove_checkpoint(folder: Path) -> None:
    """Delete a checkpoint folder so that no moment of it passes as a checkpoint: renamed to a
    hidden name first, then its files removed. A folder that cannot be renamed stays whole."""
    doomed = _hidden(folder, DELETING)
    if doomed.exists():
        shutil.rmtree(doomed)  # left by a deletion that was killed
    try:
        os.rename(folder, doomed)
    except OSError:  # e.g. permissions: the folder stays, complete; keep-last tries again at the next save
        return
    shutil.rmtree(doomed, ignore_errors=True)


def tidy_checkpoints(run_dir: str | Path) -> list[str]:
    """Clear what killed saves and deletions left in `run_dir/checkpoints` (module docstring);
    return one line for each step folder recovered. For one process (rank 0) before any reads."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    recovered = []
    for p in sorted(root.iterdir()):
        m = HIDDEN_DIR.match(p.name)
        if m is None:
            continue
        final = root / m.group(1)
        if m.group(2) == OLD and not final.exists() and is_complete(p):
            os.rename(p, final)  # a re-save killed between its renames: this was, and is, the checkpoint
            recovered.append(f"{final} recovered from {p.name}, set aside by a save of the same step that was killed")
        else:
            shutil.rmtree(p)
    if recovered:
        fsync_path(root)
    return recovered


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


# -- optimizer state <-> flat tensors + JSON ------------------------------------------------


def _flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors, scalars = {}, {}
    for idx, per_param in state["state"].items():
        for name, value in per_param.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{idx}/{name}"] = value.detach().contiguous().cpu()
            else:
                scalars[f"{idx}/{name}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[Any, dict[str, Any]] = {}
    for key, value in list(tensors.items()) + list(meta["scalars"].items()):
        idx, name = key.rsplit("/", 1)
        state.setdefault(int(idx) if idx.isdigit() else idx, {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def _rng_state() -> dict[str, torch.Tensor]:
    states = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            states[f"cuda.{i}"] = s
    return states


def _set_rng_state(states: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(states["cpu"])
    cuda = [states[k] for k in sorted(k for k in states if k.startswith("cuda."))]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def fsync_path(path: Path) -> None:
    """Flush a file's or a folder's entries to disk (a folder: the renames into it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- save / load ---------------------------------------------------------------------------


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    model_state: dict[str, torch.Tensor],
    ema_state: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any],
    meta: dict[str, Any],
    keep_last: int = 0,
    extras: dict[str, tuple[dict[str, torch.Tensor], dict[str, Any]]] | None = None,
) -> Path:
    """Write the checkpoint of `step` atomically; return its folder. `extras` maps a name to the
    (weights, optimizer state) of a trained module that is not part of the model (REPA's
    projector): NAME.safetensors, NAME_optimizer.safetensors, state.json's extras[NAME]."""
    final = checkpoint_dir(run_dir, step)
    root = final.parent
    root.mkdir(parents=True, exist_ok=True)
    tmp = _hidden(final, TMP)
    if tmp.exists():
        shutil.rmtree(tmp)  # left by a save that was killed
    tmp.mkdir()

    opt_tensors, opt_meta = _flatten_optimizer(optimizer_state)
    save_file({k: v.detach().contiguous().cpu() for k, v in model_state.items()}, tmp / "model.safetensors")
    save_file({k: v.detach().contiguous().cpu() for k, v in ema_state.items()}, tmp / "ema.safetensors")
    save_file(opt_tensors, tmp / "optimizer.safetensors")
    save_file(_rng_state(), tmp / "rng.safetensors")
    state = dict(meta, step=step, optimizer=opt_meta)
    written = list(FILES)
    for name, (weights, opt_state) in (extras or {}).items():
        extra_tensors, extra_meta = _flatten_optimizer(opt_state)
        save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, tmp / f"{name}.safetensors")
        save_file(extra_tensors, tmp / f"{name}_optimizer.safetensors")
        state.setdefault("extras", {})[name] = {"optimizer": extra_meta}
        written += [f"{name}.safetensors", f"{name}_optimizer.safetensors"]
    (tmp / "state.json").write_text(json.dumps(state, indent=2) + "\n")
    for name in written:
        with open(tmp / name, "rb") as f:
            os.fsync(f.fileno())
    fsync_path(tmp)

    # The same step saved again (e.g. the final save after a resume at it): at every moment the
    # folder or its `.old` copy is a whole checkpoint of this step (tidy_checkpoints recovers it).
    old = _hidden(final, OLD)
    if final.exists():
        if old.exists():
            shutil.rmtree(old)  # stale: `final` is the checkpoint
        os.rename(final, old)
    os.rename(tmp, final)
    fsync_path(root)
    if old.exists():
        shutil.rmtree(old)

    if keep_last > 0:
        for stale in list_checkpoints(run_dir)[:-keep_last]:
            remove_checkpoint(stale)
    return final


# Entries of state.json and their types: what resuming and sampling read of it.
STATE_KEYS = {"step": int, "position": int, "config": dict, "model_args": dict, "data": dict, "optimizer": dict}
RESUME_KEYS = ("step", "position", "optimizer")
SAMPLING_KEYS = ("step", "config", "model_args", "data")


def read_state(ckpt_dir: str | Path, required: tuple[str, ...] = ("step",)) -> dict[str, Any]:
    """state.json of a checkpoint folder, checked to hold the `required` entries (of
    `STATE_KEYS`) with their types: a damaged file is a one-line error, not a KeyError later."""
    path = Path(ckpt_dir) / "state.json"
    try:
        state = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {str(ckpt_dir)!r} has no state.json; it is not a ditforge checkpoint") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"checkpoint file {str(path)!r} is corrupt ({e}); delete the folder to fall back to an older one") from None
    problems = [] if isinstance(state, dict) else ["it is not a JSON object"]
    if not problems:
        problems = [f"{k!r} is missing" for k in required if k not in state]
        problems += [f"{k!r} is not a {STATE_KEYS[k].__name__}" for k in required if k in state and not isinstance(state[k], STATE_KEYS[k])]
        if "data" in required and isinstance(state.get("data"), dict) and not isinstance(state["data"].get("class_names"), list):
            problems.append("'data' has no list 'class_names'")
    if problems:
        raise CheckpointError(
            f"checkpoint file {str(path)!r} is damaged: {'; '.join(problems)}; delete the folder to fall back to an older one"
        )
    return state


def read_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """A safetensors file, with a clear error when it is missing or damaged."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {str(path)!r} is missing")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint file {str(path)!r} is corrupt ({e}); delete its folder to fall back to an older one") from None


def load_weights(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """load_state_dict(strict=True), with an error naming what does not fit."""
    check_weights(model, state, source)
    model.load_state_dict(state, strict=True)


def check_weights(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Raise CheckpointError naming the first keys or shapes of `state` that do not fit `model`."""
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = [k for k in own if k in state and own[k] != tuple(state[k].shape)]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:3]}{'...' if len(missing) > 3 else ''}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}")
        if wrong:
            k = wrong[0]
            parts.append(f"{k} has shape {tuple(state[k].shape)} but the model expects {own[k]}")
        raise CheckpointError(f"weights in {source!r} do not fit the model: {'; '.join(parts)}")


def read_training_state(ckpt_dir: str | Path, tensors: bool = True) -> tuple[dict, dict, dict, dict[str, Any]]:
    """(model weights, EMA weights, optimizer state, state.json) of a checkpoint folder, on CPU.
    The RNG states are restored here too. With `tensors=False` the three state dicts are empty:
    for the ranks of a resume that rank 0 broadcasts to, which so never hold the whole checkpoint."""
    ckpt_dir = Path(ckpt_dir)
    state = read_state(ckpt_dir, RESUME_KEYS)
    _set_rng_state(read_tensors(ckpt_dir / "rng.safetensors"))
    if not tensors:
        return {}, {}, {}, state
    model = read_tensors(ckpt_dir / "model.safetensors")
    ema = read_tensors(ckpt_dir / "ema.safetensors")
    if not {"param_groups", "scalars"} <= set(state["optimizer"]):
        raise CheckpointError(f"checkpoint file {str(ckpt_dir / 'state.json')!r} is damaged: 'optimizer' lacks "
                              "'param_groups' or 'scalars'; delete the folder to fall back to an older one")
    optimizer = _unflatten_optimizer(read_tensors(ckpt_dir / "optimizer.safetensors"), state["optimizer"])
    return model, ema, optimizer, state


def read_extra_state(ckpt_dir: str | Path, name: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(weights, optimizer state) of the extra module `name` saved by `save_checkpoint(extras=...)`."""
    ckpt_dir = Path(ckpt_dir)
    meta = read_state(ckpt_dir).get("extras", {}).get(name)
    if not isinstance(meta, dict) or not {"param_groups", "scalars"} <= set(meta.get("optimizer", {})):
        raise CheckpointError(f"checkpoint {str(ckpt_dir)!r} holds no {name} state (state.json has no extras.{name}); "
                              "it was written by a run without it: resume with the settings it was trained with")
    weights = read_tensors(ckpt_dir / f"{name}.safetensors")
    return weights, _unflatten_optimizer(read_tensors(ckpt_dir / f"{name}_optimizer.safetensors"), meta["optimizer"])
