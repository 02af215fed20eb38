"""DiT architectures (Peebles & Xie 2022)."""

from ditforge.models.dit import MODEL_NAMES, DiT, count_parameters, create_model

__all__ = ["DiT", "create_model", "MODEL_NAMES", "count_parameters"]
