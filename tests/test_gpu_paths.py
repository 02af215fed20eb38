"""The GPU-only code paths in their CPU form, so that a GPU bug shows without a GPU.

Each test names the GPU path it stands for: the device each process picks (patched
`torch.cuda`), mixed precision (bf16 autocast; fp16 with a GradScaler), recompute and compile,
the prefetching loader, a step free of host syncs and host-to-device copies (on the `meta`
device, where every copy from the host is visible; in bf16 / fp16 with the fused optimizer,
which the meta device cannot run, on the CPU, where the step reads no value at all), and
FSDP2's gradient sync under accumulation and its mixed-precision policy (two gloo processes).
The tests marked `cuda` run the same paths on a real GPU and are skipped without one.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import TINY_TRAIN, cpu_env, run_cli
from ditforge import cli
from ditforge.config import TrainConfig
from ditforge.models import create_model
from ditforge.train.device import pick_device, resolve_precision
from ditforge.train.distributed import Dist
from ditforge.train.step import TrainStep

pytestmark = pytest.mark.gpu  # the device choice as it is, not the suite's CPU (conftest)

aten = torch.ops.aten
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


# -- the device of each process -------------------------------------------------------------


class DeviceChosen(BaseException):
    """Raised by the patched `set_device` to stop a command once it has chosen its device
    (a BaseException, so that no handler of the command mistakes it for an error of its own)."""


@pytest.fixture
def two_fake_gpus(monkeypatch):
    """`torch.cuda` of a machine with two GPUs, whose `set_device` checks its argument as the
    real one does (a bare `cuda` device is refused) and then stops the command."""
    from torch.cuda._utils import _get_device_index

    chosen = []

    def set_device(device):
        chosen.append(_get_device_index(device))  # ValueError for torch.device("cuda"), as on a GPU
        raise DeviceChosen

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.cuda, "set_device", set_device)
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    return chosen


def test_the_real_set_device_refuses_a_bare_cuda_device():
    from torch.cuda._utils import _get_device_index

    with pytest.raises(ValueError, match="specified index"):  # what the H200 printed
        _get_device_index(torch.device("cuda"))


@pytest.mark.parametrize("command", ["train", "sample", "extract"])
def test_local_rank_1_uses_cuda_1(two_fake_gpus, trained_run, tmp_path, command):
    argv = {
        "train": ["train", "--run-dir", str(tmp_path / "run"), *TINY_TRAIN],
        "sample": ["sample", str(trained_run), "--num-samples", "4", "--out", str(tmp_path / "s.npz")],
        "extract": ["extract", "--data", "digits", "--vae", "identity", "--image-size", "8", "--out", str(tmp_path / "store")],
    }[command]
    with pytest.raises(DeviceChosen):
        cli.main(argv)
    assert two_fake_gpus == [1]
    assert pick_device() == torch.device("cuda", 1)  # eval and bench: the same choice


def test_more_processes_than_gpus_is_one_line_naming_both(two_fake_gpus, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    code = cli.main(["train", "--run-dir", str(tmp_path / "run"), *TINY_TRAIN])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "4 processes on this node" in err[0] and "only 2 GPU(s)" in err[0]
    assert not two_fake_gpus and not (tmp_path / "run").exists()


def test_auto_precision_is_bf16_on_a_gpu_that_has_it(two_fake_gpus):
    assert resolve_precision("auto", torch.device("cuda", 1)) == "bf16"
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"


# -- one training step, built directly, in each precision -------------------------------------


def _cfg(**over) -> TrainConfig:
    values = dict(model=dict(name="DiT-Ti/4"), global_batch=8, seed=3, optim=dict(lr=1e-3, grad_clip=1.0))
    values.update(over)
    return TrainConfig.from_dict(values)


def _batches(cfg: TrainConfig, n_micro: int = 1, device="cpu"):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(cfg.global_batch, 1, 8, 8, generator=g).to(device)
    y = torch.randint(0, 10, (cfg.global_batch,), generator=g).to(device)
    b = cfg.global_batch // n_micro
    return [(x[i * b : (i + 1) * b], y[i * b : (i + 1) * b]) for i in range(n_micro)], [i * b for i in range(n_micro)]


def _train(cfg: TrainConfig, precision: str, steps: int = 3, device="cpu", n_micro: int = 1):
    torch.manual_seed(0)
    model = create_model(cfg.model.name, input_size=8, in_channels=1, num_classes=10)
    step = TrainStep(cfg, model, Dist(device=torch.device(device)), precision)
    batches, offsets = _batches(cfg, n_micro, device)
    losses = [step(i, batches, offsets) for i in range(steps)]
    return model, torch.stack(losses)


def _flat(model) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


@pytest.mark.parametrize("precision, loss_tol, update_tol", [("bf16", 1e-2, 0.25), ("fp16", 1e-3, 0.05)])
def test_mixed_precision_step_is_finite_and_close_to_fp32(precision, loss_tol, update_tol):
    """bf16 autocast, and fp16 autocast with loss scaling (GradScaler, unscaled before the
    clipping), on the CPU: the step a GPU runs, bypassing `--precision auto`. Over 3 AdamW steps
    the losses agree to the precision's rounding and the weight updates to within `update_tol`
    of the fp32 update's norm (measured: 8% for bf16's 8-bit mantissa, 0.25% for fp16's 11 bits;
    a skipped or mis-scaled step is off by 100%)."""
    cfg = _cfg()
    torch.manual_seed(0)
    init = _flat(create_model(cfg.model.name, input_size=8, in_channels=1, num_classes=10))
    ref_model, ref_losses = _train(cfg, "fp32")
    model, losses = _train(cfg, precision)
    assert torch.isfinite(losses).all()
    assert torch.allclose(losses, ref_losses, rtol=loss_tol, atol=0)
    assert all(p.dtype == torch.float32 for p in model.parameters())  # master weights stay fp32
    update, ref_update = _flat(model) - init, _flat(ref_model) - init
    assert (update - ref_update).norm() <= update_tol * ref_update.norm()


def test_grad_checkpoint_gives_the_same_gradients():
    grads = []
    for recompute in (False, True):
        torch.manual_seed(0)
        model = create_model("DiT-Ti/4", input_size=8, in_channels=1, num_classes=10)
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():  # away from the zero-init, so that every weight has a gradient
            for p in model.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=g))
        model.grad_checkpointing = recompute
        x, y = torch.randn(4, 1, 8, 8, generator=g), torch.tensor([0, 1, 2, 10])
        model(x, torch.tensor([1, 10, 100, 999]), y).square().mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        assert grads[0][name].abs().max() > 0, name
        assert torch.equal(grads[0][name], grads[1][name]), name  # exactly: the same kernels run again


@pytest.mark.slow
def test_compiled_step_trains_like_eager():
    cfg = _cfg()
    _, eager = _train(cfg, "fp32", steps=2)
    _, compiled = _train(_cfg(compile=True), "fp32", steps=2)
    assert torch.isfinite(compiled).all()
    assert torch.allclose(compiled, eager, rtol=1e-4)


def test_trainer_through_the_prefetcher_ends_with_the_same_weights(tmp_path):
    args = ["--steps", "6", "--ckpt-every", "6", *TINY_TRAIN]
    for mode in ("off", "on"):
        run_cli("train", "--run-dir", str(tmp_path / mode), "--prefetch", mode, *args)
    for name in ("model", "ema", "optimizer"):
        a, b = (load_file(str(tmp_path / m / "checkpoints" / "step-0000006" / f"{name}.safetensors")) for m in ("off", "on"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


# -- no host sync and no host-to-device copy in a step -----------------------------------------


class HostTraffic(TorchDispatchMode):
    """Records what a GPU step must not do: read a device value on the host (`.item()`,
    `bool(t)`: `_local_scalar_dense`) or copy a host tensor to the device. `cpu_reads`: count the
    reads of CPU tensors too (a step on the CPU, where every tensor of a GPU step is on the CPU)."""

    def __init__(self, cpu_reads: bool = False):
        super().__init__()
        self.syncs, self.copies, self.cpu_reads = [], [], cpu_reads

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is aten._local_scalar_dense.default and (self.cpu_reads or args[0].device.type != "cpu"):
            self.syncs.append(tuple(args[0].shape))
        out = func(*args, **kwargs)
        if func in (aten._to_copy.default, aten.copy_.default):
            src, dst = (args[0], out) if func is aten._to_copy.default else (args[1], args[0])
            if isinstance(src, torch.Tensor) and src.device.type == "cpu" and dst.device.type != "cpu":
                self.copies.append(tuple(src.shape))
        return out


def test_a_step_makes_no_host_sync_and_copies_nothing_to_the_device():
    """On the meta device (no values, no kernels) every host-to-device copy is an op to see.
    The batches are on the device already, as the prefetcher delivers them; the first step may
    copy the diffusion's coefficient tables once, later steps nothing."""
    cfg = _cfg(grad_accum=2)
    torch.manual_seed(0)
    model = create_model(cfg.model.name, input_size=8, in_channels=1, num_classes=10)
    step = TrainStep(cfg, model, Dist(device=torch.device("meta")), "fp32")  # (autocast has no meta form)
    batches, offsets = _batches(cfg, 2, device="meta")
    step(0, batches, offsets)
    traffic = HostTraffic()
    with traffic:
        loss = step(1, batches, offsets)
    assert loss.device.type == "meta"
    assert traffic.copies == [] and traffic.syncs == []


