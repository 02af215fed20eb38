"""Moved to `ditforge.data.store`; this name stays only while `train/trainer.py` imports it
(`from ditforge.data.latents import LatentStore`): delete it once that import names
`ditforge.data.store`."""

from ditforge.data.store import LatentStore

__all__ = ["LatentStore"]
