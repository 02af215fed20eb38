"""Noise schedules and timestep respacing.

A noise schedule is the sequence of per-step variances ``beta_t`` of the
forward process ``q(x_t | x_{t-1}) = N(sqrt(1 - beta_t) x_{t-1}, beta_t I)``
(Ho et al. 2020, eq. 2). Timesteps are 0-indexed as in the ADM code: step
``t`` in ``0..T-1`` uses ``betas[t]`` and ``alpha_bar[t] = prod_{s<=t} (1 - betas[s])``.

Respacing (Nichol & Dhariwal 2021, sec. 4) keeps a subset ``S`` of the original
steps and builds a shorter chain with the same marginals ``alpha_bar[t]`` at
every kept ``t``, so a model trained on all ``T`` steps can be sampled in ``|S|``.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["beta_schedule", "space_timesteps", "respace_betas", "cosine_alpha_bar"]

#: Largest beta the cosine schedule may produce (Nichol & Dhariwal 2021, sec. 3.2):
#: keeps the last steps from being singular near t = T.
MAX_BETA = 0.999

#: Small offset ``s`` of the cosine schedule (Nichol & Dhariwal 2021, eq. 17).
COSINE_OFFSET = 0.008

_SCHEDULES = ("linear", "cosine")


def cosine_alpha_bar(t: float | np.ndarray) -> float | np.ndarray:
    """Unnormalised ``f(t) = cos(((t + s) / (1 + s)) * pi / 2)^2`` for ``t`` in [0, 1].

    Nichol & Dhariwal 2021, eq. 17: ``alpha_bar(t) = f(t) / f(0)``. Only ratios of
    ``f`` are used below, so the normalisation by ``f(0)`` cancels.
    """
    return np.cos((t + COSINE_OFFSET) / (1.0 + COSINE_OFFSET) * math.pi / 2) ** 2


#: The fewest steps the linear schedule has: its last beta is 0.02 x 1000 / T, at most 1.
MIN_LINEAR_STEPS = 20


def beta_schedule(name: str, num_timesteps: int) -> np.ndarray:
    """Betas of a named schedule, float64, shape ``(num_timesteps,)``.

    * ``"linear"``: Ho et al. 2020's 1e-4 .. 0.02 for T = 1000, rescaled by
      ``1000 / T`` for other T so the total noise stays comparable (ADM).
    * ``"cosine"``: Nichol & Dhariwal 2021, eq. 17, with
      ``beta_t = min(1 - alpha_bar(t+1) / alpha_bar(t), 0.999)``.
    """
    if not isinstance(num_timesteps, (int, np.integer)) or num_timesteps < 1:
        raise ValueError(f"num_timesteps must be a positive integer, got {num_timesteps!r}")
    T = int(num_timesteps)
    if name == "linear":
        scale = 1000.0 / T
        return np.linspace(scale * 1e-4, scale * 0.02, T, dtype=np.float64)
    if name == "cosine":
        steps = np.arange(T, dtype=np.float64)
        f_t = cosine_alpha_bar(steps / T)  # f(t / T), (T,)
        f_next = cosine_alpha_bar((steps + 1) / T)  # f((t + 1) / T), (T,)
        return np.minimum(1.0 - f_next / f_t, MAX_BETA)
    raise ValueError(f"unknown noise schedule {name!r}; expected one of {', '.join(map(repr, _SCHEDULES))}")


def _parse_count(text: str, spacing: str) -> int:
    try:
        count = int(text)
    except ValueError:
        raise ValueError(
            f"bad timestep respacing {spacing!r}: {text!r} is not an integer; expected e.g. "
            "'250', '10,15,20' or 'ddim50'"
        ) from None
    if count < 1:
        raise ValueError(f"bad timestep respacing {spacing!r}: step counts must be >= 1, got {count}")
    return count


def space_timesteps(num_timesteps: int, spacing: str | None) -> list[int]:
    """Which of the original ``num_timesteps`` steps to keep, sorted ascending.

    ``spacing`` follows ADM's convention:

    * ``""`` or ``None``: keep every step.
    * ``"250"``: 250 steps, evenly strided from 0 to ``num_timesteps - 1``.
    * ``"10,15,20"``: split the chain into 3 equal sections and take 10, 15 and
      20 evenly strided steps from each (first and last step of each section
      included when the count is > 1).
    * ``"ddimN"``: an integer stride ``k`` such that ``range(0, T, k)`` has
      exactly N steps (the DDIM paper's uniform spacing); error if none exists.
    """
    if not isinstance(num_timesteps, (int, np.integer)) or num_timesteps < 1:
        raise ValueError(f"num_timesteps must be a positive integer, got {num_timesteps!r}")
    T = int(num_timesteps)
    if spacing is None or spacing.strip() == "":
        return list(range(T))
    spacing = spacing.strip()

    if spacing.startswith("ddim"):
        desired = _parse_count(spacing[len("ddim"):], spacing)
        for stride in range(1, T + 1):
            if len(range(0, T, stride)) == desired:
                return list(range(0, T, stride))
        raise ValueError(
            f"bad timestep respacing {spacing!r}: no integer stride gives exactly {desired} "
            f"steps out of {T}; pick a count of the form ceil({T} / k), e.g. 'ddim50' for T=1000"
        )

    counts = [_parse_count(part.strip(), spacing) for part in spacing.split(",")]
    if len(counts) > T:
        raise ValueError(
            f"bad timestep respacing {spacing!r}: {len(counts)} sections for only {T} timesteps"
        )
    size_per, extra = divmod(T, len(counts))
    start = 0
    kept: list[int] = []
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)  # the first `extra` sections get one more step
        if count > size:
            raise ValueError(
                f"bad timestep respacing {spacing!r}: section {i} has {size} timesteps but "
                f"{count} were requested; use at most {size}"
            )
        stride = 1.0 if count <= 1 else (size - 1) / (count - 1)
        # round() of the fractional position, as ADM does, so both section ends are kept
        kept.extend(start + round(j * stride) for j in range(count))
        start += size
    return sorted(set(kept))


def respace_betas(betas: np.ndarray, use_timesteps: list[int]) -> np.ndarray:
    """Betas of the shortened chain that visits only ``use_timesteps``.

    With ``alpha_bar`` the cumulative product of the original ``1 - betas``,
    the new chain's i-th step goes from kept step ``t_{i-1}`` to ``t_i``:

        beta'_i = 1 - alpha_bar[t_i] / alpha_bar[t_{i-1}],   alpha_bar[t_{-1}] := 1,

    so that ``prod_{j<=i} (1 - beta'_j) = alpha_bar[t_i]``: the respaced chain has
    the original marginals ``q(x_{t_i} | x_0)`` (Nichol & Dhariwal 2021, sec. 4).
    """
    betas = np.asarray(betas, dtype=np.float64)
    if betas.ndim != 1:
        raise ValueError(f"betas must be 1-D, got shape {betas.shape}")
    steps = sorted(set(int(t) for t in use_timesteps))
    if not steps:
        raise ValueError("use_timesteps is empty; keep at least one timestep")
    if steps[0] < 0 or steps[-1] >= len(betas):
        raise ValueError(
            f"use_timesteps must lie in [0, {len(betas) - 1}], got range [{steps[0]}, {steps[-1]}]"
        )
    alphas_cumprod = np.cumprod(1.0 - betas)  # alpha_bar, (T,)
    kept = alphas_cumprod[steps]  # alpha_bar[t_i], (S,)
    prev = np.concatenate([[1.0], kept[:-1]])  # alpha_bar[t_{i-1}], (S,)
    return 1.0 - kept / prev
