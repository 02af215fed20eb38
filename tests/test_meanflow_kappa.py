"""MeanFlow's improved training-time guidance (meanflow/objective.py): the kappa term, whose fixed
point is guidance at omega / (1 - kappa), and the noise levels where the guidance applies
(--train-cfg-kappa, --train-cfg-interval; the paper's appendix and the authors' ``guidance_fn``)."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import run_cli
from ditforge.config import TrainConfig
from ditforge.errors import UserError
from ditforge.meanflow import MeanFlowObjective
from ditforge.objectives import check_cfg, default_cfg, objective_from_config

F64 = torch.float64


def _fields(n=4, seed=0):
    """(z, v, u_cond, u_null) (n, 1, 2, 2) float64, t (n,) and labels."""
    g = torch.Generator().manual_seed(seed)
    z, v, u_cond, u_null = (torch.randn(n, 1, 2, 2, generator=g, dtype=F64) for _ in range(4))
    return z, v, u_cond, u_null, torch.tensor([0.2, 0.4, 0.6, 0.8], dtype=F64)[:n], torch.arange(1, n + 1)


class TwoVelocities:
    """A network in our conventions (it returns F = -u) whose instantaneous velocity is `u_cond`
    for a row that keeps its label and `u_null` for a row dropped to the null class; it records
    its calls."""

    def __init__(self, u_cond, u_null):
        self.u_cond, self.u_null, self.calls = u_cond, u_null, []

    def __call__(self, z, s, labels, interval=None, force_drop_ids=None, **_):
        self.calls.append(dict(rows=z.shape[0], s=s, interval=interval, drop=force_drop_ids, grad=torch.is_grad_enabled()))
        reps = z.shape[0] // self.u_cond.shape[0]
        dropped = force_drop_ids.view(-1, 1, 1, 1).bool()
        return -torch.where(dropped, self.u_null.repeat(reps, 1, 1, 1), self.u_cond.repeat(reps, 1, 1, 1))


def test_kappa_mixes_the_models_conditional_and_unconditional_velocities_from_one_doubled_call():
    """v~ = omega v + kappa u(y) + (1 - omega - kappa) u(null), both velocities at h = 0 from one
    no-grad call of the doubled batch (labels kept, then every label dropped); a dropped row keeps v."""
    z, v, u_cond, u_null, t, y = _fields()
    net = TwoVelocities(u_cond, u_null)
    drop = torch.tensor([False, False, True, False])
    out = MeanFlowObjective(train_cfg=1.5, train_cfg_kappa=0.3).guided_velocity(net, z, t, y, v, drop)
    expected = 1.5 * v + 0.3 * u_cond + (1 - 1.5 - 0.3) * u_null
    assert torch.allclose(out[~drop], expected[~drop], rtol=0, atol=1e-12) and torch.equal(out[drop], v[drop])
    (call,) = net.calls
    assert call["rows"] == 8 and not call["grad"]
    assert torch.equal(call["drop"], torch.tensor([0, 0, 0, 0, 1, 1, 1, 1]))
    assert torch.allclose(call["s"], torch.cat([1 - t, 1 - t])) and torch.equal(call["interval"], torch.zeros(8, dtype=F64))


@pytest.mark.parametrize("omega, kappa", [(1.0, 0.5), (1.5, 0.2), (2.0, 0.0), (0.6, 0.7)])
def test_the_targets_fixed_point_is_guidance_at_omega_over_one_minus_kappa(omega, kappa):
    """With the data's conditional velocity v_c = E[v | z_t, y] in place of v (the target is linear
    in v) and the model's conditional velocity at guidance S = omega / (1 - kappa), u(y) = u(null)
    + S (v_c - u(null)), the target equals that velocity: the model that trains on it samples at S."""
    z, v_c, _, u_null, t, y = _fields(seed=1)
    objective = MeanFlowObjective(train_cfg=omega, train_cfg_kappa=kappa)
    scale = omega / (1 - kappa)
    assert objective.guided and objective.built_in_scale == pytest.approx(scale, rel=1e-15)
    guided_u = u_null + scale * (v_c - u_null)
    target = objective.guided_velocity(TwoVelocities(guided_u, u_null), z, t, y, v_c, None)
    assert torch.allclose(target, guided_u, rtol=0, atol=1e-12)
    # and not at another scale: a model guided at omega alone is not the fixed point when kappa != 0
    off = objective.guided_velocity(TwoVelocities(u_null + omega * (v_c - u_null), u_null), z, t, y, v_c, None)
    assert torch.allclose(off, u_null + omega * (v_c - u_null), atol=1e-12) == (kappa == 0)


def test_guidance_applies_only_at_the_noise_levels_of_its_interval():
    """Inside [LO, HI] (t, 0 = data) the mix; outside it the target is v itself (omega 1, kappa 0)."""
    z, v, u_cond, u_null, t, y = _fields()  # t = 0.2, 0.4, 0.6, 0.8
    objective = MeanFlowObjective(train_cfg=2.0, train_cfg_kappa=0.25, train_cfg_interval=(0.3, 0.6))
    out = objective.guided_velocity(TwoVelocities(u_cond, u_null), z, t, y, v, None)
    inside = torch.tensor([False, True, True, False])
    mix = 2.0 * v + 0.25 * u_cond + (1 - 2.0 - 0.25) * u_null
    assert torch.allclose(out[inside], mix[inside], atol=1e-12) and torch.equal(out[~inside], v[~inside])
    # without kappa the same interval applies to the plain guided target (one call: the null class's)
    net = TwoVelocities(u_cond, u_null)
    out = MeanFlowObjective(train_cfg=2.0, train_cfg_interval=(0.3, 0.6)).guided_velocity(net, z, t, y, v, None)
    plain = 2.0 * v - u_null
    assert torch.allclose(out[inside], plain[inside], atol=1e-12) and torch.equal(out[~inside], v[~inside])
    assert [c["rows"] for c in net.calls] == [4]


def test_a_distillation_guides_its_teacher_at_the_built_in_scale_inside_the_interval():
    """--mf-velocity teacher: the teacher's velocities are exact, so the target is the fixed point
    itself, v_T(null) + S (v_T(y) - v_T(null)), S = omega / (1 - kappa) inside the interval, 1 outside."""
    z, _, v_cond, v_null, t, y = _fields(seed=2)
    teacher = TwoVelocities(v_cond, v_null)
    objective = MeanFlowObjective(train_cfg=1.0, train_cfg_kappa=0.5, train_cfg_interval=(0.0, 0.5),
                                  velocity="teacher").with_teacher(teacher)
    out = objective.teacher_velocity(z, t, y, None, None)
    inside = t <= 0.5
    assert torch.allclose(out[inside], (v_null + 2.0 * (v_cond - v_null))[inside], atol=1e-12)
    assert torch.allclose(out[~inside], v_cond[~inside], atol=1e-12)
    everywhere = MeanFlowObjective(train_cfg=0.75, train_cfg_kappa=0.5, velocity="teacher").with_teacher(teacher)
    assert torch.allclose(everywhere.teacher_velocity(z, t, y, None, None), v_null + 1.5 * (v_cond - v_null), atol=1e-12)


def test_a_kappa_model_samples_at_its_built_in_scale_only():
    guided = objective_from_config(dict(objective="meanflow", meanflow=dict(train_cfg=1.0, train_cfg_kappa=0.5)))
    assert guided.guided and default_cfg(guided, 1.5) == 2.0
    check_cfg(guided, 2.0)
    with pytest.raises(UserError, match=r"guidance scale 2 built in \(trained with --train-cfg 1 --train-cfg-kappa 0.5\)"):
        check_cfg(guided, 1.5)
    thirds = MeanFlowObjective(train_cfg=1.0, train_cfg_kappa=0.3)  # 1 / 0.7, as the message prints it
    check_cfg(thirds, float(f"{thirds.built_in_scale:g}"))
    assert TrainConfig.from_dict(dict(objective="meanflow", meanflow=dict(train_cfg_kappa=0.5))).sample_cfg == 2.0


def test_the_interval_reads_back_from_a_runs_json_as_it_was_given():
    given = MeanFlowObjective(train_cfg=2.0, train_cfg_interval=(0.0, 0.7))
    saved = json.loads(json.dumps(TrainConfig.from_dict(dict(objective="meanflow", meanflow=dict(
        train_cfg=2.0, train_cfg_interval=(0.0, 0.7)))).to_dict()))["meanflow"]
    assert saved["train_cfg_interval"] == [0.0, 0.7]
    assert objective_from_config(dict(objective="meanflow", meanflow=saved)) == given


@pytest.mark.parametrize("settings, says", [
    (dict(train_cfg_kappa=1.0), "train_cfg_kappa must be in [0, 1)"),
    (dict(train_cfg_kappa=-0.1), "train_cfg_kappa must be in [0, 1)"),
    (dict(train_cfg=2.0, train_cfg_interval=(0.6, 0.2)), "two noise levels 0 <= LO < HI <= 1"),
    (dict(train_cfg=2.0, train_cfg_interval=(0.0, 1.5)), "two noise levels 0 <= LO < HI <= 1"),
    (dict(train_cfg_interval=(0.0, 0.5)), "limits training-time guidance, and there is none"),
    (dict(train_cfg_max=4.0, train_cfg_interval=(0.0, 0.5)), "not the scale as an input (--train-cfg-max)"),
    (dict(train_cfg_max=4.0, train_cfg_kappa=0.5), "exclude each other"),
])
def test_kappa_and_interval_settings_that_mean_nothing_are_refused_in_one_line(settings, says):
    with pytest.raises(UserError) as e:
        TrainConfig.from_dict(dict(objective="meanflow", meanflow=settings))
    assert says in str(e.value) and "\n" not in str(e.value)


@pytest.mark.slow
def test_a_run_with_kappa_and_an_interval_trains_records_and_samples_at_its_scale(tmp_path):
    """The command a user runs: --train-cfg 1 --train-cfg-kappa 0.5 builds scale 2 into the model,
    its checkpoint records both settings, and `sample` takes scale 2 by default and refuses another."""
    run = tmp_path / "run"
    run_cli("train", "--run-dir", str(run), "--objective", "meanflow", "--data", "digits", "--model", "DiT-Ti/2",
            "--batch-size", "16", "--steps", "2", "--no-progress", "--train-cfg", "1", "--train-cfg-kappa", "0.5",
            "--train-cfg-interval", "0", "0.8", "--mf-flow-share", "0.5")
    state = json.loads((run / "checkpoints" / "step-0000002" / "state.json").read_text())
    assert state["config"]["meanflow"]["train_cfg_kappa"] == 0.5
    assert state["config"]["meanflow"]["train_cfg_interval"] == [0.0, 0.8]
    out = run_cli("sample", str(run), "--classes", "3", "--per-class", "2", "--out", str(tmp_path / "g.png")).stdout
    assert "cfg 2," in out and (tmp_path / "g.png").stat().st_size > 0
    bad = run_cli("sample", str(run), "--cfg", "1.5", "--out", str(tmp_path / "b.png"), check=False)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1
    assert "--train-cfg-kappa 0.5" in bad.stderr and "use --cfg 2" in bad.stderr
