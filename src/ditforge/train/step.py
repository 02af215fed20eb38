"""One optimizer step of DiT training (either objective: ``objectives.py``), shared by `train` and `bench` so the benchmark times
exactly what training runs.

Holds the model and its wrappers (DDP / FSDP2, torch.compile), AdamW, the fp16 GradScaler and
the EMA. A step draws its timesteps, noise and label-drop flags for the whole global batch from
a generator seeded by (seed, step) and takes this rank's slices, so the result depends neither
on the world size nor on the accumulation, and needs no RNG state to resume. No host sync here.
"""

from __future__ import annotations

import torch

from ditforge.config import TrainConfig
from ditforge.models import DiT
from ditforge.objectives import Objective, objective_of_run
from ditforge.train import distributed
from ditforge.train.device import autocast
from ditforge.train.ema import EMA, ema_decay_at


def step_randomness(cfg: TrainConfig, step: int, shape: tuple[int, ...], objective: Objective, device: torch.device):
    """Times (G,), noise (G, C, H, W) and label-drop flags (G,) of the global batch of `step`."""
    # (meta tensors hold no values: a dry run on the meta device draws without a generator)
    g = torch.Generator(device=device).manual_seed(cfg.seed * 2**32 + step) if device.type != "meta" else None
    n = cfg.global_batch
    t = objective.sample_time(n, g, device)  # (G,): diffusion steps, or flow times in [0, 1]
    noise = torch.randn((n, *shape), generator=g, device=device)  # (G, C, H, W)
    drop = torch.rand(n, generator=g, device=device) < cfg.model.class_dropout_prob  # (G,)
    return t, noise, drop


class TrainStep:
    def __init__(self, cfg: TrainConfig, model: DiT, d: distributed.Dist, precision: str):
        self.cfg, self.model, self.d, self.precision = cfg, model, d, precision
        self.fsdp = d.enabled and cfg.parallel == "fsdp"
        model.grad_checkpointing = cfg.grad_checkpoint
        model.to(d.device).train()
        self.ema = EMA(model)
        self.wrapped = distributed.wrap(model, d, cfg.parallel, precision)
        if self.fsdp:
            distributed.wrap(self.ema.module, d, "fsdp")  # shard the EMA alike: each rank averages its shard
        self.opt = torch.optim.AdamW(
            model.parameters(),
            lr=cfg.optim.lr,
            betas=cfg.optim.betas,
            weight_decay=cfg.optim.weight_decay,
            fused=d.device.type != "meta",  # one kernel for all parameters, on GPU and CPU
        )
        self.scaler = torch.amp.GradScaler(d.device.type, enabled=precision == "fp16")
        self.objective = objective_of_run(cfg)
        self.forward_model = torch.compile(self.wrapped) if cfg.compile else self.wrapped
        self.data_shape = (model.in_channels, model.input_size, model.input_size)

    def __call__(self, step: int, batches: list[tuple[torch.Tensor, torch.Tensor]], offsets: list[int]) -> torch.Tensor:
        """Run optimizer step `step` on this rank's micro-batches; return its loss (a 0-d tensor)."""
        cfg, device = self.cfg, self.d.device
        t_all, noise_all, drop_all = step_randomness(cfg, step, self.data_shape, self.objective, device)
        use_drop = cfg.model.class_dropout_prob > 0
        total = torch.zeros((), device=device)
        self.opt.zero_grad(set_to_none=True)
        for i, ((x, y), off) in enumerate(zip(batches, offsets)):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)  # (b, C, H, W), (b,)
            sl = slice(off, off + x.shape[0])
            drop = drop_all[sl] if use_drop else None

            def forward(x_t, t, labels, drop=drop):
                return self.forward_model(x_t, t, labels, force_drop_ids=drop)

            # Reduce gradients once, in the last micro-batch's backward: DDP reads its flag in the
            # forward, FSDP2 in the backward, so the context holds both.
            with distributed.no_sync(self.wrapped, self.d, skip=i < len(batches) - 1):
                with autocast(self.precision, device):
                    losses = self.objective.training_losses(forward, x, t_all[sl], y, noise_all[sl])
                    loss = losses["loss"].mean() / len(batches)  # this micro-batch's share of the step loss
                self.scaler.scale(loss).backward()
            total += loss.detach()
        if cfg.optim.grad_clip > 0:
            self.scaler.unscale_(self.opt)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.optim.grad_clip)
        self.scaler.step(self.opt)
        self.scaler.update()
        self.ema.update(self.model, ema_decay_at(step, cfg.ema_decay, cfg.ema_warmup))
        return total
