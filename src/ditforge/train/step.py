"""One optimizer step of DiT training (either objective: ``objectives.py``), shared by `train` and `bench` so the benchmark times
exactly what training runs.

With REPA (``ditforge/repa``, Yu et al. 2024) the step also takes the model's tokens after block
``cfg.repa.depth`` and adds ``weight * alignment loss`` to the objective's loss; the projector has
its own optimizer (same settings), so a run without REPA builds and steps exactly what it did before.

Holds the model and its wrappers (DDP / FSDP2, torch.compile), the optimizer (AdamW, or SGD:
``make_optimizer``), the fp16 GradScaler and the EMA. A step draws its timesteps, noise and
label-drop flags for the whole global batch from a generator seeded by (seed, step) and takes
this rank's slices, so the result depends neither on the world size nor on the accumulation,
and needs no RNG state to resume. No host sync here.
"""

from __future__ import annotations

import contextlib
from typing import Iterable

import torch
from torch import nn

from ditforge.config import OptimConfig, TrainConfig
from ditforge.models import DiT
from ditforge.objectives import Objective, objective_of_run
from ditforge.repa import Aligner, HiddenTokens
from ditforge.train import distributed
from ditforge.train.device import autocast
from ditforge.train.ema import EMA, ema_decay_at
from ditforge.train.lr_schedule import lr_at, set_lr
from ditforge.train.muon import Muon, muon_groups

#: Per-sample terms an objective may return beside ``loss`` that the log line and TensorBoard show
#: (the flow objective's cosine term of ``--cosine-loss``; MeanFlow's unweighted error ``u_mse``,
#: since its adaptively weighted loss stays near 1 / (C H W)); REPA's alignment term is added as ``repa``.
LOGGED_TERMS = frozenset({"cosine", "u_mse"})


def conditioned(model, drop: torch.Tensor | None):
    """The network as an objective calls it, ``net(x_t, t, labels, **options)``: `model` (wrapped or
    not) with this micro-batch's label drops `drop` (N,) as ``force_drop_ids``, unless the objective
    passes its own (MeanFlow's unconditional velocity); other options (``interval``, ``tangents``)
    pass through to the module's forward, inside the DDP wrapper's forward when there is one."""

    def net(x_t, t, labels, force_drop_ids=drop, **options):
        return model(x_t, t, labels, force_drop_ids=force_drop_ids, **options)

    return net


def step_randomness(cfg: TrainConfig, step: int, shape: tuple[int, ...], objective: Objective, device: torch.device):
    """Times (G,) (MeanFlow: (G, 2)), noise (G, C, H, W) and label-drop flags (G,) of the global batch of `step`."""
    # (meta tensors hold no values: a dry run on the meta device draws without a generator)
    g = torch.Generator(device=device).manual_seed(cfg.seed * 2**32 + step) if device.type != "meta" else None
    n = cfg.global_batch
    t = objective.sample_time(n, g, device)  # (G,): diffusion steps, or flow times in [0, 1]; (G, 2) MeanFlow's (t, r)
    noise = torch.randn((n, *shape), generator=g, device=device)  # (G, C, H, W)
    drop = torch.rand(n, generator=g, device=device) < cfg.model.class_dropout_prob  # (G,)
    return t, noise, drop


def make_optimizer(module: nn.Module | Iterable[nn.Parameter], cfg: OptimConfig, device: torch.device,
                   sharded: bool = False) -> torch.optim.Optimizer:
    """The run's optimizer over `module`'s parameters (or the parameters given): AdamW (decoupled
    weight decay), SGD (plain, or with `momentum`; weight decay added to the gradient), or Muon on
    the blocks' matrices with AdamW on the rest (``train/muon.py``; a module's names pick them,
    given parameters all take AdamW's update). AdamW and SGD fused, one kernel for all parameters that also
    reads the fp16 GradScaler's inf check on the device, on GPU and CPU; not on the meta device (no
    fused kernels), nor SGD over FSDP2's `sharded` parameters (its fused kernel has no DTensor form;
    with fp16 that step reads the inf check on the host). Muon's AdamW part takes the same fused
    kernel (the scaler unscales, and checks on the host, before a Muon step)."""
    if cfg.optimizer == "muon":
        groups = muon_groups(module) if isinstance(module, nn.Module) else [dict(params=list(module))]
        return Muon(groups, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay, fused=device.type != "meta")
    params = module.parameters() if isinstance(module, nn.Module) else module
    fused = device.type != "meta" and not (sharded and cfg.optimizer == "sgd")
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, fused=fused)
    return torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay, fused=fused)


