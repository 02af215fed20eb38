"""The defaults `train` chooses for the device and the data: a pure function, tested exactly."""

import pytest

from ditforge.bench import train_flops_per_image
from ditforge.models import create_model
from ditforge.train.auto import (
    BUDGET_S, CPU_BATCH, CPU_LR, GPU_RATE, SLOW_CPU_BATCH, MAX_STEPS, MIN_STEPS, MODERN_BLOCKS, RATE_PER_CORE, DeviceInfo, choose_defaults, pick_patch,
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
    assert (ch.model, ch.precision, ch.batch) == ("DiT-Ti/4", "bf16", CPU_BATCH)
    flops = train_flops_per_image(create_model("DiT-Ti/4", input_size=28, in_channels=1, num_classes=10)) * CPU_BATCH
    assert ch.seconds_per_step == pytest.approx(flops / (2 * RATE_PER_CORE["bf16"]))  # analytic: no measurement passed
    assert ch.steps == MAX_STEPS  # 0.33 s a step of 64: more than the most steps fit
    # with --batch-size 128, the most steps (a multiple of 50) that fit the budget
    seconds = 2 * ch.seconds_per_step
    at_128 = _choose(CPU_BF16, (1, 28, 28), given={"batch": 128})
    assert at_128.batch is None and at_128.seconds_per_step == pytest.approx(seconds)
    assert at_128.steps % 50 == 0 and at_128.steps * seconds <= BUDGET_S < (at_128.steps + 50) * seconds
    assert at_128.steps == 1050
    assert len(ch.reasons) == 7 and all(isinstance(r, str) and r for r in ch.reasons)
    assert ch.as_overrides() == {"model.name": "DiT-Ti/4", "precision": "bf16", "steps": MAX_STEPS, "global_batch": CPU_BATCH,
                                 "optim.lr": CPU_LR,
                                 "objective": "flow", "flow.time_distribution": "logit-normal", "model.norm": "rms",
                                 "model.mlp": "swiglu", "model.rope": True, "model.qk_norm": True}
    assert any(r.startswith("blocks RMSNorm, SwiGLU, RoPE, qk-norm:") for r in ch.reasons)
    assert any(r.startswith("lr 0.002: twice the tiny preset's") for r in ch.reasons)
    assert _choose(CPU_BF16, (1, 28, 28), given={"lr": 5e-4}).lr is None  # --lr wins
    assert _choose(GPU, (3, 32, 32)).lr is None and "optim.lr" not in _choose(GPU, (3, 32, 32)).as_overrides()  # not compared


def test_cpu_without_native_bf16_stays_fp32_and_trains_fewer_steps():
    ch = _choose(CPU_PLAIN, (1, 28, 28))
    assert ch.model == "DiT-Ti/4" and ch.precision is None  # the preset's auto = fp32 on CPU
    assert ch.steps < _choose(CPU_BF16, (1, 28, 28)).steps
    assert ch.seconds_per_step == pytest.approx(_choose(CPU_BF16, (1, 28, 28)).seconds_per_step * RATE_PER_CORE["bf16"] / RATE_PER_CORE["fp32"])


def test_a_cpu_run_takes_its_steps_from_the_measured_step_time():
    seen = []

    def measure(model, precision, blocks, objective, batch, optimizer):
        seen.append((model, precision, blocks, objective, batch, optimizer))
        return 2.0

    ch = choose_defaults(CPU_PLAIN, (1, 28, 28), 10, 128, {"rope": False}, "tiny", False, lambda *a: 0.5)
    assert ch.batch == CPU_BATCH and ch.seconds_per_step == 0.5 and ch.steps == int(BUDGET_S / 0.5) // 50 * 50
    assert any(r.startswith(f"steps {ch.steps}: 0.50 s a step of batch {CPU_BATCH} measured on 2 CPU cores") for r in ch.reasons)
    ch = choose_defaults(CPU_PLAIN, (1, 28, 28), 10, 128, {"rope": False}, "tiny", False, measure)
    # 2 s a step of 64 affords 350 steps, fewer than SLOW_CPU_STEPS: half the batch, measured again
    assert seen == [("DiT-Ti/4", "fp32", {**MODERN_BLOCKS, "rope": False}, "flow", b, "adamw") for b in (CPU_BATCH, SLOW_CPU_BATCH)]
    assert ch.batch == SLOW_CPU_BATCH and ch.as_overrides()["global_batch"] == SLOW_CPU_BATCH
    assert ch.seconds_per_step == 2.0 and ch.steps == int(BUDGET_S / 2.0) // 50 * 50
    assert [r for r in ch.reasons if r.startswith("batch ")] == [
        r for r in ch.reasons if r.startswith(f"batch {SLOW_CPU_BATCH}: a step of {CPU_BATCH} took 2.00 s here, 350 steps")]
    assert sum(r.startswith(f"lr {CPU_LR:g}:") for r in ch.reasons) == 1 and len(ch.reasons) == 6  # one line a choice (no precision line: fp32)
    assert any(r.startswith(f"steps {ch.steps}: 2.00 s a step of batch {SLOW_CPU_BATCH} measured on 2 CPU cores") for r in ch.reasons)
    seen.clear()
    mine = choose_defaults(CPU_PLAIN, (1, 28, 28), 10, 96, {"batch": 96, "optimizer": "muon"}, "tiny", False, measure)
    # flags win; the step is measured with the optimizer given: Muon's Newton-Schulz steps are part of its time
    assert mine.batch is None and [b[-2:] for b in seen] == [(96, "muon")] and "global_batch" not in mine.as_overrides()
    seen.pop()
    assert f"for a run of about {ch.steps * 2.0 / 60 + 1:.0f} minutes" in ch.reasons[-1]
    capped = choose_defaults(CPU_PLAIN, (1, 28, 28), 10, 128, {}, "tiny", False, lambda *a: 0.3)
    assert capped.steps == MAX_STEPS and "for a run of about 11 minutes" in capped.reasons[-1]  # 2,000 x 0.3 s, not the budget
    assert choose_defaults(CPU_PLAIN, (1, 28, 28), 10, 128, {}, "tiny", False, lambda *a: 1e-3).steps == MAX_STEPS
    assert choose_defaults(CPU_PLAIN, (1, 28, 28), 10, 128, {}, "tiny", False, lambda *a: 1e3).steps == MIN_STEPS
    gpu = choose_defaults(GPU, (3, 32, 32), 10, 128, {}, "tiny", False, measure)
    assert not seen and gpu.steps == MAX_STEPS  # a GPU keeps the analytic rate: a tiny DiT step is milliseconds
    assert choose_defaults(CPU_PLAIN, (1, 28, 28), 10, 128, {"steps": 7}, "tiny", False, measure).steps is None
    assert not seen  # --steps given: nothing is measured


def test_measured_step_time_is_real_and_leaves_the_seed_alone():
    import torch

    from ditforge.train.auto import measure_step_seconds

    torch.manual_seed(3)
    expected = torch.rand(4)
    torch.manual_seed(3)
    seconds = measure_step_seconds("DiT-Ti/4", (1, 8, 8), 2, 4, "auto", dict(MODERN_BLOCKS), "flow", steps=1)
    assert 0 < seconds < 60 and torch.equal(torch.rand(4), expected)
    assert 0 < measure_step_seconds("DiT-Ti/4", (1, 8, 8), 2, 4, "auto", dict(MODERN_BLOCKS), "flow", "muon", steps=1) < 60


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
    given = {"model": "DiT-Ti/2", "precision": "fp32", "steps": 50, "batch": 32, "lr": 2e-4, "optimizer": "adamw",
             "objective": "diffusion", **MODERN_BLOCKS}
    ch = _choose(CPU_BF16, (1, 28, 28), given=given)
    assert (ch.model, ch.precision, ch.steps, ch.batch, ch.objective) == (None,) * 5 and ch.as_overrides() == {}
    no_rope = _choose(CPU_BF16, (1, 28, 28), given={"rope": False, "norm": "layer"})  # each block flag wins alone
    assert no_rope.blocks == {"mlp": "swiglu", "qk_norm": True} and "blocks SwiGLU, qk-norm:" in " ".join(no_rope.reasons)
    uniform_flow = _choose(CPU_BF16, (1, 28, 28), given={"time_dist": "uniform"})
    assert uniform_flow.objective == "flow" and uniform_flow.time_distribution is None  # the user's times kept
    plain_flow = _choose(CPU_BF16, (1, 28, 28), given={"objective": "flow"})
    assert plain_flow.objective is None and plain_flow.time_distribution is None  # --objective given: its own defaults
    only_model = _choose(CPU_BF16, (1, 28, 28), given={"model": "DiT-Ti/2"})
    assert only_model.model is None and only_model.precision == "bf16"
    assert only_model.steps < 800  # the steps follow the model the user chose (196 tokens cost more)
    paper = _choose(CPU_BF16, (4, 32, 32), preset="DiT-XL/2")
    assert paper.as_overrides() == {} and "paper's recipe" in paper.reasons[0]
    demo = _choose(CPU_BF16, (1, 8, 8), builtin=True)
    assert demo.as_overrides() == {} and "built-in demo" in demo.reasons[0]


def test_train_command_applies_the_choices_and_a_rerun_keeps_the_recorded_ones(tmp_path):
    import numpy as np
    from PIL import Image

    from ditforge.cli import auto_defaults, build_parser, config_from_args
    from ditforge.config import TrainConfig

    for c in ("a", "b"):
        (tmp_path / "imgs" / c).mkdir(parents=True)
        Image.fromarray(np.full((28, 28), 40 if c == "a" else 200, np.uint8), "L").save(tmp_path / "imgs" / c / "0.png")
    run = tmp_path / "run"

    def choose(*flags, batch=("--batch-size", "8")):  # a batch of 8: the step time measured for the steps takes a moment
        args = build_parser().parse_args(["train", "--data", str(tmp_path / "imgs"), "--run-dir", str(run), *batch, *flags])
        return auto_defaults(args, config_from_args(args))

    cfg, lines = choose()
    assert cfg.global_batch == 8 and any(line.startswith("steps ") and "measured on" in line for line in lines)
    assert cfg.optim.lr == CPU_LR and any(line.startswith(f"lr {CPU_LR:g}:") for line in lines)
    assert cfg.optim.optimizer == "adamw" and not any(line.startswith("optimizer") for line in lines)  # not chosen
    assert (cfg.model.name, cfg.objective, cfg.flow.time_distribution) == ("DiT-Ti/4", "flow", "logit-normal")
    assert (cfg.model.norm, cfg.model.mlp, cfg.model.rope, cfg.model.qk_norm) == ("rms", "swiglu", True, True)
    assert any(line.startswith("objective flow with logit-normal times") for line in lines)
    recorded = cfg.to_dict()
    mine, _ = choose("--no-rope", "--norm", "layer")  # block flags win, one by one
    assert (mine.model.norm, mine.model.mlp, mine.model.rope, mine.model.qk_norm) == ("layer", "swiglu", False, True)
    recorded.update(objective="diffusion", steps=123, sample_sampler="", optim=dict(recorded["optim"], optimizer="muon"))
    run.mkdir()
    TrainConfig.from_dict(recorded).save(run / "config.json")
    cfg, lines = choose("--steps", "7")  # the rerun of that run: its recorded choices, the flag given wins
    assert (cfg.objective, cfg.steps, cfg.model.name) == ("diffusion", 7, "DiT-Ti/4")
    assert cfg.model.norm == "rms" and f"norm rms: kept from {run / 'config.json'}" in lines
    assert f"objective diffusion: kept from {run / 'config.json'}" in lines and not any("steps" in line for line in lines)
    cfg, lines = choose(batch=())  # no --batch-size: the recorded batch, not the CPU's choice
    assert cfg.global_batch == 8 and f"batch 8: kept from {run / 'config.json'}" in lines
    assert cfg.optim.lr == CPU_LR and f"lr {CPU_LR}: kept from {run / 'config.json'}" in lines
    assert cfg.optim.optimizer == "muon" and f"optimizer muon: kept from {run / 'config.json'}" in lines  # --optimizer was left out
    cfg, _ = choose("--lr", "3e-4")
    assert cfg.optim.lr == 3e-4  # the flag wins over the recorded choice


def test_builtin_mnist_is_adapted_and_the_demo_digits_are_not(tmp_path):
    from ditforge.cli import auto_defaults, build_parser, config_from_args
    from ditforge.train.auto import adapts_to_data, peek_data

    assert adapts_to_data("mnist") and not adapts_to_data("digits") and not adapts_to_data(str(tmp_path / "none"))
    assert peek_data("mnist", None) == ((1, 28, 28), 10)

    def choose(data):
        args = build_parser().parse_args(["train", "--data", data, "--run-dir", str(tmp_path / data), "--batch-size", "8"])
        return auto_defaults(args, config_from_args(args))

    cfg, lines = choose("mnist")
    assert (cfg.model.name, cfg.objective, cfg.flow.time_distribution) == ("DiT-Ti/4", "flow", "logit-normal") and lines
    cfg, lines = choose("digits")
    assert (cfg.model.name, cfg.objective, lines) == ("DiT-Ti/2", "diffusion", [])
