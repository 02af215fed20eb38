"""Representation alignment (REPA, Yu et al. 2024, arXiv 2410.06940): a regulariser that aligns an
early block's tokens, through a small MLP, with a frozen self-supervised encoder's patch features.

``encoders.py`` loads the frozen encoder, ``projector.py`` holds the MLP and the loss,
``aligner.py`` ties them to a training run (``train/step.py`` calls it).
"""

from ditforge.repa.aligner import Aligner, FeatureSource, HiddenTokens, build_aligner
from ditforge.repa.encoders import DINOV2_B, FrozenEncoder, check_encoder_spec, load_encoder
from ditforge.repa.projector import Projector, alignment_loss

__all__ = [
    "Aligner", "FeatureSource", "HiddenTokens", "build_aligner", "DINOV2_B", "FrozenEncoder", "check_encoder_spec",
    "load_encoder", "Projector", "alignment_loss",
]