class TrainStep:
    def __init__(self, cfg: TrainConfig, model: DiT, d: distributed.Dist, precision: str, repa: Aligner | None = None,
                 teacher: DiT | None = None):
        self.cfg, self.model, self.d, self.precision = cfg, model, d, precision
        self.fsdp = d.enabled and cfg.parallel == "fsdp"
        model.grad_checkpointing = cfg.grad_checkpoint
        model.to(d.device).train()
        self.ema = EMA(model)
        self.wrapped = distributed.wrap(model, d, cfg.parallel, precision)
        if self.fsdp:
            distributed.wrap(self.ema.module, d, "fsdp")  # shard the EMA alike: each rank averages its shard
        self.opt = make_optimizer(model, cfg.optim, d.device, sharded=self.fsdp)
        self.repa, self.repa_opt, self.terms = repa, None, {}  # terms: 0-d losses logged beside the loss
        if repa is not None:
            # DDP even under FSDP: the projector is small, every rank keeps it whole
            self.repa_wrapped = distributed.wrap(repa.projector.to(d.device).train(), d, "ddp")
            self.repa_opt = make_optimizer(repa.projector, cfg.optim, d.device)
        # what --grad-clip clips with one norm: the model (sharded under FSDP), and REPA's projector (never sharded)
        self.clip_groups = [list(model.parameters())] + ([list(repa.projector.parameters())] if repa is not None else [])
        self.scaler = torch.amp.GradScaler(d.device.type, enabled=precision == "fp16")
        self.objective = objective_of_run(cfg, teacher)  # `teacher`: the frozen network an objective distils, if any
        self.forward_model = torch.compile(self.wrapped) if cfg.compile else self.wrapped
        self.data_shape = (model.in_channels, model.input_size, model.input_size)

    def __call__(self, step: int, batches: list[tuple[torch.Tensor, torch.Tensor]], offsets: list[int]) -> torch.Tensor:
        """Run optimizer step `step` on this rank's micro-batches; return its loss (a 0-d tensor)."""
        cfg, device = self.cfg, self.d.device
        t_all, noise_all, drop_all = step_randomness(cfg, step, self.data_shape, self.objective, device)
        use_drop = cfg.model.class_dropout_prob > 0
        total = torch.zeros((), device=device)
        terms: dict[str, torch.Tensor] = {}  # the objective's LOGGED_TERMS, summed on the device
        self.opt.zero_grad(set_to_none=True)
        if self.repa is not None:
            self.repa_opt.zero_grad(set_to_none=True)
            align_total = torch.zeros((), device=device)
        for i, ((x, y, *extra), off) in enumerate(zip(batches, offsets)):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)  # (b, C, H, W), (b,)
            sl = slice(off, off + x.shape[0])
            drop = drop_all[sl] if use_drop else None

            if self.repa is None:
                forward = conditioned(self.forward_model, drop)
            else:  # the same call, that also keeps the tokens after block `depth`
                forward = HiddenTokens(self.forward_model, self.repa.depth, drop)
            # Reduce gradients once, in the last micro-batch's backward: DDP reads its flag in the
            # forward, FSDP2 in the backward, so the context holds both.
            with self._no_sync(skip=i < len(batches) - 1):
                with autocast(self.precision, device):
                    losses = self.objective.training_losses(forward, x, t_all[sl], y, noise_all[sl], drop=drop)
                    loss = losses["loss"].mean() / len(batches)  # this micro-batch's share of the step loss
                    for name in LOGGED_TERMS.intersection(losses):
                        terms[name] = terms.get(name, 0) + losses[name].detach().mean() / len(batches)
                    if self.repa is not None:
                        target = self.repa.batch_target(x, extra)  # (b, T, E), no gradient
                        align = self.repa.loss(forward.hidden, target, self.repa_wrapped).mean() / len(batches)
                        align_total += align.detach()
                self.scaler.scale(loss if self.repa is None else loss + self.repa.weight * align).backward()
            total += loss.detach()
        optimizers = [self.opt] if self.repa is None else [self.opt, self.repa_opt]
        lr = lr_at(step, cfg.optim.lr, cfg.steps, cfg.optim.lr_schedule, cfg.optim.lr_warmup)
        for opt in optimizers:
            set_lr(opt, lr)
        if cfg.optim.grad_clip > 0:
            for opt in optimizers:
                self.scaler.unscale_(opt)
            distributed.clip_grad_norm(self.clip_groups, cfg.optim.grad_clip)
        for opt in optimizers:
            self.scaler.step(opt)
        self.scaler.update()
        self.terms = terms if self.repa is None else {**terms, "repa": align_total}
        self.ema.update(self.model, ema_decay_at(step, cfg.ema_decay, cfg.ema_warmup))
        return total

    def _no_sync(self, skip: bool):
        """No gradient all-reduce (model, and projector with REPA) in all but the last micro-batch."""
        stack = contextlib.ExitStack()
        stack.enter_context(distributed.no_sync(self.wrapped, self.d, skip))
        if self.repa is not None:
            stack.enter_context(distributed.no_sync(self.repa_wrapped, self.d, skip))
        return stack
