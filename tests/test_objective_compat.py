"""The diffusion objective trains and samples as it did before `objectives.py` existed: golden
values written by that version's code (commit 3da9e14; `tests/data/make_objective_fixtures.py`
says how), against today's training step, loss and sampler on the same inputs."""

from pathlib import Path

import torch
from safetensors.torch import load_file

from ditforge.config import TrainConfig
from ditforge.models import DiT
from ditforge.objectives import DiffusionObjective, objective_sampler
from ditforge.sampling.generate import sample_batch
from ditforge.train.distributed import Dist
from ditforge.train.step import TrainStep, step_randomness

FIXTURES = Path(__file__).parent / "data" / "objective_v0"

# Floats to their rounding, not bit for bit: another machine may round a matrix product or a
# vectorised kernel differently in the last bit (AVX-512 or not, another thread split); integers
# (timesteps, labels, drop flags) exactly. Each tolerance is a few times the largest difference
# measured here against the same code with torch's vector kernels off (ATEN_CPU_CAPABILITY=default)
# or oneDNN off (torch.backends.mkldnn.enabled = False, one thread). The changes tried (the VB
# term's weight 0.1% off, its gradient to eps not stopped, DDPM's step noise 0.01% too large)
# moved a value 6 to 15 times its tolerance.
LOSS = dict(rtol=1e-6, atol=1e-7)  # losses, per-sample terms: measured 2.8e-9
NOISE = dict(rtol=1e-6, atol=5e-6)  # Box-Muller's error is absolute, up to its radius x 1 ulp: measured 1.4e-6
WEIGHTS = dict(rtol=1e-6, atol=1e-6)  # after 3 AdamW steps of lr 1e-3: measured 1.8e-7
# The samples are hundreds (x_T / sqrt(alpha_bar_T): the model predicts almost no noise), so their
# rounding is absolute, one ulp of 500 = 6.1e-5: measured 6.1e-5
SAMPLES = dict(rtol=1e-6, atol=5e-4)


def _run():
    """The fixtures' run with today's code: (TrainStep, its step randomness and losses)."""
    cfg = TrainConfig(global_batch=8, grad_accum=2, seed=3, model=dict(name="DiT-Ti/4"), optim=dict(lr=1e-3))
    torch.manual_seed(0)
    model = DiT(input_size=8, patch_size=4, in_channels=4, hidden_size=16, depth=2, num_heads=2, num_classes=10,
                learn_sigma=True)
    stepper = TrainStep(cfg, model, Dist(), "fp32")
    old = load_file(str(FIXTURES / "steps.safetensors"))
    x, y = old["x"], old["y"]
    drawn = {}
    for s in range(3):
        t, noise, drop = step_randomness(cfg, s, (4, 8, 8), stepper.objective, torch.device("cpu"))
        drawn.update({f"t{s}": t, f"noise{s}": noise, f"drop{s}": drop})
        drawn[f"loss{s}"] = stepper(s, [(x[:4], y[:4]), (x[4:], y[4:])], [0, 4])
    return stepper, drawn, old


def test_diffusion_training_and_sampling_match_the_version_before_objectives():
    stepper, drawn, old = _run()
    model = stepper.model
    assert isinstance(stepper.objective, DiffusionObjective)
    for s in range(3):
        assert torch.equal(drawn[f"t{s}"], old[f"t{s}"]) and torch.equal(drawn[f"drop{s}"], old[f"drop{s}"]), s
        torch.testing.assert_close(drawn[f"noise{s}"], old[f"noise{s}"], **NOISE)
        torch.testing.assert_close(drawn[f"loss{s}"], old[f"loss{s}"], **LOSS)
    weights = load_file(str(FIXTURES / "weights.safetensors"))
    assert weights.keys() == model.state_dict().keys()
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, weights[name], **WEIGHTS, msg=lambda m, name=name: f"{name}: {m}")

    x, y, drop = old["x"], old["y"], old["drop0"]
    with torch.no_grad():
        terms = stepper.objective.training_losses(lambda x_t, t, labels: model(x_t, t, labels, force_drop_ids=drop),
                                                  x, old["t0"], y, old["noise0"])
    expected = load_file(str(FIXTURES / "terms.safetensors"))
    assert set(terms) == set(expected) == {"mse", "vb", "loss"}
    for name in expected:
        torch.testing.assert_close(terms[name], expected[name], **LOSS)

    # guided DDPM from given noise (not `generate`, whose seed -> noise mapping is not the objective's)
    old = load_file(str(FIXTURES / "sample.safetensors"))
    sampler = objective_sampler(stepper.objective, "ddpm", 5)
    samples = sample_batch(model.eval(), sampler, old["labels"], old["noise"], torch.Generator().manual_seed(6), cfg_scale=4.0)
    torch.testing.assert_close(samples, old["samples"], **SAMPLES)
