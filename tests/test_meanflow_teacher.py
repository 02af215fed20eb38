"""MeanFlow distilling a trained flow model (`--mf-velocity teacher`, meanflow/objective.py): the
target against the closed form of test_meanflow.py's Gaussian, the teacher's guidance, what the
option needs, and the real commands: a resume that reads the teacher again bit-exactly, a teacher
that is gone or changed refused, two processes giving the weights of one."""

from __future__ import annotations

import shutil

import pytest
import torch

from conftest import run_cli
from test_distributed import torchrun
from test_meanflow import F64, MU, S, ExactNet, _weights, _worst, average_velocity, gaussian_batch, velocity
from ditforge.config import TrainConfig, preset
from ditforge.errors import UserError
from ditforge.meanflow import MeanFlowObjective
from ditforge.objectives import objective_from_config, uses_teacher

Y = torch.zeros(6, dtype=torch.long)


def _teacher(scale: float = 1.0) -> ExactNet:
    """The exact marginal velocity as a teacher: ExactNet at h = 0 is -v(z, t) (F = -u, u(z, t, t) = v)."""
    return ExactNet(scale)


def test_the_teacher_target_at_the_exact_average_velocity_has_zero_residual_where_eps_minus_x_does_not():
    """With the exact instantaneous velocity as the teacher, the target built from the exact average
    velocity equals it on every row (float64), r = t rows included: no noise left in the target. The
    same student against the sample's eps - x has a loss (the conditional velocity's scatter); a
    student 1% off, or a teacher 1% off, has one too."""
    x0, noise, t, r = gaussian_batch()
    times = torch.stack([t, r], 1)
    teacher = _teacher()
    obj = MeanFlowObjective(weight_p=0.0, velocity="teacher").with_teacher(teacher)
    assert obj.training_losses(ExactNet(), x0, times, Y, noise)["loss"].max() < 1e-24
    (call,) = teacher.calls  # one forward of the batch, at h = 0, no label dropped
    assert torch.equal(call["interval"], torch.zeros(6, dtype=F64)) and not call["force_drop_ids"].any()
    sample = MeanFlowObjective(weight_p=0.0).training_losses(ExactNet(), x0, times, Y, noise)["loss"]
    assert sample.min() > 1e-4
    assert obj.training_losses(ExactNet(1.01), x0, times, Y, noise)["loss"].min() > 1e-8
    off = MeanFlowObjective(weight_p=0.0, velocity="teacher").with_teacher(_teacher(1.01))
    assert off.training_losses(ExactNet(), x0, times, Y, noise)["loss"].min() > 1e-8


def test_the_distilled_one_step_map_is_the_teachers_ode_map():
    """The fixed point is the teacher's flow map: one jump with the exact u from t = 1 lands where the
    teacher's ODE does (Euler with many steps of the exact velocity), so a one-step student can at
    best reproduce the teacher's many-step samples (module docstring)."""
    eps = torch.randn(256, 1, 2, 2, generator=torch.Generator().manual_seed(5), dtype=F64)
    one = eps - average_velocity(eps, torch.zeros(256, dtype=F64), torch.ones(256, dtype=F64))
    z, n = eps.clone(), 4000
    for k in range(n, 0, -1):  # Euler from t = 1 to 0 along the exact velocity
        t = torch.full((256,), k / n, dtype=F64)
        z = z - velocity(z, t) / n
    assert (one - z).abs().max() < 1e-3 and torch.allclose(one, MU + S * eps, atol=1e-12)


class LabelNet:
    """A teacher whose velocity depends on the label: F = -(z + label), the null class 10."""

    def __init__(self):
        self.calls = []

    def __call__(self, z, s, y, interval=None, force_drop_ids=None):
        self.calls.append(dict(n=z.shape[0], interval=interval, drop=force_drop_ids, grad=torch.is_grad_enabled()))
        labels = torch.where(force_drop_ids.bool(), torch.full_like(y, 10), y)
        return -(z + labels.view(-1, 1, 1, 1).to(z.dtype))


