"""`--optimizer muon`: Muon on the transformer blocks' weight matrices, AdamW on everything else,
as one optimizer (one state dict, one set of parameter groups for the schedule and the scaler).

Muon (Jordan et al. 2024, "Muon: an optimizer for hidden layers in neural networks",
kellerjordan.github.io/posts/muon) steps a weight matrix W (A x B) by the orthogonalised momentum
of its gradient G:

    M <- mu M + (1 - mu) G                                  (momentum, mu = 0.95)
    D = (1 - mu) G + mu M                                   (Nesterov)
    O = NS5(D) ~ U V^T  where D = U S V^T                   (five quintic Newton-Schulz steps)
    W <- W (1 - lr wd) - lr 0.2 sqrt(max(A, B)) O

The factor 0.2 sqrt(max(A, B)) gives the update the root-mean-square of an AdamW update (Liu et al.
2025, "Muon is scalable for LLM training", arXiv 2502.16982, Sec. 2.2), so --lr means what it means
for AdamW. This is torch.optim.Muon's update with adjust_lr_fn="match_rms_adamw" (tests check it
against torch's), which takes matrices only; the embedders, the final layer, biases and the
normalisation gains take AdamW's update (torch.optim.AdamW's, through its functional form and fused
kernel; also checked), as Muon's authors do.

NS5 runs in bfloat16, as in both references: it only needs the singular vectors, and its
quintic x -> a x + b x^3 + c x^5 (a, b, c) = (3.4445, -4.7750, 2.0315) maps every singular value
of the normalised D into about [0.7, 1.2], not exactly 1 (Jordan et al.).

A matrix must be whole on each rank: under FSDP2 a rank holds a shard, so `--parallel fsdp` is
refused with it (config.py). DDP hands every rank the whole averaged gradient.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import torch
from torch import Tensor, nn
from torch.optim.adamw import adamw

__all__ = ["MOMENTUM", "NS_COEFFICIENTS", "NS_STEPS", "Muon", "muon_groups", "orthogonalise"]

#: Muon's momentum mu and Newton-Schulz iteration (Jordan et al.; torch.optim.Muon's defaults)
MOMENTUM = 0.95
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_STEPS = 5
#: The normalisation's floor (torch.optim.Muon's eps)
NS_EPS = 1e-7


def orthogonalise(d: Tensor, steps: int = NS_STEPS) -> Tensor:
    """(A, B) -> (A, B) in bfloat16: U S' V^T for D = U S V^T, S' in about [0.7, 1.2] (module
    docstring): D / ||D||_F, then `steps` quintic Newton-Schulz iterations on the wide form."""
    a, b, c = NS_COEFFICIENTS
    x = d.bfloat16()
    tall = d.shape[0] > d.shape[1]
    if tall:
        x = x.T  # (B, A): the Gram matrix below is the smaller one
    x = x.div(x.norm().clamp(min=NS_EPS))  # spectral norm <= Frobenius norm = 1
    for _ in range(steps):
        gram = x @ x.T  # (min, min)
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)  # a x + (b X + c X^2) x
    return x.T if tall else x


def muon_groups(model: nn.Module) -> list[dict[str, Any]]:
    """The parameter groups of `model`: the transformer blocks' 2-D weights (``blocks.*``) with
    Muon, all the rest with AdamW."""
    matrices, rest = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (matrices if name.startswith("blocks.") and p.ndim == 2 else rest).append(p)
    return [g for g in (dict(params=matrices, muon=True), dict(params=rest, muon=False)) if g["params"]]


class Muon(torch.optim.Optimizer):
    """Muon on the groups with ``muon=True``, AdamW (decoupled weight decay) on the others; `lr`
    and `weight_decay` shared, `betas` and `eps` AdamW's (module docstring)."""

    def __init__(self, params: Iterable[dict[str, Any]], lr: float, betas: tuple[float, float] = (0.9, 0.999),
                 weight_decay: float = 0.0, eps: float = 1e-8, fused: bool = False):
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay, eps=eps, muon=False))
        self.fused = fused  # the AdamW part in torch's fused kernel (not on the meta device); not in the state dict

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group["muon"]:
                for p in group["params"]:
                    if p.grad is not None:
                        self._muon(p, group)
            else:
                self._adamw(group)
        return loss

    def _muon(self, p: Tensor, group: dict[str, Any]) -> None:
        g, lr = p.grad, float(group["lr"])
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p)
        m = state["momentum_buffer"]
        m.lerp_(g, 1 - MOMENTUM)  # mu M + (1 - mu) G
        o = orthogonalise(g.lerp(m, MOMENTUM))  # (A, B): Nesterov, then NS5
        p.mul_(1 - lr * group["weight_decay"])
        p.add_(o, alpha=-lr * 0.2 * math.sqrt(max(p.shape)))

    def _adamw(self, group: dict[str, Any]) -> None:
        """torch.optim.AdamW's update of the group's parameters that have a gradient, through its
        functional form: fused (one kernel for all of them) where the optimizer was made so,
        otherwise its per-tensor loop. The state is AdamW's (``step``, ``exp_avg``, ``exp_avg_sq``)."""
        params = [p for p in group["params"] if p.grad is not None]
        for p in params:
            state = self.state[p]
            if "step" not in state:
                state["step"] = torch.zeros((), dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
            if self.fused and state["step"].device != p.device:  # the fused kernel reads it on the device
                state["step"] = state["step"].to(p.device)
        states = [self.state[p] for p in params]
        b1, b2 = group["betas"]
        adamw(params, [p.grad for p in params], [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states], [],
              [s["step"] for s in states], foreach=False if self.fused else None, fused=self.fused, amsgrad=False, beta1=b1, beta2=b2,
              lr=float(group["lr"]), weight_decay=group["weight_decay"], eps=group["eps"], maximize=False)
