"""The objective boundary (objectives.py) through the real commands: a flow run trains, samples with
every flow sampler, evaluates; official SiT weights sample as SiT's own Euler loop would; the
diffusion objective draws its training randomness exactly as before objectives existed."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import TINY_TRAIN, run_cli
from ditforge.config import TrainConfig
from ditforge.errors import UserError
from ditforge.models import create_model
from ditforge.objectives import (
    DiffusionObjective, FlowObjective, default_sampler, default_steps, objective_from_config, objective_sampler,
)
from ditforge.sampling.generate import generate, start_noise
from ditforge.sampling.load import load_for_sampling
from ditforge.train.step import step_randomness


def test_diffusion_step_randomness_is_unchanged():
    """Timesteps, noise and label drops: randint, randn, rand from one generator seeded by (seed,
    step), in that order (the draws every earlier checkpoint was trained with)."""
    cfg = TrainConfig(global_batch=6, seed=3)
    t, noise, drop = step_randomness(cfg, 7, (1, 8, 8), DiffusionObjective(), torch.device("cpu"))
    g = torch.Generator().manual_seed(3 * 2**32 + 7)
    assert torch.equal(t, torch.randint(0, 1000, (6,), generator=g))
    assert torch.equal(noise, torch.randn((6, 1, 8, 8), generator=g))
    assert torch.equal(drop, torch.rand(6, generator=g) < 0.1)


@pytest.mark.parametrize("kind", ["flow", "meanflow"])
def test_a_setting_this_version_does_not_know_is_a_one_line_error_naming_it(kind):
    """A run written by a newer ditforge records settings this one lacks: eval, sample and train say
    which, in one line (objective_from_config raised a TypeError, an internal error, before;
    flags.section_from_dict). The other sections of the config as well."""
    newer = {"objective": kind, kind: {"target": "semigroup"}}
    for read in (objective_from_config, lambda c: TrainConfig.from_dict(c)):
        with pytest.raises(UserError) as e:
            read(newer)
        said = str(e.value)
        assert said.startswith(f"{kind} settings: 'target' is not a setting of this version") and "\n" not in said
        assert "newer version" in said
    with pytest.raises(UserError, match=f"^{kind} settings: .*time_std"):  # a refused value keeps its own message
        objective_from_config({"objective": kind, kind: {"time_std": -1.0}})
    for section in ("model", "optim", "diffusion", "repa"):
        with pytest.raises(UserError, match=f"^{section} settings: 'newer' is not a setting of this version"):
            TrainConfig.from_dict({section: {"newer": 1}})


def test_config_names_the_objective_and_old_configs_are_diffusion():
    assert isinstance(objective_from_config({}), DiffusionObjective)  # a config from before objectives
    flow = objective_from_config(TrainConfig(objective="flow", flow=dict(path="gvp")).to_dict())
    assert flow == FlowObjective(path="gvp")
    with pytest.raises(UserError, match="'dpm\\+\\+2m' does not sample a flow-objective model"):
        objective_sampler(flow, "dpm++2m", 10)
    with pytest.raises(UserError, match="between 1 and 1000"):
        objective_sampler(DiffusionObjective(), "ddim", 1001)
    assert objective_sampler(flow, None, 2000).name == "euler"  # no upper bound on flow steps
    with pytest.raises(UserError, match="flow settings"):
        TrainConfig(objective="flow", flow=dict(time_distribution="normal"))


def test_every_command_defaults_to_the_fast_sampler_of_its_objective():
    """Issue 30: 20 evaluations of DPM-Solver++(2M) SDE (diffusion) or Euler (flows) where 250
    DDPM steps or 50 Heun steps (100 evaluations) were the defaults; MeanFlow its one jump. `sample`,
    bulk `.npz` and `eval` take `default_sampler` / `default_steps`; the previews resolve theirs in
    the run config, recorded so a rerun keeps them; flags win; a chain shorter than 20 steps is
    sampled at its length."""
    assert (default_sampler("diffusion"), default_steps(DiffusionObjective())) == ("dpm++2m-sde", 20)
    assert (default_sampler("flow"), default_steps(FlowObjective())) == ("euler", 20)
    assert objective_sampler(DiffusionObjective(), None, default_steps(DiffusionObjective())).nfe == 20
    assert objective_sampler(FlowObjective(), None, default_steps(FlowObjective())).nfe == 20
    assert default_steps(DiffusionObjective(diffusion_steps=8)) == 8
    for objective, sampler in (("diffusion", "dpm++2m-sde"), ("flow", "euler")):
        cfg = TrainConfig(objective=objective)
        assert (cfg.sample_sampler, cfg.sample_steps) == (sampler, "20")
        assert TrainConfig.from_dict(cfg.to_dict()).sample_sampler == sampler
    assert TrainConfig(diffusion=dict(diffusion_steps=8, noise_schedule="cosine")).sample_steps == "8"
    cfg = TrainConfig(sample_sampler="ddpm", sample_steps="250")
    assert (cfg.sample_sampler, cfg.sample_steps) == ("ddpm", "250")


@pytest.fixture(scope="module")
def flow_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("flow") / "r"
    run_cli("train", "--run-dir", str(run), "--steps", "4", "--objective", "flow", "--time-dist", "logit-normal",
            "--sample-steps", "3", *TINY_TRAIN)
    return run


def test_flow_run_records_its_objective_and_samples_with_each_solver(flow_run, tmp_path):
    config = json.loads((flow_run / "config.json").read_text())
    assert config["objective"] == "flow" and config["flow"]["time_distribution"] == "logit-normal"
    assert (config["sample_sampler"], config["sample_steps"]) == ("euler", "3")  # recorded resolved
    assert (flow_run / "samples" / "step-0000004.png").is_file()
    for sampler in ("euler", "heun", "ab2", "sde"):
        out = run_cli("sample", str(flow_run), "--sampler", sampler, "--steps", "3", "--per-class", "2", "--cfg", "2",
                      "--cfg-interval", "0.1", "0.9", "--out", str(tmp_path / f"{sampler}.png")).stdout
        assert f"3 {sampler.upper()} steps" in out
    bad = run_cli("sample", str(flow_run), "--sampler", "ddpm", "--out", str(tmp_path / "x.png"), check=False)
    assert bad.returncode == 2 and "does not sample a flow-objective model" in bad.stderr
    bad = run_cli("sample", str(flow_run), "--objective", "diffusion", "--out", str(tmp_path / "x.png"), check=False)
    assert bad.returncode == 2 and "trained with the flow objective" in bad.stderr
    out = run_cli("eval", str(flow_run), "--per-class", "2", "--steps", "3", "--json", str(tmp_path / "e.json")).stdout
    report = json.loads((tmp_path / "e.json").read_text())
    assert "3 EULER steps, 3 evaluations" in out and (report["sampler"], report["nfe"]) == ("euler", 3)
    out = run_cli("eval", str(flow_run), "--per-class", "2", "--steps", "3", "--sampler", "heun", "--no-fid").stdout
    assert "3 HEUN steps, 6 evaluations" in out  # a flag wins over the default


def test_official_sit_weights_sample_as_sit_does(tmp_path):
    """A SiT checkpoint is a flat state dict with DiT's keys; the network sees SiT's time s (0 =
    noise) and predicts u = dx/ds. SiT's Euler ODE loop, written out here, must give our samples."""
    torch.manual_seed(0)
    net = create_model("DiT-Ti/2", input_size=8, in_channels=1, num_classes=10, learn_sigma=True)
    for p in net.parameters():  # random weights, and no zero-initialised output layer
        torch.nn.init.normal_(p, std=0.02)
    torch.save(net.state_dict(), tmp_path / "SiT-Ti-2.pt")
    sm = load_for_sampling(tmp_path / "SiT-Ti-2.pt", "SiT-Ti/2")
    assert isinstance(sm.objective, FlowObjective)
    ours, labels = generate(sm.model, [3, 5], 2, cfg_scale=1.0, steps=4, sampler="euler", seed=9, objective=sm.objective)

    x = start_noise(9, range(4), (1, 8, 8))  # generate's noise
    with torch.no_grad():
        for s in (0.0, 0.25, 0.5, 0.75):
            u = net.eval()(x, torch.full((4,), s), labels)[:, :1]  # SiT's forward drops the sigma channels
            x = x + 0.25 * u
    assert torch.allclose(ours, x, atol=1e-5)
    out = run_cli("sample", str(tmp_path / "SiT-Ti-2.pt"), "--model", "SiT-Ti/2", "--steps", "2", "--per-class", "1",
                  "--out", str(tmp_path / "g.png")).stdout
    assert "2 EULER steps" in out and (tmp_path / "g.png").is_file()