@pytest.mark.parametrize("scale_input", [False, True])
def test_a_guided_teacher_mixes_its_own_conditional_and_unconditional_velocities(scale_input):
    """omega != 1 (built in, or iMF's per-sample scale): v~ = v_T(null) + omega (v_T(y) - v_T(null)),
    from one no-grad forward of the doubled batch (the labels, then all null); a row whose label the
    step dropped gets v_T(null)."""
    g = torch.Generator().manual_seed(2)
    z, t = torch.randn(4, 1, 2, 2, generator=g), torch.tensor([0.2, 0.4, 0.6, 0.8])
    y, drop = torch.tensor([1, 2, 3, 4]), torch.tensor([False, True, False, False])
    net = LabelNet()
    if scale_input:
        obj, w, omega = MeanFlowObjective(train_cfg_max=4.0, velocity="teacher").with_teacher(net), torch.tensor([1.5, 2.0, 3.0, 1.0]), None
        omega = w.view(-1, 1, 1, 1)
    else:
        obj, w, omega = MeanFlowObjective(train_cfg=3.0, velocity="teacher").with_teacher(net), None, 3.0
    with torch.enable_grad():
        v = obj.teacher_velocity(z, t, y, drop, w)
    v_c, v_u = z + y.view(-1, 1, 1, 1), z + 10
    expected = v_u + omega * (v_c - v_u)
    assert torch.allclose(v[~drop], expected[~drop]) and torch.equal(v[drop], v_u[drop])
    (call,) = net.calls
    assert call["n"] == 8 and not call["grad"] and torch.equal(call["interval"], torch.zeros(8))
    assert torch.equal(call["drop"], torch.tensor([0, 1, 0, 0, 1, 1, 1, 1]))
    unguided = MeanFlowObjective(velocity="teacher").with_teacher(net).teacher_velocity(z, t, y, drop, None)
    assert torch.equal(unguided[~drop], v_c[~drop]) and torch.equal(unguided[drop], v_u[drop]) and net.calls[-1]["n"] == 4


def test_the_teacher_is_bound_at_training_only_and_never_part_of_the_settings():
    """`with_teacher` returns a copy that distils; the settings (what config.json and checkpoints
    hold, what sampling rebuilds) are the same, and an objective without one refuses to train."""
    cfg = dict(objective="meanflow", meanflow=dict(velocity="teacher"))
    plain = objective_from_config(cfg)
    bound = plain.with_teacher(ExactNet())
    assert uses_teacher(plain) and bound == plain and not hasattr(plain, "_teacher")
    x0, noise, t, r = gaussian_batch()
    with pytest.raises(RuntimeError, match="needs the frozen teacher"):
        plain.training_losses(ExactNet(), x0, torch.stack([t, r], 1), Y, noise)
    assert not uses_teacher(objective_from_config(dict(objective="meanflow"))) and not uses_teacher(objective_from_config({}))


@pytest.mark.parametrize("settings, says", [
    (dict(meanflow=dict(velocity="teacher")), "--mf-velocity teacher distils the model the run starts from, and there is none"),
    (dict(meanflow=dict(velocity="teacher", tangent="model"), init_from="x"), "tangent 'model'"),
    (dict(meanflow=dict(velocity="data"), init_from="x"), "velocity must be one of sample, teacher, got 'data'"),
])
def test_what_distillation_needs_is_said_in_one_line(settings, says):
    with pytest.raises(UserError) as e:
        TrainConfig.from_dict(dict(objective="meanflow", **settings))
    assert says in str(e.value) and "\n" not in str(e.value)


# -- the real commands -----------------------------------------------------------------------------

FLOW = ["--data", "digits", "--model", "DiT-Ti/2", "--batch-size", "16", "--no-progress", "--precision", "fp32",
        "--norm", "rms", "--rope", "--objective", "flow", "--steps", "3", "--ckpt-every", "1", "--keep-last", "0",
        "--sample-steps", "1"]
# a fine-tune as users would type it (the model, blocks and flow share come from the source), guided
# by the teacher at 2, with an optimizer state to resume
DISTIL = ["--objective", "meanflow", "--mf-velocity", "teacher", "--train-cfg", "2", "--batch-size", "16",
          "--ckpt-every", "2", "--keep-last", "0", "--no-progress", "--precision", "fp32", "--sample-steps", "1",
          "--optimizer", "sgd", "--lr", "0.05", "--momentum", "0.9"]


