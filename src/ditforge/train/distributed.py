"""torchrun environment, process group, DDP / FSDP2 wrapping and rank-0 helpers.

The only module that reads the torchrun environment (RANK, LOCAL_RANK, WORLD_SIZE). One process
without torchrun is world size 1 and needs no process group. The device of a process is
`cuda:LOCAL_RANK` (never the global rank, which breaks on the second machine of a multi-node
run); on CPU the gloo backend runs the same code, which is how the tests check it.
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from ditforge.errors import NonFiniteLossError, UserError, on_every_rank, raised_on_every_rank

T = TypeVar("T")

STRATEGIES = ("ddp", "fsdp")


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise UserError(f"environment variable {name}={value!r} is not an integer (set by torchrun)") from None


def local_device() -> torch.device:
    """This process's device: `cuda:LOCAL_RANK` when GPUs are visible, else the CPU. Always indexed,
    since `torch.cuda.set_device` refuses a bare `cuda`. A launch with more processes on a node
    than GPUs visible is the user's to fix, so it is one line naming both numbers."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    local_rank = _env_int("LOCAL_RANK", 0)
    per_node = _env_int("LOCAL_WORLD_SIZE", local_rank + 1)
    visible = torch.cuda.device_count()
    if max(per_node, local_rank + 1) > visible:
        raise UserError(
            f"{max(per_node, local_rank + 1)} processes on this node (torchrun --nproc_per_node) but only {visible} "
            f"GPU(s) visible; use --nproc_per_node {visible} or fewer, or check CUDA_VISIBLE_DEVICES"
        )
    return torch.device("cuda", local_rank)


def init() -> Dist:
    """Join the process group when launched by torchrun; select this process's device."""
    world = _env_int("WORLD_SIZE", 1)
    rank, local_rank = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    device = local_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, device_id=device if device.type == "cuda" else None,
                                **_restarted_group_store(rank, world))
    return Dist(rank, local_rank, world, device)


def _restarted_group_store(rank: int, world: int) -> dict:
    """The store of a worker group that `torchrun --max-restarts` restarted, under a prefix of its
    own: the workers reach the agent's store, which outlives a group, so without one a restarted
    rank could read the gloo address of the rank it replaces (connectFullMesh then fails with
    "Connection refused" and burns a restart; seen at the first restart of both restarted runs
    tried here, 2 gloo processes, torch 2.13). Nothing for a
    first start: torch's own env:// rendezvous."""
    restart = _env_int("TORCHELASTIC_RESTART_COUNT", 0)
    if restart == 0:
        return {}
    from torch.distributed.rendezvous import rendezvous

    store, _, _ = next(rendezvous("env://", rank, world))
    return dict(store=dist.PrefixStore(f"ditforge/restart-{restart}", store), rank=rank, world_size=world)


#: Whether this process has led a process group (set by `shutdown`); see `end_process`.
_led_a_group = False


def shutdown() -> None:
    global _led_a_group
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
        _led_a_group = True


def end_process(code: int) -> int:
    """Exit with `code` at the end of a command, past Python's finalization, when this process led
    a process group; else return `code`. `destroy_process_group` does not free a gloo group that
    DDP or FSDP2 used (a weak reference to it stays alive after it and `gc.collect()`, torch 2.13;
    under FSDP2 the device mesh that holds it stays in DTensor's sharding caches), so the group
    and its worker threads were torn down in the interpreter's finalization.
    There a rank aborted after the whole run had succeeded: "terminate called without an active
    exception", SIGABRT, no Python frame on its stack (once in 280 FSDP runs of
    `tests/test_distributed.py`'s command here, 2026-12-07, after `leave`'s barrier and wait; the
    aborts with that message that `leave` names were likely the same). Every rank has left the
    group (`leave`) and every file written is closed, so nothing is lost: the logging handlers,
    stdout and stderr are flushed, then `os._exit`."""
    if not _led_a_group:
        return code
    import logging

    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError, AttributeError):  # closed, or None
            pass
    os._exit(code)


@contextmanager
def leaving(d: Dist) -> Iterator[None]:
    """The process group is left (`leave`) when the block ends, given how it ended."""
    try:
        yield
    except BaseException as e:
        leave(d, e)
        raise
    leave(d)


