"""A MeanFlow model from a trained flow model: the flow weights, and the interval embedder at zero.

A MeanFlow DiT is a flow DiT plus ``h_embedder``, the embedder of the interval h = t - r
(``models/dit.py``). With that embedder's output layer at zero it adds nothing to the
conditioning for any h, so the MeanFlow network equals the flow network it is built from, at
every (r, t): a fine-tune (``train --objective meanflow --init-from FLOW_RUN``) starts from the
flow model's samples, the average velocity over any interval read as the instantaneous one.

An iMF model (the guidance scale as an input, ``--train-cfg-max``) also has ``w_embedder``, which
starts the same way, from a flow model or from a MeanFlow model without it (`added_embedders`).

What fits (`check_flow_source`): a flow model on the linear path that predicts the velocity, the
parameterisation MeanFlow's network shares (``objective.py``: F = -u, at h = 0 the flow's output).
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor, nn

from ditforge.errors import UserError

__all__ = ["FINETUNE_FLOW_SHARE", "DISTIL_TIME_STD", "DISTIL_WEIGHT_P", "DISTIL_OPTIMIZER", "DISTIL_MAX_LR", "INTERVAL_PREFIX", "GUIDANCE_PREFIX", "interval_keys",
           "interval_embedder_state", "added_embedders", "flow_state_for_meanflow", "load_flow_weights", "check_flow_source"]

#: The share of each batch at r = t for a fine-tune from a model that is not MeanFlow's, unless
#: --mf-flow-share is given (cli.py `_finetune_flow_share`): its instantaneous velocity is learned,
#: the intervals are not. Measured on the digits from the demo's flow run, 200 steps (README,
#: "MeanFlow against 20-step flow"): 1-evaluation distance 1.15 at 0.75, 0.85 at 0.25.
FINETUNE_FLOW_SHARE = 0.25
#: The logit-normal std of both times, and the adaptive weight's power, of a distillation of a flow
#: model (--mf-velocity teacher: unguided, with --train-cfg or with --train-cfg-max), unless given
#: (cli.py `_distillation_settings`): the teacher's target has no sample noise to discount, so the
#: plain squared error (p = 0) keeps the long intervals' large errors in the loss, and a wider
#: logit-normal draws more of them (t near 1 with r near 0, the one-step jump). Measured on the
#: digits, 200 steps from the demo's flow run (benchmarks/README, "Training seeds"): 1-evaluation
#: distance 0.93 at the paper's (1.0, 1), 0.64 at (2.2, 0), each the mean of four training seeds
#: (the flow model's 20 steps: 0.50). They serve the one jump: on MNIST (two seeds) 1 evaluation
#: 10.3 -> 9.3, but 2 evaluations 7.6 -> 8.7 (README, "Measured", MeanFlow). Guided at --train-cfg
#: 1.5 (with Muon at 1e-3, below; sampling seeds 0 and 1; benchmarks/README, "Guided distillation
#: with the unguided settings"): on MNIST 1 evaluation 8.58 at the paper's -> 7.46 (1.45x -> 1.26x
#: of the flow model's 20 steps at cfg 1.5; three training seeds against one), 2 evaluations 6.32 ->
#: 6.71; on the digits 0.91 (one training seed) -> 1.04 (two) and 1.07 -> 1.14 against the flow
#: model's 1.12, inside both goals either way. Until 2026-12-07 a guided distillation kept the paper's settings and AdamW.
#: With the scale as an input (--train-cfg-max 3, Muon at 1e-3 against AdamW at 1e-3 with the
#: paper's; the digits, two training seeds; benchmarks/README, "The scale as an input"): 1
#: evaluation at cfg 1 1.70x -> 1.27x of the flow model's 20 steps at that scale, at cfg 1.5 0.88x
#: -> 0.90x; 2 evaluations at cfg 1 1.16x -> 1.25x, at cfg 1.5 0.96x -> 1.03x: the one jump at
#: every scale is what these serve.
DISTIL_TIME_STD = 2.2
DISTIL_WEIGHT_P = 0.0
#: The optimizer of a distillation unless --optimizer is given (cli.py
#: `_distillation_settings`; AdamW under --parallel fsdp, which Muon does not fit): Muon
#: (``train/muon.py``) learns the teacher's one-step map in fewer steps. From the demo's flow run,
#: 200 steps, four training seeds x two sampling seeds (benchmarks/README, "Muon for the
#: distillation"): 1 evaluation 1.134x the teacher's 20-step distance with Muon at 1e-3, 1.26x with
#: AdamW at its best rate (2e-4); 2 evaluations 1.039x and 1.047x. On MNIST (training seed 0,
#: sampling seeds 0 and 1) Muon at 1e-3 read 8.78 and 7.82, AdamW at 2e-4 8.71 and 7.79 (two
#: training seeds, sampling seed 0). A step costs 1.12x AdamW's at DiT-Ti/2 on a CPU, 1.05x at
#: DiT-Ti/4 on MNIST (its Newton-Schulz steps: a fixed cost a step, less for larger batches).
#: Guided on the digits, with the paper's time settings, Muon read 0.91 at 1 evaluation, AdamW 0.85
#: (both inside the goal, the flow model's 1.12); on MNIST, with (2.2, 0), see above.
DISTIL_OPTIMIZER = "muon"
#: The highest learning rate a distillation takes with each optimizer unless --lr is
#: given (cli.py `_distillation_settings`; a lower preset rate, the paper's 1e-4, stays, and the
#: device's choice, train/auto.py's 2e-3 on a CPU, does not raise it).
#: AdamW (and SGD): 2e-4. From the demo's flow run, 200 steps with the tiny preset's 1e-3 and with
#: 2e-4 read the same at 1 evaluation on the digits (0.64 and 0.64, four training seeds each), and
#: 2e-4 read better at 2 (0.527 -> 0.511, 1.05x -> 1.02x of the flow model's 20 steps); on MNIST
#: (two seeds) 2e-4 read better at both than the 2e-3 that train took there, 1.36x -> 1.27x and
#: 1.27x -> 1.13x (benchmarks/README, "Learning rate and length").
#: Muon: 1e-3. On the digits (1 evaluation) 2e-4 read 0.651, 5e-4 0.587 (two seeds), 1e-3 0.572
#: (four), 2e-3 0.589; on MNIST (training seed 0) 2e-3 9.16, 1e-3 8.78, 5e-4 8.52 (5e-4 over two
#: seeds 8.58): the digits' goal decides (benchmarks/README, "Muon for the distillation").
#: Guided at cfg 1.5 on MNIST, Muon at 5e-4 read 7.57 at 1 evaluation against 7.33 at 1e-3 (training
#: seed 0 each); on the
#: digits AdamW's one jump read 0.85 at 1e-3 and 1.00 at 2e-4 (the cap binds where AdamW runs: under
#: --parallel fsdp, or with --optimizer adamw).
DISTIL_MAX_LR = {"adamw": 2e-4, "sgd": 2e-4, "muon": 1e-3}
#: State-dict prefix of the interval embedder: its keys are the only ones a flow model lacks.
INTERVAL_PREFIX = "h_embedder."
#: State-dict prefix of iMF's guidance-scale embedder (a MeanFlow model trained with --train-cfg-max).
GUIDANCE_PREFIX = "w_embedder."
#: The embedders a model may have that the model it starts from lacks; each one's output layer
#: ("mlp.2.") zero, so that it contributes 0 (DiT.initialize_weights).
_ADDED = (INTERVAL_PREFIX, GUIDANCE_PREFIX)
_OUTPUT_LAYER = "mlp.2."


def _started_at_zero(state: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """The tensors of the embedder at `prefix` in `state`, its output layer zero."""
    return {k: torch.zeros_like(v) if k.startswith(prefix + _OUTPUT_LAYER) else v.detach().clone()
            for k, v in state.items() if k.startswith(prefix)}


def added_embedders(target: Mapping[str, Tensor], source: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The embedders (interval, guidance scale) that the `target` state dict has and the `source`
    lacks, as `target` holds them but with their output layers zero: what a model started from
    `source` takes so that it computes what `source` did."""
    out: dict[str, Tensor] = {}
    for prefix in _ADDED:
        if any(k.startswith(prefix) for k in target) and not any(k.startswith(prefix) for k in source):
            out.update(_started_at_zero(target, prefix))
    return out