@pytest.fixture(scope="module")
def distilled(tmp_path_factory):
    """(flow source run, distillation run of 4 steps from its step-2 checkpoint)."""
    root = tmp_path_factory.mktemp("teacher")
    run_cli("train", "--run-dir", str(root / "flow"), *FLOW)
    source = root / "flow" / "checkpoints" / "step-0000002"
    run = root / "distil"
    out = run_cli("train", "--run-dir", str(run), "--init-from", str(source), "--steps", "4", *DISTIL).stdout
    assert "mf-flow-share 0.25: a MeanFlow fine-tune of a flow model" in out
    return source, run


@pytest.mark.slow
def test_a_distillation_resumes_with_the_same_command_bit_exactly(distilled, tmp_path):
    """The command that started the fine-tune resumes it (its flow share, model and blocks were taken
    from the source at the start and are kept), reads the teacher again from the recorded checkpoint,
    and ends with the weights of the run that was never stopped. The teacher matters: the step
    after the first checkpoint differs from a fine-tune without it."""
    source, straight = distilled
    run = tmp_path / "resumed"
    shutil.copytree(straight, run)
    shutil.rmtree(run / "checkpoints" / "step-0000004")
    out = run_cli("train", "--run-dir", str(run), "--init-from", str(source), "--steps", "4", *DISTIL).stdout
    assert "resumed from" in out and "flow_share 0.25: kept from" in out
    for name in ("model", "ema", "optimizer"):
        assert _worst(_weights(straight, 4, name), _weights(run, 4, name)) == 0.0, name
    plain = tmp_path / "plain"
    run_cli("train", "--run-dir", str(plain), "--init-from", str(source), "--steps", "2",
            *[a for a in DISTIL if a not in ("--mf-velocity", "teacher")])
    assert _worst(_weights(straight, 2), _weights(plain, 2)) > 1e-4


@pytest.mark.slow
def test_a_teacher_that_is_gone_or_changed_is_refused_at_resume(distilled, tmp_path):
    """A resume would otherwise go on towards another teacher: one line naming the checkpoint, and
    the run's checkpoints untouched."""
    source, straight = distilled
    moved = tmp_path / "flow"
    shutil.copytree(source.parent.parent, moved)
    run = tmp_path / "run"
    run_cli("train", "--run-dir", str(run), "--init-from", str(moved / "checkpoints" / "step-0000002"), "--steps", "2", *DISTIL)
    before = _weights(run, 2)
    mine = moved / "checkpoints" / "step-0000002"
    shutil.rmtree(mine)
    shutil.copytree(moved / "checkpoints" / "step-0000003", mine)  # other weights where the teacher was
    bad = run_cli("train", "--run-dir", str(run), "--init-from", str(mine), "--steps", "4", *DISTIL, check=False)
    lines = bad.stderr.strip().splitlines()
    assert bad.returncode == 2 and len(lines) == 1 and "has other weights now" in lines[0] and str(mine) in lines[0]
    shutil.rmtree(mine)
    gone = run_cli("train", "--run-dir", str(run), "--init-from", str(mine), "--steps", "4", *DISTIL, check=False)
    assert gone.returncode == 2 and "is gone" in gone.stderr and len(gone.stderr.strip().splitlines()) == 1
    assert _worst(before, _weights(run, 2)) == 0.0 and not (run / "checkpoints" / "step-0000004").exists()


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_distil_to_the_weights_of_one(distilled, tmp_path, parallel):
    """Rank 0 reads the teacher and broadcasts it: a rank with another teacher (its own random
    weights) would train its half of the batch towards another target. Under FSDP the student is
    sharded and the teacher stays a whole frozen module on each rank, filled the same way."""
    source, straight = distilled
    run = tmp_path / parallel
    torchrun("train", "--run-dir", str(run), "--init-from", str(source), "--parallel", parallel, "--steps", "2", *DISTIL)
    for name, tol in (("model", 1e-8), ("ema", 1e-8), ("optimizer", 1e-6)):  # momentum: fp32 sums of halves, 3e-8 seen
        assert _worst(_weights(straight, 2, name), _weights(run, 2, name)) <= tol, name


