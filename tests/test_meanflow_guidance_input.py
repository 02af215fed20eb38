"""The guidance scale as a network input (improved MeanFlow, iMF, arXiv 2512.02012; `--train-cfg-max
S`): the network's third embedder, the scales drawn at training, iMF's guided target and tangent
against their algebra and the closed form, sampling at any scale in [1, S] in one evaluation, the
start from a flow or MeanFlow model, and the real commands."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import run_cli
from test_meanflow import ExactNet, _randomized, average_velocity, gaussian_batch, velocity
from ditforge.config import TrainConfig
from ditforge.errors import UserError
from ditforge.meanflow import GUIDANCE_PREFIX, MeanFlowObjective, added_embedders, flow_state_for_meanflow
from ditforge.models import create_model
from ditforge.objectives import check_cfg, default_cfg, model_options, objective_from_config
from ditforge.sampling.generate import choose_sampler, sample_batch

IMF = MeanFlowObjective(train_cfg_max=4.0)


def _dit(**kw):
    return create_model("DiT-Ti/2", input_size=4, in_channels=1, num_classes=3, learn_sigma=False, **kw)


def test_the_scale_embedder_starts_at_zero_adds_only_its_keys_and_is_counted():
    from ditforge.bench import forward_macs, parameter_count
    from ditforge.models import count_parameters

    torch.manual_seed(0)
    meanflow = _randomized(_dit(interval_embedding=True))
    torch.manual_seed(0)
    imf = _dit(interval_embedding=True, guidance_embedding=True)
    extra = sorted(set(imf.state_dict()) - set(meanflow.state_dict()))
    assert extra == [f"{GUIDANCE_PREFIX}mlp.{i}.{k}" for i in (0, 2) for k in ("bias", "weight")]
    imf.load_state_dict({**meanflow.state_dict(), **added_embedders(imf.state_dict(), meanflow.state_dict())})
    x, t, y, h = torch.randn(3, 1, 4, 4), torch.rand(3), torch.tensor([0, 1, 3]), torch.tensor([0.0, 0.2, 0.7])
    with torch.no_grad():
        for w in (None, torch.tensor([1.0, 2.5, 4.0])):  # w_emb = 0 at the start: any scale, the same network
            assert torch.equal(imf.eval()(x, t, y, interval=h, guidance=w), meanflow.eval()(x, t, y, interval=h))
    with pytest.raises(ValueError, match="takes no guidance scale"):
        meanflow(x, t, y, interval=h, guidance=torch.ones(3))
    d = 192
    assert parameter_count(imf) == count_parameters(imf) == count_parameters(meanflow) + 256 * d + d * d + 2 * d
    assert forward_macs(imf) == forward_macs(meanflow) + 256 * d + d * d
    assert model_options(IMF) == {"interval_embedding": True, "guidance_embedding": True}
    assert model_options(MeanFlowObjective()) == {"interval_embedding": True}


def test_the_jvp_holds_the_scale_fixed_and_the_scale_moves_the_output():
    """Trained weights in w_embedder: the output depends on omega, the JVP along (dx, dt, dh) equals
    a float64 central difference with omega held fixed."""
    torch.manual_seed(1)
    model = _randomized(_dit(interval_embedding=True, guidance_embedding=True)).double().eval()
    g = torch.Generator().manual_seed(2)
    x, dx = torch.randn(2, 1, 4, 4, generator=g, dtype=torch.float64), torch.randn(2, 1, 4, 4, generator=g, dtype=torch.float64)
    s, h, y, w = torch.tensor([0.3, 0.6], dtype=torch.float64), torch.tensor([0.2, 0.1], dtype=torch.float64), torch.tensor([0, 2]), torch.tensor([1.5, 3.0], dtype=torch.float64)
    ds, dh = -torch.ones(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64)
    with torch.no_grad():
        out, d_out = model(x, s, y, interval=h, guidance=w, tangents=(dx, ds, dh))
        eps = 1e-6
        plus = model(x + eps * dx, s + eps * ds, y, interval=h + eps * dh, guidance=w)
        minus = model(x - eps * dx, s - eps * ds, y, interval=h - eps * dh, guidance=w)
        assert torch.allclose(d_out, (plus - minus) / (2 * eps), atol=1e-7, rtol=1e-6)
        assert (model(x, s, y, interval=h, guidance=w + 1) - out).abs().max() > 1e-6


def test_scales_are_drawn_after_the_times_log_uniform_on_one_to_s():
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    times = MeanFlowObjective().sample_time(40_000, g1, torch.device("cpu"))
    with_scale = IMF.sample_time(40_000, g2, torch.device("cpu"))
    assert with_scale.shape == (40_000, 3) and torch.equal(with_scale[:, :2], times)  # the times of a run without it
    w = with_scale[:, 2].double()
    assert bool(((w >= 1) & (w <= 4)).all())
    log_share = torch.log(w) / math.log(4.0)  # uniform on [0, 1) for a log-uniform scale
    assert abs(log_share.mean().item() - 0.5) < 0.01 and abs(log_share.std().item() - (1 / 12) ** 0.5) < 0.01


def test_the_target_is_imf_guidance_from_one_doubled_no_grad_call():
    """v~ = v + (1 - 1/w)(v_c - v_u), tangent v_c: v_c the network at (y, w), v_u at (null, 1), both at
    h = 0, from one doubled batch without gradient; a dropped row keeps v and runs along v_u."""
    g = torch.Generator().manual_seed(4)
    n = 4
    z, v = torch.randn(n, 1, 2, 2, generator=g, dtype=torch.float64), torch.randn(n, 1, 2, 2, generator=g, dtype=torch.float64)
    v_c, v_u = torch.randn(n, 1, 2, 2, generator=g, dtype=torch.float64), torch.randn(n, 1, 2, 2, generator=g, dtype=torch.float64)
    t, y, w = torch.tensor([0.2, 0.4, 0.6, 0.8], dtype=torch.float64), torch.tensor([1, 2, 0, 1]), torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    calls = []

    def net(z_, s, labels, interval=None, force_drop_ids=None, guidance=None):
        calls.append(dict(s=s, interval=interval, drop=force_drop_ids, guidance=guidance, grad=torch.is_grad_enabled(),
                          labels=labels))
        return -torch.cat([v_c, v_u])  # F = -u: conditional rows first, then the null ones

    drop = torch.tensor([False, False, True, False])
    target, tangent = IMF.scale_conditioned_velocity(net, z, t, y, v, w, drop)
    keep = ~drop
    expected = v + (1 - 1 / w).view(-1, 1, 1, 1) * (v_c - v_u)
    assert torch.allclose(target[keep], expected[keep]) and torch.equal(target[drop], v[drop])
    assert torch.equal(tangent[keep], v_c[keep]) and torch.equal(tangent[drop], v_u[drop])
    assert torch.equal(target[0], v[0])  # w = 1: no guidance
    (call,) = calls
    assert not call["grad"] and torch.equal(call["interval"], torch.zeros(2 * n, dtype=torch.float64))
    assert torch.equal(call["drop"], torch.tensor([0] * n + [1] * n)) and torch.equal(call["labels"], torch.cat([y, y]))
    assert torch.equal(call["guidance"], torch.cat([w, torch.ones(n, dtype=torch.float64)]))
    assert torch.allclose(call["s"], torch.cat([1 - t, 1 - t]))
    # the fixed point: a network whose conditional velocity at w is already guided, v_u + w (E[v] - v_u),
    # and the expected velocity in place of the sample's, give the target v_c itself: guidance at scale w
    e_v = torch.randn(n, 1, 2, 2, generator=g, dtype=torch.float64)
    guided = v_u + w.view(-1, 1, 1, 1) * (e_v - v_u)
    calls.clear()
    target, _ = IMF.scale_conditioned_velocity(lambda *a, **k: -torch.cat([guided, v_u]), z, t, y, e_v, w, None)
    assert torch.allclose(target, guided, atol=1e-13, rtol=0)


def test_with_exact_fields_the_scale_input_target_has_zero_residual():
    """One class equal to the data: v_c = v_u = the exact velocity for every scale, so the guided
    target is the MeanFlow identity along the network's own velocity: zero residual (float64), the
    scale passed to every call of the network."""
    x0, noise, t, r = gaussian_batch()
    w = torch.tensor([1.0, 1.5, 2.0, 2.5, 3.0, 4.0], dtype=torch.float64)
    seen = []

    class ScaledExactNet(ExactNet):
        def __call__(self, z, s, y, guidance=None, **kw):
            seen.append(guidance)
            return super().__call__(z, s, y, **kw)

    net = ScaledExactNet()
    y = torch.zeros(6, dtype=torch.long)
    tt = t.view(-1, 1, 1, 1)
    z = (1 - tt) * x0 + tt * noise
    v = velocity(z, t)
    target_v, tangent = IMF.scale_conditioned_velocity(net, z, t, y, v, w, None)
    assert torch.allclose(target_v, v, atol=1e-13) and torch.allclose(tangent, v, atol=1e-13)
    u, u_tgt = IMF.prediction_and_target(net, z, r, t, y, target_v, tangent=tangent, guidance=w)
    assert torch.allclose(u, average_velocity(z, r, t), atol=1e-14, rtol=0) and (u - u_tgt).abs().max() < 1e-12
    assert all(g is not None for g in seen) and torch.equal(seen[-1], w)
    losses = IMF.training_losses(net, x0, torch.stack([t, r, w], 1), y, noise)
    assert losses["loss"].shape == (6,) and torch.isfinite(losses["loss"]).all()


def test_the_model_tangent_runs_the_jvp_along_the_networks_own_velocity():
    """--mf-tangent model (iMF): the target v - (t - r) du/dt with du/dt along the network's own
    velocity u(z_t, t, t), from one more no-grad call at h = 0 (float64 central difference of the
    closed form along the exact velocity); the default runs along the sample's v."""
    x0, noise, t, r = gaussian_batch()
    y = torch.zeros(6, dtype=torch.long)
    tt, h = t.view(-1, 1, 1, 1), (t - r).view(-1, 1, 1, 1)
    z, v = (1 - tt) * x0 + tt * noise, noise - x0
    eps = 1e-6
    for tangent, along in (("model", velocity(z, t)), ("sample", v)):
        net = ExactNet()
        losses = MeanFlowObjective(weight_p=0.0, tangent=tangent).training_losses(net, x0, torch.stack([t, r], 1), y, noise)
        du_dt = (average_velocity(z + eps * along, r, t + eps) - average_velocity(z - eps * along, r, t - eps)) / (2 * eps)
        expected = ((average_velocity(z, r, t) - (v - h * du_dt)) ** 2).mean(dim=(1, 2, 3))
        assert torch.allclose(losses["loss"], expected, rtol=1e-7, atol=1e-12), tangent
        no_grad_calls = [c for c in net.calls if not c["tangents"]]
        assert len(no_grad_calls) == (1 if tangent == "model" else 0)
    with pytest.raises(ValueError, match="tangent must be one of sample, model"):
        MeanFlowObjective(tangent="noise")


