"""MeanFlow (Geng et al. 2025): one-step generation by training on the average velocity of the
flow; the objective (``objective.py``), its sampler (``sampling.py``, ``solvers.py``) and the start
from a trained flow model (``init.py``)."""

from .init import (
    GUIDANCE_PREFIX, INTERVAL_PREFIX, added_embedders, check_flow_source, flow_state_for_meanflow, interval_embedder_state,
    load_flow_weights,
)
from .objective import MeanFlowObjective
from .sampling import DEFAULT_STEPS, MEANFLOW_SAMPLERS, MeanFlowSampler

__all__ = ["MeanFlowObjective", "MeanFlowSampler", "MEANFLOW_SAMPLERS", "DEFAULT_STEPS", "INTERVAL_PREFIX", "GUIDANCE_PREFIX",
           "added_embedders", "check_flow_source", "flow_state_for_meanflow", "interval_embedder_state", "load_flow_weights"]
