"""REPA's projector and alignment loss (Yu et al. 2024, "Representation Alignment for Generation:
Training Diffusion Transformers Is Easier Than You Think", arXiv 2410.06940, Sec. 3.2, eq. 8).

The tokens h_t (N, T, D) after an early block of the diffusion transformer pass through a small
MLP h_phi, and each projected token is pulled towards the frozen encoder's feature y* (N, T, E)
of the same patch of the clean image:

    L_REPA = - E [ 1/T sum_n sim(y*_n, h_phi(h_t,n)) ],   sim = cosine similarity

added to the denoising (or flow) loss with weight lambda (0.5 in the paper).

    paper        here
    h_t          hidden (N, T, D), the tokens after block `depth`
    h_phi        Projector: D -> P -> P -> E, SiLU between (P = projector_dim, 2048 in REPA)
    y*           target (N, T, E), encoder patch features on the model's token grid
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["Projector", "alignment_loss"]


class Projector(nn.Sequential):
    """h_phi: three linear layers with SiLU between them, as REPA's ``build_mlp``."""

    def __init__(self, hidden_size: int, projector_dim: int, encoder_dim: int):
        super().__init__(
            nn.Linear(hidden_size, projector_dim),
            nn.SiLU(),
            nn.Linear(projector_dim, projector_dim),
            nn.SiLU(),
            nn.Linear(projector_dim, encoder_dim),
        )
        self.initialize_weights()

    @torch.no_grad()
    def initialize_weights(self) -> None:
        """xavier-uniform weights, zero biases: REPA initialises its projectors with the rest of SiT."""
        for m in self:
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)


def alignment_loss(projected: Tensor, target: Tensor) -> Tensor:
    """Per-sample -1/T sum_n cos(y*_n, h_phi(h)_n) (N,), from projected (N, T, E) and target (N, T, E).

    Normalised in float32: under fp16 autocast the norms overflow (a known NaN of the REPA code)."""
    if projected.shape != target.shape:
        raise ValueError(f"projected tokens {tuple(projected.shape)} and encoder features {tuple(target.shape)} differ in shape")
    p = F.normalize(projected.float(), dim=-1)  # (N, T, E)
    z = F.normalize(target.float(), dim=-1)  # (N, T, E)
    return -(p * z).sum(dim=-1).mean(dim=1)  # (N,)