def test_one_evaluation_at_any_scale_in_range_and_the_refusals():
    torch.manual_seed(0)
    model = _randomized(_dit(interval_embedding=True, guidance_embedding=True)).eval()
    noise, y, ones = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(8)), torch.tensor([0, 1, 2]), torch.ones(3)
    for cfg in (1.0, 2.5, 4.0):
        with torch.no_grad():
            u = -model(noise, 0 * ones, y, interval=ones, guidance=torch.full((3,), cfg))[:, :1]
        sampler = choose_sampler(model, IMF, 1, cfg, None)
        assert sampler.guidance_scale(cfg) == 1.0 and sampler.guidance_input(cfg) == cfg
        assert torch.allclose(sample_batch(model, sampler, y, noise, torch.Generator(), cfg), noise - u, atol=1e-6)
    for bad in (0.5, 4.5):
        with pytest.raises(UserError, match=r"trained on \[1, 4\].*not " + str(bad)):
            check_cfg(IMF, bad)
    assert (default_cfg(IMF, 1.5), default_cfg(IMF, 6.0), default_cfg(MeanFlowObjective(train_cfg_max=3), 4.0)) == (1.5, 4.0, 3.0)
    assert choose_sampler(model, MeanFlowObjective(), 1, 2.0, None).guidance_input(2.0) is None