@pytest.mark.slow
def test_a_class_the_teacher_never_learned_is_refused(distilled, tmp_path):
    """A class of the data that the source lacks starts at its null row: the teacher would distil
    it as the unconditional model. One line naming the class; the sample's velocity still fine-tunes."""
    from test_init_from import _folder

    source, _ = distilled
    folder = _folder(tmp_path / "data", ["3", "zebra"], "L", per_class=8)
    bad = run_cli("train", "--run-dir", str(tmp_path / "run"), "--data", str(folder), "--init-from", str(source),
                  "--steps", "1", *DISTIL, check=False)
    lines = bad.stderr.strip().splitlines()
    assert bad.returncode == 2 and len(lines) == 1 and "class(es) 'zebra'" in lines[0], bad.stderr
    plain = [a for a in DISTIL if a not in ("--mf-velocity", "teacher")]
    run_cli("train", "--run-dir", str(tmp_path / "plain"), "--data", str(folder), "--init-from", str(source), "--steps", "1", *plain)


@pytest.mark.slow
def test_a_fine_tune_of_a_distilled_model_takes_its_settings_but_not_its_teacher(distilled, tmp_path):
    """`--init-from` a distilled run adopts its network and MeanFlow settings (guidance, share), but
    how it was trained from its own source is not this run's: the sample's velocity, no teacher."""
    import json

    _, run = distilled
    out = run_cli("train", "--run-dir", str(tmp_path / "again"), "--init-from", str(run), "--steps", "1", "--batch-size", "16",
                  "--no-progress", "--precision", "fp32", "--sample-steps", "1").stdout
    saved = json.loads((tmp_path / "again" / "config.json").read_text())
    assert saved["objective"] == "meanflow" and saved["meanflow"]["train_cfg"] == 2.0 and saved["meanflow"]["flow_share"] == 0.25
    assert saved["meanflow"]["velocity"] == "sample" and "velocity" not in out