@pytest.mark.parametrize("precision, optimizer", [("bf16", "adamw"), ("fp16", "adamw"), ("bf16", "sgd"), ("fp16", "sgd")])
def test_a_mixed_precision_fused_step_reads_no_value_on_the_host(precision, optimizer):
    """The step as a GPU runs it, which the meta device cannot (no autocast, no fused kernels):
    bf16 autocast, or fp16 with the GradScaler, the fused optimizer, clipping, 2 micro-batches. On
    the CPU, where this step reads no tensor's value at all, so any `.item()`, `float(t)` or
    `bool(t)` in it is one a GPU would wait for (unfused, the GradScaler reads its inf check so)."""
    cfg = _cfg(grad_accum=2, optim=dict(lr=1e-3, grad_clip=1.0, optimizer=optimizer, momentum=0.9 if optimizer == "sgd" else 0))
    torch.manual_seed(0)
    model = create_model(cfg.model.name, input_size=8, in_channels=1, num_classes=10)
    step = TrainStep(cfg, model, Dist(), precision)
    assert step.opt.defaults["fused"] and step.scaler.is_enabled() == (precision == "fp16")
    batches, offsets = _batches(cfg, 2)
    step(0, batches, offsets)  # (the optimizer's state is made in its first step)
    traffic = HostTraffic(cpu_reads=True)
    with traffic:
        step(1, batches, offsets)
    assert traffic.syncs == []


