"""Flow matching (SiT): interpolant paths, training times, the objective and its ODE / SDE samplers."""

from .objective import PREDICTIONS, FlowObjective
from .paths import PATHS, Path
from .sampling import FLOW_SAMPLERS, FlowSampler
from .timesteps import TIME_DISTRIBUTIONS

__all__ = ["FlowObjective", "FlowSampler", "Path", "PATHS", "PREDICTIONS", "FLOW_SAMPLERS", "TIME_DISTRIBUTIONS"]
