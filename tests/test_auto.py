"""The defaults `train` chooses for the device and the data: a pure function, tested exactly."""

import pytest

from ditforge.bench import train_flops_per_image
from ditforge.models import create_model
from ditforge.train.auto import (
    BUDGET_S, GPU_RATE, MAX_STEPS, MIN_STEPS, RATE_PER_CORE, DeviceInfo, choose_defaults, pick_patch,
)

CPU_BF16 = DeviceInfo("cpu", 2, True)
CPU_PLAIN = DeviceInfo("cpu", 2, False)
GPU = DeviceInfo("cuda", 16, True, "NVIDIA H100")


def _choose(device, shape, given=None, preset="tiny", builtin=False, batch=128):
    return choose_defaults(device, shape, 10, batch, given or {}, preset, builtin)


def test_patch_keeps_tokens_small_on_cpu_and_larger_on_gpu():
    assert pick_patch(28, "cpu", (1, 2, 4)) == 4  # 49 tokens; patch 2 would give 196
    assert pick_patch(32, "cpu", (1, 2, 4)) == 4  # 64 tokens
    assert pick_patch(16, "cpu", (1, 2, 4)) == 2  # 64 tokens
    assert pick_patch(8, "cpu", (1, 2, 4)) == 2  # 16 tokens; never patch 1 when 2 divides
    assert pick_patch(64, "cpu", (1, 2, 4)) == 4  # 256 tokens: none fits 64, the largest patch
    assert pick_patch(27, "cpu", (1, 2, 4)) == 1  # only 1 divides 27
    assert pick_patch(28, "cuda", (1, 2, 4)) == 2  # 196 tokens fit a GPU's 256
    assert pick_patch(32, "cuda", (1, 2, 4)) == 2


def test_28px_folder_on_a_two_core_bf16_cpu():
    ch = _choose(CPU_BF16, (1, 28, 28))
    assert (ch.model, ch.precision) == ("DiT-Ti/4", "bf16")
    flops = train_flops_per_image(create_model("DiT-Ti/4", input_size=28, in_channels=1, num_classes=10)) * 128
    seconds = flops / (2 * RATE_PER_CORE["bf16"])
    assert ch.seconds_per_step == pytest.approx(seconds)
    # the most steps (a multiple of 50) that fit the budget
    assert ch.steps % 50 == 0 and ch.steps * seconds <= BUDGET_S < (ch.steps + 50) * seconds
    assert ch.steps == 800  # 0.66 s a step: the tiny recipe's 800 steps fit about ten minutes
    assert len(ch.reasons) == 3 and all(isinstance(r, str) and r for r in ch.reasons)
    assert ch.as_overrides() == {"model.name": "DiT-Ti/4", "precision": "bf16", "steps": 800}


def test_cpu_without_native_bf16_stays_fp32_and_trains_fewer_steps():
    ch = _choose(CPU_PLAIN, (1, 28, 28))
    assert ch.model == "DiT-Ti/4" and ch.precision is None  # the preset's auto = fp32 on CPU
    assert ch.steps < _choose(CPU_BF16, (1, 28, 28)).steps
    assert ch.seconds_per_step == pytest.approx(_choose(CPU_BF16, (1, 28, 28)).seconds_per_step * RATE_PER_CORE["bf16"] / RATE_PER_CORE["fp32"])


def test_steps_are_clamped_and_gpu_gets_the_most():
    small = _choose(CPU_BF16, (1, 8, 8))
    assert small.model == "DiT-Ti/2" and small.steps == MAX_STEPS  # 8x8 is cheap
    big = _choose(CPU_PLAIN, (3, 64, 64))
    assert big.steps == MIN_STEPS  # 256 tokens of RGB at fp32 would fit fewer
    gpu = _choose(GPU, (3, 32, 32))
    assert gpu.model == "DiT-Ti/2" and gpu.precision is None and gpu.steps == MAX_STEPS
    assert gpu.seconds_per_step == pytest.approx(
        train_flops_per_image(create_model("DiT-Ti/2", input_size=32, in_channels=3, num_classes=10)) * 128 / GPU_RATE["bf16"])


def test_flags_given_win_and_recipes_are_kept():
    ch = _choose(CPU_BF16, (1, 28, 28), given={"model": "DiT-Ti/2", "precision": "fp32", "steps": 50})
    assert (ch.model, ch.precision, ch.steps) == (None, None, None) and ch.as_overrides() == {}
    only_model = _choose(CPU_BF16, (1, 28, 28), given={"model": "DiT-Ti/2"})
    assert only_model.model is None and only_model.precision == "bf16"
    assert only_model.steps < 800  # the steps follow the model the user chose (196 tokens cost more)
    paper = _choose(CPU_BF16, (4, 32, 32), preset="DiT-XL/2")
    assert paper.as_overrides() == {} and "paper's recipe" in paper.reasons[0]
    demo = _choose(CPU_BF16, (1, 8, 8), builtin=True)
    assert demo.as_overrides() == {} and "built-in demo" in demo.reasons[0]
