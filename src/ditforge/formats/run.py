"""ditforge's own run and checkpoint folders, read as `ModelWeights`.

A run folder holds `checkpoints/step-NNNNNNN/`; each checkpoint folder holds `state.json` (the
config, the model's arguments, the data's class names, the autoencoder) beside the raw and EMA
weights (`train/checkpoint.py` writes them).
"""

from __future__ import annotations

from pathlib import Path

from ditforge.errors import CheckpointError
from ditforge.formats.weights import ModelWeights
from ditforge.train.checkpoint import SAMPLING_KEYS, latest_checkpoint, read_state, read_tensors


def resolve_checkpoint(path: str | Path) -> Path:
    """A run folder -> its latest checkpoint folder; a checkpoint folder or a file -> itself."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist; give a run folder, a checkpoint folder or a .pt file")
    if path.is_dir() and not (path / "state.json").exists():
        latest = latest_checkpoint(path)
        if latest is None:
            raise CheckpointError(f"run folder {str(path)!r} has no checkpoints (expected {str(path)}/checkpoints/step-*/)")
        return latest
    return path


def is_checkpoint_folder(path: Path) -> bool:
    return path.is_dir() and (path / "state.json").exists()


def read_checkpoint(ckpt: Path, use_ema: bool = True) -> ModelWeights:
    """The EMA (or raw) weights of a checkpoint folder, with what its state.json records."""
    state = read_state(ckpt, SAMPLING_KEYS)
    try:
        args, config, names = state["model_args"], state["config"], state["data"]["class_names"]
        if not isinstance(args, dict) or "name" not in args:
            raise KeyError("model_args.name")
    except (KeyError, TypeError) as e:
        raise CheckpointError(f"checkpoint {str(ckpt)!r} has an unreadable state.json ({type(e).__name__}: {e})") from None
    weights = ckpt / ("ema.safetensors" if use_ema else "model.safetensors")
    return ModelWeights(
        model_args=args,
        state_dict=read_tensors(weights, state),  # checked against its recorded size and checksum
        class_names=list(names),
        objective_config=config,
        autoencoder=state.get("autoencoder", {"kind": "identity"}),
        source=str(weights),
        step=state["step"],
    )