def leave(d: Dist, error: BaseException | None = None) -> None:
    """Leave the process group at the end of a command. When its ranks end together, having
    returned (`error` None) or raised an error that every rank raised at the same point
    (`errors.on_every_rank`: a stop they agreed on, a diverged loss, `raise_together`), a barrier
    first, so that every rank's last collective has finished before any rank tears the group
    down: a gloo rank that destroyed its group while the other's last collective was in flight
    aborted the other ("terminate called without an active exception": seen once after a whole
    run, 2026-12-02, and once after a stop on SIGUSR1, in CI, 2026-12-03). An error of one rank
    alone (a bug) skips the barrier, which would wait for ranks that never come; torchrun's agent
    stops them. On the error path a barrier that fails (another rank is gone) leaves the error in
    flight to be reported."""
    try:
        if d.enabled and (error is None or raised_on_every_rank(error)):
            try:
                dist.barrier()
            except Exception:
                if error is None:
                    raise
            else:
                _all_past_the_barrier(d)
    finally:
        shutdown()


#: How long a rank waits at the end for the others to say that their last barrier returned.
LEAVE_WAIT_S = 60


def _all_past_the_barrier(d: Dist) -> None:
    """Each rank says through the group's store (TCP to torchrun's agent, not the gloo pairs) that
    its last barrier returned, then waits until every rank has said so. A gloo barrier can return
    on one rank while its last message to another is still in flight; a group torn down then still
    aborted that rank (the same "terminate called without an active exception", 2026-12-07, in
    the suite, after the barrier above was added). A rank that never says so (it died after the
    barrier) is not waited for longer than LEAVE_WAIT_S."""
    from datetime import timedelta

    store = dist.distributed_c10d._get_default_store()
    tag = f"ditforge/left/{_env_int('TORCHELASTIC_RESTART_COUNT', 0)}"  # a restarted group's own keys
    store.set(f"{tag}/{d.rank}", "1")
    try:
        store.wait([f"{tag}/{r}" for r in range(d.world_size)], timedelta(seconds=LEAVE_WAIT_S))
    except dist.DistError:  # the wait timed out or the store is gone (a rank died after the barrier): leave all the same
        pass


def barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier()


def all_reduce_mean(x: torch.Tensor, d: Dist) -> torch.Tensor:
    """Mean of `x` over ranks (in place on a copy)."""
    if not d.enabled:
        return x
    y = x.clone()
    dist.all_reduce(y, op=dist.ReduceOp.SUM)
    return y / d.world_size


def raise_together(d: Dist, fn: Callable[[], T]) -> T:
    """`fn()` on this rank, and one outcome on every rank: each rank's own value when `fn` returned
    on all of them; otherwise, on every rank, the error that the lowest failing rank raised (its
    type and message), so that every process exits with the same status and the same one line,
    which rank 0 alone prints (the others' copies are quiet: `errors.on_every_rank`).

    For work that only some ranks do before a collective: rank 0 reads a checkpoint's tensors
    or the run's config.json, the others pass `fn` that returns at once. Without it an error on
    rank 0 left the others waiting in the next collective, until gloo saw the connection close
    (a traceback, read as a bug of ours) or NCCL's timeout. A collective itself: every rank calls
    it at the same point. Only our own errors travel (`UserError`, `NonFiniteLossError`: one
    line each); any other exception is a bug and propagates on its own rank, traceback intact.
    One process: just `fn()`."""
    if not d.enabled:
        return fn()
    value, error = None, None
    try:
        value = fn()
    except (UserError, NonFiniteLossError) as e:
        error = e
    outcomes: list = [None] * d.world_size
    dist.all_gather_object(outcomes, None if error is None else (type(error), str(error)))
    failed = next((o for o in outcomes if o is not None), None)
    if failed is None:
        return value
    kind, message = failed
    if error is not None and (type(error), str(error)) == failed:
        raise on_every_rank(error, d.is_main)
    raise on_every_rank(kind(message), d.is_main) from None


def all_true(flag: torch.Tensor, d: Dist) -> bool:
    """True when `flag` (a bool scalar) is true on every rank: a host sync, for log steps only."""
    if d.enabled:
        f = flag.to(torch.int32)
        dist.all_reduce(f, op=dist.ReduceOp.MIN)
        return bool(f)
    return bool(flag)


def max_over_ranks(value: int, d: Dist) -> int:
    """The largest of the host integers `value` of all ranks: one all-reduce of one element on
    the process's device (a collective: every rank calls it at the same point)."""
    if not d.enabled:
        return value
    f = torch.tensor([value], dtype=torch.int64, device=d.device)
    dist.all_reduce(f, op=dist.ReduceOp.MAX)
    return int(f.item())