@pytest.mark.slow
def test_a_distillation_draws_wider_times_with_the_plain_error_unless_told(distilled, tmp_path):
    """A fresh distillation, unguided or with one scale built in (the fixture's --train-cfg 2),
    takes DISTIL_TIME_STD and DISTIL_WEIGHT_P, Muon (DISTIL_OPTIMIZER; AdamW under --parallel fsdp)
    and at most its optimizer's DISTIL_MAX_LR, and says so; a flag wins over each (the fixture's
    --optimizer sgd --lr 0.05), with the scale as an input (--train-cfg-max) too; the command that
    started it resumes it with them."""
    import json

    from ditforge.meanflow.init import DISTIL_MAX_LR, DISTIL_OPTIMIZER, DISTIL_TIME_STD, DISTIL_WEIGHT_P

    source, guided = distilled
    paper = MeanFlowObjective()
    assert (DISTIL_TIME_STD, DISTIL_WEIGHT_P) != (paper.time_std, paper.weight_p)
    at, lr = DISTIL.index("--train-cfg"), DISTIL.index("--lr")
    unguided = [a for i, a in enumerate(DISTIL) if i not in (at, at + 1, lr, lr + 1)]  # the tiny preset's rate, 1e-3
    assert preset("tiny")["optim"]["lr"] > DISTIL_MAX_LR["sgd"] and DISTIL_OPTIMIZER == "muon"

    def settings(run) -> tuple[float, float, str, float]:
        config = json.loads((run / "config.json").read_text())
        return config["meanflow"]["time_std"], config["meanflow"]["weight_p"], config["optim"]["optimizer"], config["optim"]["lr"]

    assert settings(guided) == (DISTIL_TIME_STD, DISTIL_WEIGHT_P, "sgd", 0.05)
    scale_input = tmp_path / "scale-input"
    unguided_cmd = [a for i, a in enumerate(DISTIL) if i not in (at, at + 1)]
    out = run_cli("train", "--run-dir", str(scale_input), "--init-from", str(source), *unguided_cmd, "--train-cfg-max", "3",
                  "--steps", "1").stdout
    assert settings(scale_input) == (DISTIL_TIME_STD, DISTIL_WEIGHT_P, "sgd", 0.05)
    assert f"mf-time-std {DISTIL_TIME_STD:g}: a distillation" in out
    run = tmp_path / "unguided"  # --optimizer sgd given: its cap
    command = ["train", "--run-dir", str(run), "--init-from", str(source), *unguided]
    out = run_cli(*command, "--steps", "2").stdout
    assert settings(run) == (DISTIL_TIME_STD, DISTIL_WEIGHT_P, "sgd", DISTIL_MAX_LR["sgd"])
    assert f"mf-time-std {DISTIL_TIME_STD:g}: a distillation" in out and f"mf-weight-p {DISTIL_WEIGHT_P:g}:" in out
    assert f"lr {DISTIL_MAX_LR['sgd']:g}: a distillation with sgd takes at most" in out and "optimizer muon" not in out
    out = run_cli(*command, "--steps", "3").stdout  # resumes: the settings kept from its config, not "a different run"
    assert settings(run) == (DISTIL_TIME_STD, DISTIL_WEIGHT_P, "sgd", DISTIL_MAX_LR["sgd"])
    assert (run / "checkpoints" / "step-0000003").is_dir() and f"lr {DISTIL_MAX_LR['sgd']:g}: kept from" in out
    told = tmp_path / "told"
    out = run_cli("train", "--run-dir", str(told), "--init-from", str(source), *unguided, "--steps", "1",
                  "--mf-weight-p", "0.5", "--lr", "0.05").stdout
    assert settings(told) == (DISTIL_TIME_STD, 0.5, "sgd", 0.05) and "mf-weight-p" not in out and "lr 0" not in out
    at = unguided.index("--optimizer")
    muon = tmp_path / "muon"  # no --optimizer: Muon, at its own cap
    command = ["train", "--run-dir", str(muon), "--init-from", str(source), *[a for i, a in enumerate(unguided) if not at <= i < at + 4]]
    out = run_cli(*command, "--steps", "1").stdout
    assert settings(muon) == (DISTIL_TIME_STD, DISTIL_WEIGHT_P, "muon", DISTIL_MAX_LR["muon"])
    assert "optimizer muon: a distillation" in out
    out = run_cli(*command, "--steps", "2").stdout  # the same command resumes it with Muon
    assert settings(muon)[2:] == ("muon", DISTIL_MAX_LR["muon"]) and (muon / "checkpoints" / "step-0000002").is_dir()
    assert "optimizer muon: kept from" in out
    sharded = tmp_path / "fsdp"  # Muon needs whole matrices: under --parallel fsdp AdamW, at its cap
    run_cli(*command[:2], str(sharded), *command[3:], "--steps", "1", "--parallel", "fsdp")
    assert settings(sharded)[2:] == ("adamw", DISTIL_MAX_LR["adamw"])

    from ditforge.cli import auto_defaults, build_parser, config_from_args
    from ditforge.train.auto import CPU_LR

    def chosen(*flags: str) -> tuple[str, float]:  # MNIST, where train chooses a CPU's rate (2e-3) for a plain run
        args = build_parser().parse_args([*command[:2], str(tmp_path / "mnist"), *command[3:], "--data", "mnist", "--steps", "1", *flags])
        cfg, _ = auto_defaults(args, config_from_args(args))
        return cfg.optim.optimizer, cfg.optim.lr

    assert CPU_LR > max(DISTIL_MAX_LR.values())  # the cap holds against the device's choice too
    assert chosen() == ("muon", DISTIL_MAX_LR["muon"]) and chosen("--optimizer", "adamw") == ("adamw", DISTIL_MAX_LR["adamw"])
    assert chosen("--lr", "3e-3") == ("muon", 3e-3)


@pytest.mark.slow
def test_a_hub_export_of_a_guided_distillation_keeps_its_guidance_scale(distilled, tmp_path):
    """The hub folder's objective record holds MeanFlow's settings: its built-in scale 2 is the
    default `--cfg` of `sample HUB`, as of the run (it was lost, and the folder sampled at cfg 4)."""
    _, run = distilled
    hub = tmp_path / "hub"
    run_cli("export", str(run), "--format", "hub", "--out", str(hub))
    out = run_cli("sample", str(hub), "--steps", "1", "--classes", "3", "--per-class", "1", "--out", str(tmp_path / "g.png")).stdout
    assert "cfg 2," in out and "1 MEANFLOW steps" in out