@pytest.mark.parametrize("settings, says", [
    (dict(meanflow=dict(train_cfg_max=4.0, train_cfg=2.0)), "exclude each other"),
    (dict(meanflow=dict(train_cfg_max=0.5)), "train_cfg_max (the largest guidance scale input) must be > 1"),
    (dict(meanflow=dict(train_cfg_max=4.0), model=dict(class_dropout_prob=0.0)), "--train-cfg-max 4 needs"),
    (dict(meanflow=dict(train_cfg_max=3.0), sample_cfg=3.5), "--sample-cfg: this MeanFlow model takes the guidance"),
])
def test_settings_that_cannot_train_are_refused_in_one_line(settings, says):
    with pytest.raises(UserError) as e:
        TrainConfig.from_dict(dict(objective="meanflow", **settings))
    assert says in str(e.value) and "\n" not in str(e.value)
    assert TrainConfig.from_dict(dict(objective="meanflow", meanflow=dict(train_cfg_max=3.0))).sample_cfg == 3.0


def test_a_flow_or_meanflow_model_starts_an_imf_model_at_its_own_outputs():
    torch.manual_seed(3)
    flow = _randomized(_dit())
    imf = _dit(interval_embedding=True, guidance_embedding=True)
    state = flow_state_for_meanflow(flow.state_dict(), imf)
    assert state[f"{GUIDANCE_PREFIX}mlp.2.weight"].abs().max() == 0 and state["h_embedder.mlp.2.weight"].abs().max() == 0
    imf.load_state_dict(state)
    x, t, y = torch.randn(2, 1, 4, 4), torch.rand(2), torch.tensor([0, 1])
    with torch.no_grad():
        assert torch.equal(imf.eval()(x, t, y, interval=torch.tensor([0.3, 0.0]), guidance=torch.tensor([2.0, 3.0])),
                           flow.eval()(x, t, y))
    assert added_embedders(imf.state_dict(), imf.state_dict()) == {}  # nothing added to a model that has them


