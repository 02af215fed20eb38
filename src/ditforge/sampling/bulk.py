"""Many samples for evaluation: checkpoint -> ADM `.npz` (arr_0 uint8 (N, H, W, 3), labels (N,)).

Samples are cut into shards of `shard_size`; shard k holds samples [k S, (k + 1) S). The
starting noise of sample i comes from its own generator, seeded by (seed, i), and the step noise
of stochastic samplers from one generator per batch, seeded by (seed, first sample of the batch)
(`generate.noise_seed`), so the file does not depend on how many processes made it, and with a
deterministic sampler not on the batch size either (up to the network's rounding). Under
torchrun rank r makes shards k = r, r + W, ...; each shard is written atomically to
`OUT.parts/`, so a killed run resumes without redoing finished shards; rank 0 then streams the
shards into OUT (bounded memory at any N and resolution) and removes the parts.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ditforge.data.sources import to_uint8
from ditforge.diffusion.sampling import DEFAULT_SPACING, SOLVERS
from ditforge.errors import UserError, quiet
from ditforge.folder_lock import FolderLock, output_lock_file
from ditforge.npz import NpzStreamWriter, save_npz_atomic
from ditforge.progress import progress_of
from ditforge.preemption import StopRequest, Stopped
from ditforge.sampling.command import SampleOptions, prepare_sampling
from ditforge.sampling.generate import choose_sampler, sample_batch, start_noise, step_generator
from ditforge.sampling.load import SamplingModel, load_for_sampling
from ditforge.sampling.options import interval_text
from ditforge.train import distributed
from ditforge.write_failures import failing_write


def sample_labels(num_samples: int, num_classes: int, seed: int, balanced: bool) -> torch.Tensor:
    """(N,) class ids: uniform at random from `seed`, or balanced (i mod K)."""
    if balanced:
        return torch.arange(num_samples) % num_classes
    return torch.randint(0, num_classes, (num_samples,), generator=torch.Generator().manual_seed(seed))


def to_hwc_uint8(x: torch.Tensor) -> np.ndarray:
    """(B, C, H, W) in [-1, 1] -> (B, H, W, 3) uint8 with the ADM mapping; grey repeated to RGB."""
    pix = to_uint8(x.float().cpu())
    if pix.shape[1] == 1:
        pix = pix.repeat(1, 3, 1, 1)
    return pix.permute(0, 2, 3, 1).numpy()


#: How the noise follows from the seed (`generate.noise_seed`), recorded with the shards.
NOISE_DERIVATION = "blake2b(seed:index:purpose)"


def _read_settings(meta: Path) -> dict | None:
    try:
        return json.loads(meta.read_text())
    except json.JSONDecodeError:
        return None  # not ours to trust: a file of another tool, or cut short


def claim_parts(parts: Path, settings: dict, d: distributed.Dist) -> None:
    """Rank 0 makes `parts` and records `settings` there, or finds the shards of a run with other
    settings; then every rank raises the same UserError, or none does (`distributed.raise_together`:
    raised on rank 0 alone, the error left the other ranks in the next collective, waiting for the
    process group's timeout or, with gloo on one machine, failing there with an internal-error
    traceback). A collective: every rank calls it; it returns once rank 0 has written the settings."""

    def claim() -> None:
        if not d.is_main:
            return
        meta = parts / "settings.json"
        try:
            parts.mkdir(parents=True, exist_ok=True)
            if meta.exists() and _read_settings(meta) != settings:
                raise UserError(f"{str(parts)!r} holds shards of a different sampling run; delete it or choose another --out")
            tmp = meta.with_name(meta.name + ".tmp")
            tmp.write_text(json.dumps(settings, indent=2) + "\n")
            tmp.replace(meta)  # atomic: a killed run leaves the old settings or the new, never half
        except OSError as e:
            if e.filename is None:  # not about our files: a bug, shown as one
                raise
            raise UserError(str(e)) from None  # names the file and the reason, as the command line shows an OSError

    distributed.raise_together(d, claim)


def sample_to_npz(
    sm: SamplingModel,
    out: str | Path,
    num_samples: int,
    cfg_scale: float = 1.5,
    steps: int = 250,
    sampler: str | None = None,
    seed: int = 0,
    balanced: bool = False,
    batch_size: int = 64,
    shard_size: int = 1024,
    decode: Callable[[torch.Tensor], torch.Tensor] | None = None,
    legacy_three_channel: bool = False,
    progress: bool = True,
    d: distributed.Dist | None = None,
    *,
    spacing: str = DEFAULT_SPACING,
    cfg_interval: tuple[float, float] | None = None,
    precision: str = "fp32",
    model: torch.nn.Module | None = None,
    stop: StopRequest | None = None,
) -> dict:
    """Write `num_samples` samples to `out`; return a summary (rank 0; other ranks: their part).
    `model` is what runs (`sm.model` compiled, say; default `sm.model` itself). Once `stop` has
    heard a signal, this rank stops after the part in flight is written, raising `Stopped`
    (rerunning continues from the parts written, into the same file)."""
    d = d or distributed.Dist(device=next(sm.model.parameters()).device)
    stop_request = stop  # (`stop` below is the end of a part's range)
    sm.model.eval()
    model = sm.model if model is None else model  # a compiled module reads the attributes of sm.model
    if num_samples <= 0:
        raise UserError(f"num-samples must be positive, got {num_samples}")
    if batch_size <= 0 or shard_size <= 0 or shard_size % batch_size:
        raise UserError(f"shard size {shard_size} must be a positive multiple of the batch size {batch_size}")
    chosen = choose_sampler(sm.model, sm.objective, steps, cfg_scale, sampler, spacing, cfg_interval)
    sampler = chosen.name
    out = Path(out)
    parts = out.with_name(out.name + ".parts")
    settings = dict(source=sm.source, num_samples=num_samples, cfg=cfg_scale, steps=steps, sampler=sampler,
                    seed=seed, balanced=balanced, batch_size=batch_size, shard_size=shard_size,
                    legacy_three_channel=legacy_three_channel, precision=precision,
                    noise=NOISE_DERIVATION)  # shards of an older derivation are not resumed into this file
    if sampler in SOLVERS:
        settings["spacing"] = spacing
    if sm.objective.name != "diffusion":
        settings["objective"] = sm.objective.name
    if cfg_interval is not None:
        settings["cfg_interval"] = list(cfg_interval)
    claim_parts(parts, settings, d)

    device = d.device
    labels = sample_labels(num_samples, sm.model.num_classes, seed, balanced)
    num_shards = math.ceil(num_samples / shard_size)
    mine = [k for k in range(d.rank, num_shards, d.world_size)]
    todo = [k for k in mine if not (parts / f"shard-{k:05d}.npz").exists()]
    total = sum(min(shard_size, num_samples - k * shard_size) for k in todo)
    bar = None
    if progress and d.is_main:  # a bar on a terminal, plain lines in a log (progress.py)
        bar = progress_of(total, 0, "sample", batch_size)
    t0 = time.perf_counter()
    shape = (sm.model.in_channels, sm.model.input_size, sm.model.input_size)
    for k in todo:
        start, stop = k * shard_size, min((k + 1) * shard_size, num_samples)
        images = []
        for b0 in range(start, stop, batch_size):
            y = labels[b0 : min(b0 + batch_size, stop)]
            noise = start_noise(seed, range(b0, b0 + y.numel()), shape)  # (B, C, H, W), each sample's own, wherever it runs
            gen = step_generator(seed, b0, device)
            x = sample_batch(model, chosen, y.to(device), noise.to(device), gen, cfg_scale, legacy_three_channel,
                             cfg_interval=cfg_interval, precision=precision)
            if decode is not None:
                x = decode(x)
            images.append(to_hwc_uint8(x))
            if bar is not None:
                bar.update(y.numel())
        save_npz_atomic(parts / f"shard-{k:05d}.npz", images=np.concatenate(images), labels=labels[start:stop].numpy())
        if stop_request is not None and stop_request.requested and k != todo[-1]:
            if bar is not None:
                bar.close()
            written = sum(1 for p in parts.glob("shard-*.npz"))
            error = Stopped(f"stopped by {stop_request.signal_name} after writing {parts / f'shard-{k:05d}.npz'} "
                            f"({written} of {num_shards} parts of {out} are written)", distributed=d.enabled)
            raise error if d.is_main else quiet(error)
    if bar is not None:
        bar.close()
    seconds = time.perf_counter() - t0
    distributed.barrier(d)
    summary = dict(settings, out=str(out), sampled_here=total, seconds=seconds,
                   images_per_s=total / seconds if seconds > 0 else None)
    if not d.is_main:
        return summary

    first = np.load(parts / "shard-00000.npz")["images"]
    nbytes = num_samples * (first[0].nbytes + 8)  # images and labels (a full disk: one line naming OUT, no temporary file)
    with failing_write(out, nbytes), \
            NpzStreamWriter(out, {"arr_0": ((num_samples, *first.shape[1:]), np.uint8), "labels": ((num_samples,), np.int64)}) as w:
        for k in range(num_shards):
            w.write("arr_0", np.load(parts / f"shard-{k:05d}.npz")["images"])
        w.write("labels", labels.numpy())
    shutil.rmtree(parts)
    return summary


@dataclass
class NpzResult:
    summary: dict  # sample_to_npz's: settings, sampled_here, images_per_s
    precision: str
    device: str
    is_main: bool  # rank 0 (the process that reports)

    def line(self) -> str:
        s = self.summary
        return (f"wrote {s['out']}: {s['num_samples']} samples, cfg {s['cfg']:g}, {s['steps']} {s['sampler'].upper()} steps"
                f"{interval_text(s.get('cfg_interval'))}, seed {s['seed']}, {self.precision} on {self.device}; {s['sampled_here']} sampled by this run"
                + (f" at {s['images_per_s']:.1f} images/s" if s["images_per_s"] else ""))


def sample_npz(opts: SampleOptions) -> NpzResult:
    """`opts.num_samples` (default 50,000) samples of `opts.checkpoint` into the ADM .npz `opts.out`,
    shared out over the ranks under torchrun."""
    d = distributed.init()
    # one writer per output (OUT and OUT.parts/, folder_lock.py), before anything is loaded or written
    lock = FolderLock(output_lock_file(opts.out), "ditforge sample", opts.out)
    try:
        distributed.raise_together(d, lock.acquire if d.is_main else lambda: None)
        sm = load_for_sampling(opts.checkpoint, opts.model_name, use_ema=opts.use_ema, objective=opts.objective)
        opts = opts.for_model(sm)
        s = prepare_sampling(sm, opts, d.device)
        n = opts.num_samples if opts.num_samples is not None else 50_000
        with StopRequest() as stop:  # SIGTERM, SIGUSR1, Ctrl-C: the part in flight is finished first (preemption.py)
            summary = sample_to_npz(
                sm, opts.out, n, opts.cfg, opts.steps, opts.sampler, opts.seed,
                opts.balanced, opts.batch_size, opts.shard_size, decode=s.decode,
                legacy_three_channel=opts.legacy_three_channel, d=d, spacing=opts.spacing, cfg_interval=opts.cfg_interval,
                precision=s.precision, model=s.model, stop=stop,
            )
        return NpzResult(summary, s.precision, d.device.type, d.is_main)
    finally:
        lock.release()
        distributed.shutdown()
