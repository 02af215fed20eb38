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

from ditforge.checksums import check_file, own_checksum_damage, record_file, safetensors_damage, with_own_checksum
from ditforge.errors import CheckpointError
from ditforge.write_failures import failing_write

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


def checkpoint_bytes(state: Any) -> int:
    """The bytes of the tensors in `state` (nested dicts, lists, tuples): what a checkpoint of
    them needs on disk, give or take the headers and state.json."""
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    if isinstance(state, dict):
        state = list(state.values())
    return sum(checkpoint_bytes(s) for s in state) if isinstance(state, (list, tuple)) else 0


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
    projector): NAME.safetensors, NAME_optimizer.safetensors, state.json's extras[NAME].
    A write the storage refuses (full disk, quota) is one `WriteFailed` line naming the folder and
    the bytes it needs; its temporary folder is removed and the checkpoints before stay as they were."""
    final = checkpoint_dir(run_dir, step)
    nbytes = checkpoint_bytes([model_state, ema_state, optimizer_state, extras or {}]) + 64 * 1024  # + RNG, JSON, headers
    tmp = _hidden(final, TMP)
    with failing_write(final, nbytes, [tmp]):
        final.parent.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)  # left by a save that was killed
        tmp.mkdir()
        _write_files(tmp, dict(meta, step=step), model_state, ema_state, optimizer_state, extras or {})
        _install(tmp, final)
    if keep_last > 0:
        for stale in list_checkpoints(run_dir)[:-keep_last]:
            remove_checkpoint(stale)
    return final


def _write_files(tmp: Path, state: dict[str, Any], model_state: dict[str, torch.Tensor], ema_state: dict[str, torch.Tensor],
                 optimizer_state: dict[str, Any], extras: dict[str, tuple[dict[str, torch.Tensor], dict[str, Any]]]) -> None:
    """A checkpoint's files into the empty folder `tmp`, each flushed to disk; `state` (meta and
    step) becomes state.json with the optimizer's structure, the extras' and every file's record."""
    opt_tensors, opt_meta = _flatten_optimizer(optimizer_state)
    save_file({k: v.detach().contiguous().cpu() for k, v in model_state.items()}, tmp / "model.safetensors")
    save_file({k: v.detach().contiguous().cpu() for k, v in ema_state.items()}, tmp / "ema.safetensors")
    save_file(opt_tensors, tmp / "optimizer.safetensors")
    save_file(_rng_state(), tmp / "rng.safetensors")
    state = dict(state, optimizer=opt_meta)
    written = list(FILES)
    for name, (weights, opt_state) in extras.items():
        extra_tensors, extra_meta = _flatten_optimizer(opt_state)
        save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, tmp / f"{name}.safetensors")
        save_file(extra_tensors, tmp / f"{name}_optimizer.safetensors")
        state.setdefault("extras", {})[name] = {"optimizer": extra_meta}
        written += [f"{name}.safetensors", f"{name}_optimizer.safetensors"]
    # each tensor file's size and checksum, read back once from the page cache as it is flushed to
    # disk; state.json carries its own checksum (`dump_state`)
    state["files"] = {name: record_file(tmp / name, fsync=True) for name in written if name != "state.json"}
    (tmp / "state.json").write_text(dump_state(state))
    with open(tmp / "state.json", "rb") as f:
        os.fsync(f.fileno())
    fsync_path(tmp)


def _install(tmp: Path, final: Path) -> None:
    """Rename the written folder `tmp` to `final`. The same step saved again (e.g. the final save
    after a resume at it): at every moment the folder or its `.old` copy is a whole checkpoint of
    this step (tidy_checkpoints recovers it)."""
    old = _hidden(final, OLD)
    if final.exists():
        if old.exists():
            shutil.rmtree(old)  # stale: `final` is the checkpoint
        os.rename(final, old)
    os.rename(tmp, final)
    fsync_path(final.parent)
    if old.exists():
        shutil.rmtree(old)


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
    problems = state_problems(state, required)
    if problems:
        raise CheckpointError(
            f"checkpoint file {str(path)!r} is damaged: {'; '.join(problems)}; delete the folder to fall back to an older one"
        )
    return state


def state_problems(state: Any, required: tuple[str, ...]) -> list[str]:
    """What is wrong with a parsed state.json: the `required` entries (of `STATE_KEYS`) missing or
    of another type, the most telling first, else its own checksum not matching (`state_damage`)."""
    if not isinstance(state, dict):
        return ["it is not a JSON object"]
    problems = [f"{k!r} is missing" for k in required if k not in state]
    problems += [f"{k!r} is not a {STATE_KEYS[k].__name__}" for k in required if k in state and not isinstance(state[k], STATE_KEYS[k])]
    if "data" in required and isinstance(state.get("data"), dict) and not isinstance(state["data"].get("class_names"), list):
        problems.append("'data' has no list 'class_names'")
    if not problems and (damage := state_damage(state)):
        problems = [damage]
    return problems