def wrap(model: nn.Module, d: Dist, strategy: str = "ddp", precision: str = "fp32") -> nn.Module:
    """DDP (default) or FSDP2 (`fully_shard` per DiT block, then the root). One process: unchanged.
    FSDP2 training in bf16 gathers bf16 parameters and reduces gradients in fp32
    (`MixedPrecisionPolicy`): half the all-gather traffic, full-precision gradient sums."""
    if strategy not in STRATEGIES:
        raise UserError(f"unknown parallel strategy {strategy!r}; choose one of: {', '.join(STRATEGIES)}")
    if not d.enabled:
        return model
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [d.local_rank] if d.device.type == "cuda" else None
        return DDP(model, device_ids=ids, output_device=ids[0] if ids else None)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if precision == "bf16" else MixedPrecisionPolicy()
    for block in model.blocks:
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


def split_batch(global_batch: int, d: Dist, grad_accum: int = 1) -> int:
    """Per-rank micro-batch size; the global batch must split evenly over ranks and accumulation."""
    parts = d.world_size * grad_accum
    if global_batch % parts:
        raise UserError(
            f"global batch {global_batch} does not split evenly over {d.world_size} process(es) x "
            f"{grad_accum} accumulation step(s); use a multiple of {parts}"
        )
    return global_batch // parts


# -- state dicts that load on any world size ---------------------------------------------------
# torch.distributed.checkpoint's state_dict API gives the same unwrapped, full tensors for a plain
# module, DDP and FSDP2 (keys without `module.` / `_orig_mod.`), and the optimizer state keyed
# by parameter name. A collective under FSDP: every rank calls it; rank 0 gets the tensors.


def _options(load: bool = False, broadcast: bool = False):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=not load, broadcast_from_rank0=broadcast)


def full_model_state(module: nn.Module) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(module, options=_options())


def full_optimizer_state(module: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(module, optimizer, options=_options())


def load_full_state(module: nn.Module, state: dict[str, torch.Tensor], optimizer=None, optimizer_state=None,
                    d: Dist | None = None) -> None:
    """Load full tensors read from a checkpoint. In a process group only rank 0 passes them (the
    others pass empty dicts) and broadcasts them, so no other rank holds the whole checkpoint in
    host memory; sharded modules keep their shard. A collective: every rank calls it."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    options = _options(load=True, broadcast=d is not None and d.enabled)
    set_model_state_dict(module, state, options=options)
    if optimizer is not None and keeps_state(optimizer):
        set_optimizer_state_dict(module, optimizer, optimizer_state, options=options)


def keeps_state(optimizer: torch.optim.Optimizer) -> bool:
    """Whether `optimizer` keeps tensors between steps (AdamW's moments, SGD's momentum), known
    alike on every rank from its settings. Plain SGD keeps none: torch's loader of a full state
    finds no tensor to take a device from and fails, and there is nothing to load (its settings
    are the run's config, its rate set before each step)."""
    return not (isinstance(optimizer, torch.optim.SGD) and optimizer.defaults["momentum"] == 0)


def no_sync(module: nn.Module, d: Dist, skip: bool):
    """Inside gradient accumulation: skip the gradient all-reduce of all but the last micro-batch."""
    import contextlib

    if not (skip and d.enabled):
        return contextlib.nullcontext()
    if hasattr(module, "no_sync"):  # DDP
        return module.no_sync()
    if hasattr(module, "set_requires_gradient_sync"):  # FSDP2

        @contextlib.contextmanager
        def _fsdp():
            module.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                module.set_requires_gradient_sync(True)

        return _fsdp()
    return contextlib.nullcontext()


def clip_grad_norm(groups: list[list[nn.Parameter]], max_norm: float) -> torch.Tensor:
    """`torch.nn.utils.clip_grad_norm_` over several parameter groups as one, where some groups may
    be FSDP2-sharded (DTensor gradients) and others plain (the DDP-wrapped REPA projector beside an
    FSDP model): one global L2 norm, sqrt(sum of the groups' squared norms), and every gradient
    scaled by min(1, max_norm / (norm + 1e-6)). One group takes exactly the operations of
    `clip_grad_norm_` (its norm is not re-normed). Returns the norm (0-d, plain tensor)."""
    from torch.distributed.tensor import DTensor

    norms = []
    for params in groups:
        norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])  # 0-d
        norms.append(norm.full_tensor() if isinstance(norm, DTensor) else norm)  # a shard's norm -> the whole's
    total = norms[0] if len(norms) == 1 else torch.linalg.vector_norm(torch.stack(norms))
    for params in groups:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return total
