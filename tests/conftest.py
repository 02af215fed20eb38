import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))

# The smallest real run of the CLI: the registry's tiny DiT on the built-in digits.
TINY_TRAIN = ["--model", "DiT-Ti/4", "--batch-size", "16", "--log-every", "5", "--no-progress"]


def assert_close_ulps(actual: torch.Tensor, expected: torch.Tensor, ulps: int = 4) -> None:
    """`actual` equals `expected` (a fixture written on another machine) within `ulps` units in the
    last place of the tensor's scale: |a - e| <= ulps * eps * (|e| + max |e|), same dtype and shape.

    Why not `torch.equal`: the vectorised kernels torch picks at run time (AVX-512 or AVX2,
    Sleef's exp and the Box-Muller of `torch.randn`, FMA or not) round the last bit differently, so a
    float computed on one CPU and read back on another may differ by an ulp (store_v1's batches,
    written on an AVX-512 machine, differ by 3e-8 = 0.25 ulp of 1.0 on an AVX2-only EPYC). Any
    real change (another draw, another record, a lost flip) moves values by orders of magnitude more.
    Integers (labels, indices) and bytes read back as stored stay exact: compare them with
    `torch.equal`."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, (actual.dtype, actual.shape, expected.dtype, expected.shape)
    assert actual.is_floating_point(), "compare integers exactly"
    eps = torch.finfo(expected.dtype).eps
    a, e = actual.double(), expected.double()
    bound = ulps * eps * (e.abs() + e.abs().max())
    worst = ((a - e).abs() / bound).max().item() if e.numel() else 0.0
    assert worst <= 1.0, f"differs by {worst * ulps:.2f} ulps of the tensor's scale (allowed {ulps})"


def cpu_env(**extra: str) -> dict[str, str]:
    """The environment of a subprocess that must run on the CPU, as the tests expect, also on a
    machine with a GPU (set `gpu=True` where a test means the GPU path)."""
    # PYTHONFAULTHANDLER: a process dying of a signal (a crash in native code) prints its Python stacks
    return dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONFAULTHANDLER="1", **extra)


@pytest.fixture(autouse=True)
def _on_the_cpu_unless_marked_gpu(request, monkeypatch):
    """The test process's own device choice is the CPU, as its subprocesses' (`cpu_env`), so each
    test means the same on a GPU machine. On an H100 (2026-11-27), `train`'s automatic defaults
    chose for the GPU in two tests that expected a CPU's. Tests of the device choice and of the
    GPU paths are marked `gpu` and see the real, or their patched, `torch.cuda`."""
    if request.node.get_closest_marker("gpu") is None:
        import ditforge.train.distributed

        monkeypatch.setattr(ditforge.train.distributed, "local_device", lambda: torch.device("cpu"))


def run_cli(*args: str, check: bool = True, timeout: float = 600, gpu: bool = False,
            subprocess_only: bool = False) -> subprocess.CompletedProcess:
    """Run `ditforge ARGS` as a user would; return the finished process (its exit code, stdout
    and stderr).

    On a machine without a GPU it runs `cli.main(ARGS)` in this process, which is what `python
    -m ditforge` runs, with stdout and stderr captured: the same code and the same threads (this
    process uses 2, like `OMP_NUM_THREADS=2`), without the 2-4 s that a fresh interpreter spends
    importing torch (the suite calls the CLI about 150 times). A test that needs a process of its
    own (a signal, a crash, its environment) passes `subprocess_only`; where torch sees a GPU,
    every call is a subprocess with `CUDA_VISIBLE_DEVICES` emptied (`cpu_env`) unless `gpu`."""
    if subprocess_only or gpu or torch.cuda.is_available():
        proc = subprocess.run(
            [sys.executable, "-m", "ditforge", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=dict(os.environ, OMP_NUM_THREADS="2") if gpu else cpu_env(OMP_NUM_THREADS="2"),
        )
    else:
        proc = _run_in_process(list(args))
    if check and proc.returncode != 0:
        raise AssertionError(f"ditforge {' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def _run_in_process(argv: list[str]) -> subprocess.CompletedProcess:
    """`sys.exit(cli.main(argv))` as `python -m ditforge` runs it, its output captured: the root
    logger's handlers (pytest's capture among them) are set aside for the call, so that main's
    `logging.basicConfig` binds the captured stdout, and put back after it with the root's level;
    warnings show again as in a new process, and an exception that escapes main is printed with
    exit code 1, as the interpreter would."""
    import contextlib
    import io
    import logging
    import traceback
    import warnings

    from ditforge.cli import main

    out, err = io.StringIO(), io.StringIO()
    kept, level = list(logging.root.handlers), logging.root.level
    for handler in kept:
        logging.root.removeHandler(handler)
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings():
        warnings.simplefilter("default")
        try:
            code = main(argv)
        except SystemExit as e:  # argparse's usage errors and --help
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else (print(e.code, file=sys.stderr) or 1))
        except BaseException:  # noqa: BLE001 - what an uncaught exception does to `python -m ditforge`
            traceback.print_exc()
            code = 1
        finally:
            for handler in list(logging.root.handlers):
                logging.root.removeHandler(handler)
            for handler in kept:
                logging.root.addHandler(handler)
            logging.root.setLevel(level)
    return subprocess.CompletedProcess([sys.executable, "-m", "ditforge", *argv], code or 0, out.getvalue(), err.getvalue())


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> Path:
    """A short real training run shared by the sampling and evaluation tests."""
    run = tmp_path_factory.mktemp("runs") / "digits"
    run_cli("train", "--run-dir", str(run), "--steps", "30", "--ckpt-every", "15", *TINY_TRAIN)
    return run


@pytest.fixture(scope="session")
def dinov2_dir(tmp_path_factory) -> str:
    """A random-weight DINOv2 (hidden 32, 2 layers, patch 4) in a save_pretrained folder: REPA's
    encoder, offline (the `repa` extra)."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                    patch_size=4, image_size=16)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("dinov2")
    transformers.Dinov2Model(cfg).save_pretrained(folder)
    return str(folder)
