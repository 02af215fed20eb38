"""How tests/data/objective_v0/ was made: by the code of commit 3da9e14, the parent of b4534d0,
which put the diffusion objective behind `objectives.py` ("diffusion unchanged bit for bit").

    git worktree add /tmp/old 3da9e14
    PYTHONPATH=/tmp/old/src python tests/data/make_objective_fixtures.py   # from the repository root

Kept as the record of what the fixtures hold; it calls that version's API (`step_randomness`
took the number of diffusion steps, `Sampler` a schedule), so it is not meant to run again: the
fixtures are there for `tests/test_objective_compat.py` to run today's code on the same inputs
and compare.

A DiT of 2 blocks, hidden size 16, 2 heads, patch 4, learned sigma, on 4x8x8 inputs (10 classes),
initialised after `torch.manual_seed(0)`; `TrainStep` (fp32, fused AdamW lr 1e-3, label dropout
0.1, EMA) runs 3 optimizer steps of a global batch of 8 in 2 micro-batches of 4, on the same
batch each step, with the step randomness of seed 3. Files:

- steps.safetensors: the batch (`x`, `y`); per step s the timesteps `t{s}`, noise `noise{s}` and
  label-drop flags `drop{s}` that `step_randomness` drew, and the step's loss `loss{s}`.
- weights.safetensors: the model's weights after the 3 steps.
- terms.safetensors: the per-sample `mse`, `vb` and `loss` of `GaussianDiffusion.training_losses`
  for the trained model (train mode, the flags of step 0 as forced drops) on the batch with
  `t0`, `noise0`.
- sample.safetensors: `sample_batch` of the trained model (eval mode) from the starting noise
  `noise` (4, 4, 8, 8) for the `labels` 1, 1, 7, 7, cfg 4, 5 DDPM steps (respaced), the step
  noise from a CPU generator seeded 6: `samples` (4, 4, 8, 8). Their scale is hundreds: the
  3-step model predicts almost no noise, so x_0 = x_T / sqrt(alpha_bar_T) and onwards.
"""

import subprocess
from pathlib import Path

import torch
from safetensors.torch import save_file

import ditforge
from ditforge.config import TrainConfig
from ditforge.diffusion import create_diffusion
from ditforge.diffusion.sampling import Sampler
from ditforge.models import DiT
from ditforge.sampling.generate import sample_batch
from ditforge.train.distributed import Dist
from ditforge.train.step import TrainStep, step_randomness

OUT = Path(__file__).resolve().parent / "objective_v0"
STEPS = 3


def main() -> None:
    src = Path(ditforge.__file__).resolve().parents[2]
    commit = subprocess.run(["git", "-C", str(src), "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert commit == "3da9e14", f"run with the code of 3da9e14 on PYTHONPATH, not {commit!r} ({src})"
    torch.set_num_threads(2)
    cfg = TrainConfig(global_batch=8, grad_accum=2, seed=3, model=dict(name="DiT-Ti/4"), optim=dict(lr=1e-3))
    torch.manual_seed(0)
    model = DiT(input_size=8, patch_size=4, in_channels=4, hidden_size=16, depth=2, num_heads=2, num_classes=10,
                learn_sigma=True)
    stepper = TrainStep(cfg, model, Dist(), "fp32")
    g = torch.Generator().manual_seed(11)
    x, y = torch.randn(8, 4, 8, 8, generator=g), torch.randint(0, 10, (8,), generator=g)
    steps = {"x": x, "y": y}
    for s in range(STEPS):
        t, noise, drop = step_randomness(cfg, s, (4, 8, 8), 1000, torch.device("cpu"))
        steps.update({f"t{s}": t, f"noise{s}": noise, f"drop{s}": drop})
        steps[f"loss{s}"] = stepper(s, [(x[:4], y[:4]), (x[4:], y[4:])], [0, 4])
    diffusion = create_diffusion("", "linear", True, 1000)
    with torch.no_grad():
        terms = diffusion.training_losses(lambda x_t, t, labels: model(x_t, t, labels, force_drop_ids=steps["drop0"]),
                                          x, steps["t0"], y, noise=steps["noise0"])
    labels = torch.tensor([1, 1, 7, 7])
    start = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    samples = sample_batch(model.eval(), Sampler("ddpm", 5, "linear", 1000, True), labels, start,
                           torch.Generator().manual_seed(6), cfg_scale=4.0)
    OUT.mkdir(exist_ok=True)
    save_file({k: v.contiguous() for k, v in steps.items()}, OUT / "steps.safetensors")
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, OUT / "weights.safetensors")
    save_file({k: v.contiguous() for k, v in terms.items()}, OUT / "terms.safetensors")
    save_file({"noise": start, "labels": labels, "samples": samples.contiguous()}, OUT / "sample.safetensors")
    print(f"{sum(p.numel() for p in model.parameters())} parameters; losses "
          f"{[round(float(steps[f'loss{s}']), 6) for s in range(STEPS)]}; written to {OUT}")


if __name__ == "__main__":
    main()