def interval_keys(state: Mapping[str, Tensor]) -> list[str]:
    """The interval embedder's keys in a state dict (empty for a one-time DiT)."""
    return [k for k in state if k.startswith(INTERVAL_PREFIX)]


def interval_embedder_state(target: nn.Module | Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The interval embedder's tensors for a MeanFlow model that starts from a flow model: its first
    layer as `target` (a MeanFlow DiT or its state dict) holds it (its own initialisation), its output
    layer zero, so that it adds 0 for every h. UserError if `target` has no interval embedder."""
    state = target.state_dict() if isinstance(target, nn.Module) else target
    if not interval_keys(state):
        raise UserError("the model has no interval embedder (build it with interval_embedding=True) to add to the flow weights")
    return _started_at_zero(state, INTERVAL_PREFIX)


def check_flow_source(flow_config: Mapping) -> None:
    """UserError unless a flow objective's settings (TrainConfig's ``flow`` section) are the ones a
    MeanFlow network continues: the linear path, velocity prediction."""
    path, prediction = flow_config.get("path", "linear"), flow_config.get("prediction", "velocity")
    if (path, prediction) != ("linear", "velocity"):
        raise UserError(f"a MeanFlow model starts from a flow model on the linear path that predicts the velocity; "
                        f"this one has path {path!r}, prediction {prediction!r}")


def flow_state_for_meanflow(flow_state: Mapping[str, Tensor], model: nn.Module | Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The full state dict of the MeanFlow `model` (a DiT with ``interval_embedding``, or its state
    dict) from a flow model's `flow_state`: every tensor from `flow_state` (same keys, same shapes,
    cast to the model's dtypes), except the interval embedder's, which the flow model lacks
    (`interval_embedder_state`: the model's own first layer, the output layer zero). Loads with
    ``strict=True``; any key missing or extra beyond the interval embedder's, or of another
    shape, is a one-line UserError."""
    target = model.state_dict() if isinstance(model, nn.Module) else dict(model)
    interval_embedder_state(target)  # UserError without one
    interval = added_embedders(target, flow_state)  # the interval embedder (and an iMF model's guidance one)
    own = list(interval)
    if interval_keys(flow_state):
        raise UserError("the source already has an interval embedder (h_embedder.*): it is a MeanFlow model, not a flow "
                        "model; load it as it is")
    mine, theirs = set(target) - set(own), set(flow_state)
    for key in sorted(mine - theirs):
        raise UserError(f"{key}: in the MeanFlow model but not in the flow weights; they need the same network")
    for key in sorted(theirs - mine):
        raise UserError(f"{key}: in the flow weights but not in the MeanFlow model; they need the same network")
    out = {}
    for key, value in target.items():
        if key in interval:
            out[key] = interval[key]
            continue
        source = flow_state[key]
        if tuple(source.shape) != tuple(value.shape):
            raise UserError(f"{key}: flow weights {tuple(source.shape)} vs MeanFlow model {tuple(value.shape)}; they need "
                            "the same network")
        out[key] = source.detach().to(dtype=value.dtype, device=value.device).clone()
    return out


def load_flow_weights(model: nn.Module, flow_state: Mapping[str, Tensor]) -> None:
    """Load a flow model's weights into the MeanFlow `model`, the interval embedder at zero
    (`flow_state_for_meanflow`, then ``load_state_dict(strict=True)``)."""
    model.load_state_dict(flow_state_for_meanflow(flow_state, model), strict=True)