@pytest.mark.slow
def test_train_then_sample_at_two_scales_from_one_model(tmp_path):
    run = tmp_path / "imf"
    run_cli("train", "--run-dir", str(run), "--objective", "meanflow", "--train-cfg-max", "3", "--mf-flow-share", "0.5",
            "--data", "digits", "--model", "DiT-Ti/4", "--batch-size", "8", "--steps", "2", "--log-every", "1",
            "--sample-steps", "1", "--no-progress")
    state = json.loads((run / "checkpoints" / "step-0000002" / "state.json").read_text())
    assert state["model_args"]["guidance_embedding"] is True and state["config"]["meanflow"]["train_cfg_max"] == 3.0
    assert state["config"]["sample_cfg"] == 3.0  # the previews: 4 at most the largest trained scale
    for cfg in ("1.5", "3"):
        out = run_cli("sample", str(run), "--cfg", cfg, "--classes", "1", "--per-class", "2",
                      "--out", str(tmp_path / f"{cfg}.png")).stdout
        assert f"cfg {cfg}, 1 MEANFLOW steps" in out and (tmp_path / f"{cfg}.png").stat().st_size > 0
    bad = run_cli("sample", str(run), "--cfg", "4", "--out", str(tmp_path / "b.png"), check=False)
    assert bad.returncode == 2 and "trained on [1, 3]" in bad.stderr and not (tmp_path / "b.png").exists()
    assert objective_from_config(state["config"]).guidance_input
