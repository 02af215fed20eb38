"""Fast ODE solvers for diffusion-objective models, each a pure function of a denoise function.

    solver(schedule: VPSchedule, denoise, noise, steps, *, spacing, progress) -> x_0

``denoise(x_s, t_model)`` is the (guided) model, as for the DDPM / DDIM loops; ``steps`` is the
number of model evaluations. The SDE solver also takes ``generator``, for its noise. ``diffusion/sampling.py`` picks a solver by name.
"""

from .dpm_solver import dpm_solver_pp_2m, dpm_solver_pp_2m_sde
from .unipc import unipc
from .vp_schedule import SPACINGS, VPSchedule

__all__ = ["dpm_solver_pp_2m", "dpm_solver_pp_2m_sde", "unipc", "VPSchedule", "SPACINGS"]