# -- FSDP2 with two gloo processes ----------------------------------------------------------------

FSDP_WORKER = Path(__file__).with_name("fsdp_worker.py")


def test_fsdp_reduces_once_per_step_gathers_bf16_and_scales_fp16(tmp_path):
    out = tmp_path / "report.json"
    env = cpu_env(OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(FSDP_WORKER), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    # one reduce-scatter per FSDP group (each block and the root) per optimizer step, whatever
    # the number of micro-batches
    groups, steps = report["groups"], report["steps"]
    assert report["reduce_scatters"]["1"] == groups * steps
    assert report["reduce_scatters"]["4"] == groups * steps
    assert report["param_dtype"] == {"fp32": "torch.float32", "bf16": "torch.bfloat16"}
    # fp16 under FSDP: the scaled, unscaled and clipped steps follow fp32 to fp16's rounding (a
    # skipped or mis-scaled step would leave the third loss where fp32's moved from)
    fp32, fp16 = report["losses"]["fp32"], report["losses"]["fp16"]
    assert fp16 == pytest.approx(fp32, rel=1e-3) and fp32[2] != pytest.approx(fp32[1], rel=1e-2)


# -- the same paths on a real GPU -------------------------------------------------------------


@cuda
def test_gpu_train_defaults_to_bf16_with_pinned_prefetch(tmp_path):
    out = run_cli("train", "--run-dir", str(tmp_path / "r"), "--steps", "4", "--ckpt-every", "4", *TINY_TRAIN, gpu=True)
    assert "bf16 on cuda" in out.stdout


@cuda
def test_gpu_prefetcher_pins_batches():
    from ditforge.data.loader import InfiniteLoader, Prefetcher, TensorSource

    source = TensorSource(torch.randn(32, 1, 8, 8), torch.zeros(32, dtype=torch.long))
    with Prefetcher(InfiniteLoader(source, 8, 0, False, 0, 0, 1, 1), pin_memory=True) as p:
        assert all(x.is_pinned() and y.is_pinned() for x, y in p.next_step())


@cuda
def test_gpu_nccl_with_one_process(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "-m", "ditforge", "train",
           "--run-dir", str(tmp_path / "r"), "--steps", "4", "--ckpt-every", "4", *TINY_TRAIN]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