def read_tensors(path: str | Path, state: dict[str, Any] | None = None) -> dict[str, torch.Tensor]:
    """A safetensors file, with a clear error when it is missing or damaged: with the `state.json`
    of its checkpoint (`state`), also when its size or checksum is not the recorded one."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {str(path)!r} is missing")
    if state is not None and (damage := check_file(path, (state.get("files") or {}).get(path.name))):
        raise CheckpointError(f"checkpoint file {str(path)!r} is corrupt ({damage}); delete its folder to fall back to an older one")
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
    _set_rng_state(read_tensors(ckpt_dir / "rng.safetensors", state))
    if not tensors:
        return {}, {}, {}, state
    model = read_tensors(ckpt_dir / "model.safetensors", state)
    ema = read_tensors(ckpt_dir / "ema.safetensors", state)
    if not {"param_groups", "scalars"} <= set(state["optimizer"]):
        raise CheckpointError(f"checkpoint file {str(ckpt_dir / 'state.json')!r} is damaged: 'optimizer' lacks "
                              "'param_groups' or 'scalars'; delete the folder to fall back to an older one")
    optimizer = _unflatten_optimizer(read_tensors(ckpt_dir / "optimizer.safetensors", state), state["optimizer"])
    return model, ema, optimizer, state


def read_extra_state(ckpt_dir: str | Path, name: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(weights, optimizer state) of the extra module `name` saved by `save_checkpoint(extras=...)`."""
    ckpt_dir = Path(ckpt_dir)
    state = read_state(ckpt_dir)
    meta = state.get("extras", {}).get(name)
    if not isinstance(meta, dict) or not {"param_groups", "scalars"} <= set(meta.get("optimizer", {})):
        raise CheckpointError(f"checkpoint {str(ckpt_dir)!r} holds no {name} state (state.json has no extras.{name}); "
                              "it was written by a run without it: resume with the settings it was trained with")
    weights = read_tensors(ckpt_dir / f"{name}.safetensors", state)
    return weights, _unflatten_optimizer(read_tensors(ckpt_dir / f"{name}_optimizer.safetensors", state), meta["optimizer"])


# -- checksums -------------------------------------------------------------------------------

STATE_CHECKSUM = "state_crc32"  # state.json's own checksum, over its other entries


def dump_state(state: dict[str, Any]) -> str:
    """The text of state.json: `state` and, last, the CRC-32 of the rest (`STATE_CHECKSUM`), so a
    change that leaves valid JSON (a digit of the step, a flipped bit in a name) is seen too."""
    return json.dumps(with_own_checksum(state, STATE_CHECKSUM), indent=2) + "\n"


def state_damage(state: dict[str, Any]) -> str | None:
    """What is wrong with a parsed state.json against its own checksum; None when it matches or
    records none (written before checksums were)."""
    return own_checksum_damage(state, STATE_CHECKSUM)


def checkpoint_problems(ckpt_dir: str | Path) -> list[tuple[Path, str]]:
    """Every file of a checkpoint folder that is not as written, with what is wrong: missing,
    unreadable, size or checksum not the recorded ones (state.json's `files`). A checkpoint
    written before checksums were recorded is checked for its files' presence only."""
    ckpt_dir = Path(ckpt_dir)
    path = ckpt_dir / "state.json"
    try:
        state = json.loads(path.read_text())
        if not isinstance(state, dict):
            raise ValueError("not a JSON object")
    except FileNotFoundError:
        return [(path, "missing")]
    except (ValueError, UnicodeDecodeError) as e:
        return [(path, f"unreadable ({type(e).__name__}: {e})")] + [
            (ckpt_dir / n, "missing") for n in FILES if n != "state.json" and not (ckpt_dir / n).is_file()]
    problems = [(path, "; ".join(found))] if (found := state_problems(state, RESUME_KEYS)) else []
    files = state.get("files") if isinstance(state.get("files"), dict) else {}
    names = list(files) or [n for n in FILES if n != "state.json"]
    for name in names:
        damage = check_file(ckpt_dir / name, files.get(name))
        if damage is None and name not in files:  # no checksum recorded: its layout at least
            damage = safetensors_damage(ckpt_dir / name)
        if damage is not None:
            problems.append((ckpt_dir / name, damage))
    return problems


DAMAGED = ".damaged"  # suffix of a checkpoint folder set aside by a resume: kept, never read or deleted


def set_aside_damaged(run_dir: str | Path) -> list[str]:
    """Check the run's checkpoints newest first (`checkpoint_problems`) until a whole one is found;
    rename each damaged one before it to `step-N.damaged` (kept for inspection; no longer a
    checkpoint, so the resume takes the previous one) and return one line for each. When none is
    whole, nothing is renamed: `CheckpointError` names the newest one's damage. For one process
    (rank 0), after `tidy_checkpoints`."""
    ckpts = list_checkpoints(run_dir)
    damaged = []
    for ckpt in reversed(ckpts):
        problems = checkpoint_problems(ckpt)
        if not problems:
            break
        damaged.append((ckpt, problems))
    if not damaged:
        return []
    if len(damaged) == len(ckpts):
        (path, what), more = damaged[0][1][0], len(damaged[0][1]) - 1
        raise CheckpointError(
            f"every checkpoint of {str(run_dir)!r} is corrupt, the latest in {str(path)!r}: {what}"
            f"{f' (and {more} more files)' if more else ''}; move them aside to start the run afresh")
    good = ckpts[-len(damaged) - 1]
    lines = []
    for ckpt, problems in damaged:
        aside, n = ckpt.with_name(ckpt.name + DAMAGED), 1
        while aside.exists():
            aside, n = ckpt.with_name(f"{ckpt.name}{DAMAGED}.{n}"), n + 1
        os.rename(ckpt, aside)
        (path, what), more = problems[0], len(problems) - 1
        lines.append(f"checkpoint file {str(path)!r} is corrupt: {what}{f' (and {more} more files)' if more else ''}; "
                     f"its folder is set aside as {aside.name} and the run resumes from {good}")
    fsync_path(Path(run_dir) / "checkpoints")
    return lines
