"""MeanFlow (meanflow/, models/dit.py's interval input): the loss, the JVP and the sampler against
closed forms, and the real commands end to end.

The Gaussian case: data x ~ N(mu, s^2) (per element) on the linear path z_t = (1 - t) x + t eps
has marginals N((1 - t) mu, S_t^2), S_t^2 = (1 - t)^2 s^2 + t^2, and the exact (deterministic ODE)
trajectory through z_t is z_r = (1 - r) mu + (S_r / S_t)(z_t - (1 - t) mu). So the instantaneous
velocity is v(z, t) = -mu + (S_t' / S_t)(z - (1 - t) mu) and the average velocity over [r, t] is
u(z_t, r, t) = (z_t - z_r) / (t - r); one jump from t = 1 maps the noise eps to mu + s eps exactly.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import run_cli
from test_distributed import torchrun
from ditforge.config import TrainConfig
from ditforge.diffusion.gaussian import mean_flat
from ditforge.errors import UserError
from ditforge.flow import FlowObjective
from ditforge.meanflow import (
    MeanFlowObjective, MeanFlowSampler, flow_state_for_meanflow, interval_embedder_state, load_flow_weights,
)
from ditforge.meanflow.objective import sample_time_pairs
from ditforge.models import create_model
from ditforge.objectives import (check_cfg, default_cfg, default_steps, model_options, objective_from_config, objective_of_run,
                                 samplers_of)
from ditforge.sampling.generate import choose_sampler, sample_batch
from ditforge.train.device import autocast
from ditforge.train.distributed import Dist
from ditforge.train.step import TrainStep

MU, S = 0.6, 0.4
F64 = torch.float64


# -- the closed form -----------------------------------------------------------------------------


def sigma(t: torch.Tensor) -> torch.Tensor:
    return ((1 - t) ** 2 * S**2 + t**2).sqrt()


def velocity(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The marginal velocity v(z, t) = dz/dt of the Gaussian (module docstring); t (N,)."""
    t = t.view(-1, 1, 1, 1)
    dsigma = (t - (1 - t) * S**2) / sigma(t)
    return -MU + dsigma / sigma(t) * (z - (1 - t) * MU)


def average_velocity(z: torch.Tensor, r: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """u(z_t, r, t) = (z_t - z_r) / (t - r) along the exact trajectory; v where r = t."""
    tt, rr = t.view(-1, 1, 1, 1), r.view(-1, 1, 1, 1)
    z_r = (1 - rr) * MU + sigma(rr) / sigma(tt) * (z - (1 - tt) * MU)
    gap = torch.where(tt > rr, tt - rr, torch.ones_like(tt))
    return torch.where(tt > rr, (z - z_r) / gap, velocity(z, t))


class ExactNet:
    """The exact average velocity in our network's conventions (meanflow/objective.py): it sees
    s = 1 - t and h = t - r and returns F = -u; with ``tangents`` also dF (torch.func.jvp, float64),
    0 on rows outside ``tangent_rows``. ``scale`` != 1 makes it wrong on purpose."""

    def __init__(self, scale: float = 1.0):
        self.scale, self.calls = scale, []

    def net(self, z, s, h):
        return -self.scale * average_velocity(z, (1 - s) - h, 1 - s)

    def __call__(self, z, s, y, interval=None, tangents=None, tangent_rows=None, force_drop_ids=None):
        self.calls.append(dict(interval=interval, force_drop_ids=force_drop_ids, tangents=tangents is not None))
        h = torch.zeros_like(s) if interval is None else interval
        if tangents is None:
            return self.net(z, s, h)
        out, d = torch.func.jvp(self.net, (z, s, h), tangents)
        if tangent_rows is not None:
            d = torch.where(tangent_rows.view(-1, 1, 1, 1), d, torch.zeros_like(d))
        return out, d


def gaussian_batch(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = MU + S * torch.randn(n, 1, 2, 2, generator=g, dtype=F64)
    noise = torch.randn(n, 1, 2, 2, generator=g, dtype=F64)
    t = torch.tensor([0.9, 0.7, 0.5, 0.35, 0.8, 0.2], dtype=F64)[:n]
    r = torch.tensor([0.1, 0.7, 0.2, 0.0, 0.55, 0.05], dtype=F64)[:n]  # one row r = t
    return x0, noise, t, r


def test_the_target_at_the_exact_average_velocity_has_zero_residual():
    """MeanFlow identity (Eq. 6) in float64: u_tgt = v - (t - r)(v dz u + dt u) built by the objective
    from the exact u and the marginal velocity v equals u itself; a u 1% off does not pass."""
    obj = MeanFlowObjective()
    x0, noise, t, r = gaussian_batch()
    z = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * noise
    v = velocity(z, t)
    assert torch.allclose(average_velocity(z, t, t), v) and not torch.allclose(average_velocity(z, r, t), v)
    u, u_tgt = obj.prediction_and_target(ExactNet(), z, r, t, torch.zeros(6, dtype=torch.long), v)
    assert torch.allclose(u, average_velocity(z, r, t), atol=1e-14, rtol=0)
    assert (u - u_tgt).abs().max() < 1e-12
    u, u_tgt = obj.prediction_and_target(ExactNet(scale=1.01), z, r, t, torch.zeros(6, dtype=torch.long), v)
    assert (u - u_tgt)[t > r].abs().min() > 1e-4


def test_the_loss_is_the_squared_error_to_the_identity_target_of_the_conditional_velocity():
    """training_losses (p = 0) from data and noise: z_t on the linear path, v = eps - x, and the target
    v - (t - r) du/dt with du/dt by central differences of the closed form along (dz, dt) = (v, 1):
    checks the tangents' signs in the network's time s = 1 - t and interval h = t - r."""
    obj = MeanFlowObjective(weight_p=0.0)
    x0, noise, t, r = gaussian_batch()
    losses = obj.training_losses(ExactNet(), x0, torch.stack([t, r], 1), torch.zeros(6, dtype=torch.long), noise)
    tt = t.view(-1, 1, 1, 1)
    z, v = (1 - tt) * x0 + tt * noise, noise - x0
    eps = 1e-6
    du_dt = (average_velocity(z + eps * v, r, t + eps) - average_velocity(z - eps * v, r, t - eps)) / (2 * eps)
    target = v - (t - r).view(-1, 1, 1, 1) * du_dt
    expected = mean_flat((average_velocity(z, r, t) - target) ** 2)
    assert torch.allclose(losses["loss"], expected, rtol=1e-7, atol=1e-12)
    assert torch.equal(losses["loss"], losses["u_mse"])  # p = 0: no weight


@pytest.mark.parametrize("steps", [1, 3])
def test_jumps_with_the_exact_average_velocity_return_the_data_distribution(steps):
    """z_0 = z_1 - u(z_1, 0, 1) (and N equal jumps) maps eps to mu + s eps: exactly, and so a
    sample of the data's mean and variance."""
    noise = torch.randn(20_000, 1, 2, 2, generator=torch.Generator().manual_seed(3), dtype=F64)
    net = ExactNet()
    x = MeanFlowSampler("meanflow", steps)(lambda z, s, interval: net(z, s, None, interval=interval), noise)
    assert len(net.calls) == steps  # one evaluation per jump
    assert torch.allclose(x, MU + S * noise, atol=1e-12, rtol=0)
    n = noise.numel()
    assert abs(x.mean().item() - MU) < 4 * S / n**0.5
    assert abs(x.var().item() / S**2 - 1) < 4 * (2 / n) ** 0.5


def test_the_model_tangent_runs_the_jvp_along_the_networks_own_velocity_on_the_jvp_rows_alone():
    """--mf-tangent model (iMF): with the exact u, whose instantaneous velocity is the marginal
    v(z, t), the identity holds along that velocity, so u_tgt = u + (v_sample - v(z, t)) and the
    loss (p = 0) is |v(z, t) - v_sample|^2 on every row; the extra forward sees only the rows with
    r < t, at h = 0, with their own label drops."""
    obj = MeanFlowObjective(weight_p=0.0, tangent="model")
    x0, noise, t, r = gaussian_batch()
    net, drop = ExactNet(), torch.tensor([False, True, False, False, True, False])
    losses = obj.training_losses(net, x0, torch.stack([t, r], 1), torch.zeros(6, dtype=torch.long), noise, drop=drop)
    tt = t.view(-1, 1, 1, 1)
    z, v = (1 - tt) * x0 + tt * noise, noise - x0
    assert torch.allclose(losses["loss"], mean_flat((velocity(z, t) - v) ** 2), rtol=1e-9, atol=1e-13)
    first = net.calls[0]
    assert not first["tangents"] and torch.equal(first["interval"], torch.zeros(5, dtype=F64))
    assert torch.equal(first["force_drop_ids"], drop[t > r])
    assert not torch.allclose(MeanFlowObjective(weight_p=0.0).training_losses(
        ExactNet(), x0, torch.stack([t, r], 1), torch.zeros(6, dtype=torch.long), noise)["loss"], losses["loss"])


def test_at_r_equal_t_the_loss_is_the_flow_matching_loss():
    """Every r = t: the MeanFlow loss (p = 0) is FlowObjective's velocity MSE on the same inputs,
    bit for bit (the network's first C of 2C channels, time s = 1 - t, h = 0: no JVP at all);
    with the adaptive weight it is that MSE / (||error||^2 + c)^p."""
    torch.manual_seed(0)
    model = create_model("DiT-Ti/2", input_size=4, in_channels=2, num_classes=3, learn_sigma=True,
                         interval_embedding=True).train()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))  # every weight non-zero, the interval embedder too
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(5, 2, 4, 4, generator=g), torch.randn(5, 2, 4, 4, generator=g)
    t, y = torch.rand(5, generator=g), torch.tensor([0, 1, 2, 1, 0])
    drop = torch.tensor([0, 1, 0, 0, 1])

    def net(x_t, s, labels, force_drop_ids=drop, **options):
        return model(x_t, s, labels, force_drop_ids=force_drop_ids, **options)

    flow = FlowObjective().training_losses(net, x0, t, y, noise)["loss"]
    plain = MeanFlowObjective(flow_share=1.0, weight_p=0.0)
    assert torch.equal(plain.training_losses(net, x0, torch.stack([t, t], 1), y, noise, drop)["loss"], flow)
    weighted = MeanFlowObjective(flow_share=1.0).training_losses(net, x0, torch.stack([t, t], 1), y, noise, drop)
    assert torch.allclose(weighted["loss"], flow / (flow * 2 * 16 + 1e-3), rtol=1e-6)
    assert torch.equal(weighted["u_mse"], flow)


def test_the_adaptive_weight_carries_no_gradient():
    """d loss / d u = w * 2 (u - u_tgt) / (C H W), w = 1 / (||u - u_tgt||^2 + c)^p held fixed."""
    obj = MeanFlowObjective(weight_p=0.75, weight_c=0.01)
    g = torch.Generator().manual_seed(2)
    out = torch.randn(3, 1, 2, 2, generator=g, requires_grad=True)  # the network's F = -u, whatever its input
    x0, noise = torch.randn(3, 1, 2, 2, generator=g), torch.randn(3, 1, 2, 2, generator=g)

    def net(z, s, y, interval=None, tangents=None, tangent_rows=None, force_drop_ids=None):
        return (out, torch.zeros_like(out)) if tangents is not None else out

    t = torch.tensor([0.3, 0.6, 0.9])
    obj.training_losses(net, x0, torch.stack([t, t], 1), torch.zeros(3, dtype=torch.long), noise)["loss"].sum().backward()
    error = (-out - (noise - x0)).detach()  # u - u_tgt, u_tgt = v at r = t
    w = 1 / (error.pow(2).sum(dim=(1, 2, 3), keepdim=True) + 0.01) ** 0.75
    assert torch.allclose(out.grad, -w * 2 * error / 4, rtol=1e-6)


def test_training_time_guidance_mixes_in_the_models_unconditional_velocity():
    """omega != 1: the target velocity and tangent v~ = omega v + (1 - omega) u(z_t, t, t | null), from
    one no-grad call with every label dropped at h = 0; dropped samples keep v; omega = 1 calls nothing."""
    g = torch.Generator().manual_seed(4)
    z, v = torch.randn(4, 1, 2, 2, generator=g), torch.randn(4, 1, 2, 2, generator=g)
    t, y = torch.tensor([0.2, 0.4, 0.6, 0.8]), torch.tensor([1, 2, 3, 4])
    u_null = torch.randn(4, 1, 2, 2, generator=g)
    calls = []

    def net(z_, s, labels, interval=None, force_drop_ids=None):
        calls.append((s, interval, force_drop_ids, torch.is_grad_enabled()))
        return -u_null

    drop = torch.tensor([False, True, False, False])
    out = MeanFlowObjective(train_cfg=3.0).guided_velocity(net, z, t, y, v, drop)
    expected = 3 * v + (1 - 3) * u_null
    assert torch.allclose(out[~drop], expected[~drop]) and torch.equal(out[drop], v[drop])
    (s, interval, forced, grad), = calls
    assert torch.allclose(s, 1 - t) and torch.equal(interval, torch.zeros(4)) and torch.equal(forced, torch.ones(4, dtype=torch.long))
    assert not grad
    assert MeanFlowObjective().guided_velocity(net, z, t, y, v, drop) is v and len(calls) == 1


def test_time_pairs_are_sorted_logit_normal_with_the_share_at_r_equal_t():
    tr = sample_time_pairs(40_000, torch.Generator().manual_seed(5), torch.device("cpu"), -0.4, 1.0, 0.75)
    t, r = tr[:, 0], tr[:, 1]
    assert tr.shape == (40_000, 2) and bool((t >= r).all()) and bool(((r >= 0) & (t <= 1)).all())
    same = t == r
    assert abs(same.float().mean().item() - 0.75) < 0.01
    # the two sorted draws: their logits' mean is the mean of the normal, -0.4
    both = torch.cat([torch.logit(t[~same].double()), torch.logit(r[~same].double())])
    assert abs(both.mean().item() + 0.4) < 0.03 and abs(both.std().item() - 1.0) < 0.03


# -- the network's second time ---------------------------------------------------------------------


def _randomized(model):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def test_the_interval_embedder_starts_at_zero_and_adds_only_its_own_keys():
    """A DiT without the option keeps the official keys; with it, h_embedder.* are the only new keys,
    its output layer starts at zero, and flow weights loaded into it (`load_flow_weights`) give the
    flow model's outputs for every interval h, bit for bit."""
    torch.manual_seed(0)
    flow = _randomized(create_model("DiT-Ti/2", input_size=4, in_channels=1, num_classes=3))
    torch.manual_seed(0)
    fresh = create_model("DiT-Ti/2", input_size=4, in_channels=1, num_classes=3, interval_embedding=True)
    extra = sorted(set(fresh.state_dict()) - set(flow.state_dict()))
    assert extra == [f"h_embedder.mlp.{i}.{k}" for i in (0, 2) for k in ("bias", "weight")]
    assert not any("h_embedder" in k for k in flow.state_dict()) and "h_embedder" not in repr(flow)
    assert fresh.h_embedder.mlp[2].weight.abs().max() == 0 and fresh.h_embedder.mlp[2].bias.abs().max() == 0
    load_flow_weights(fresh, flow.state_dict())
    assert fresh.h_embedder.mlp[0].weight.abs().max() > 0
    x, t, y = torch.randn(3, 1, 4, 4), torch.rand(3), torch.tensor([0, 1, 2])
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x, t, y, interval=torch.tensor([0.0, 0.3, 0.9])), flow.eval()(x, t, y))
    with pytest.raises(ValueError, match="takes no interval"):
        flow(x, t, y, interval=torch.zeros(3))


def test_flow_weights_that_do_not_fit_are_one_line_errors():
    torch.manual_seed(0)
    flow = create_model("DiT-Ti/2", input_size=4, in_channels=1, num_classes=3).state_dict()
    meanflow = create_model("DiT-Ti/2", input_size=4, in_channels=1, num_classes=3, interval_embedding=True)
    cases = [({**flow, "spare": torch.zeros(1)}, "spare: in the flow weights"),
             ({k: v for k, v in flow.items() if k != "pos_embed"}, "pos_embed: in the MeanFlow model"),
             ({**flow, "final_layer.linear.bias": torch.zeros(3)}, "final_layer.linear.bias: flow weights (3,)"),
             (meanflow.state_dict(), "already has an interval embedder")]
    for state, says in cases:
        with pytest.raises(UserError, match=says.replace("(", r"\(").replace(")", r"\)")) as e:
            flow_state_for_meanflow(state, meanflow)
        assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="no interval embedder"):
        flow_state_for_meanflow(flow, create_model("DiT-Ti/2", input_size=4, in_channels=1, num_classes=3))
    # the interval embedder a fine-tune starts from: zero output whatever the model held before
    start = interval_embedder_state(_randomized(meanflow).state_dict())
    assert start["h_embedder.mlp.2.weight"].abs().max() == 0 and start["h_embedder.mlp.0.weight"].abs().max() > 0


def test_the_analytic_counts_include_the_interval_embedder():
    from ditforge.bench import forward_macs, parameter_count
    from ditforge.models import count_parameters

    plain, mf = (create_model("DiT-Ti/2", input_size=8, in_channels=1, num_classes=3, interval_embedding=i) for i in (False, True))
    assert parameter_count(mf) == count_parameters(mf) == count_parameters(plain) + 256 * 192 + 192 * 192 + 2 * 192
    assert forward_macs(mf) == forward_macs(plain) + 256 * 192 + 192 * 192


BLOCKS = {"paper": {}, "modern": dict(norm="rms", mlp="swiglu", rope=True, qk_norm=True)}


@pytest.mark.parametrize("blocks", sorted(BLOCKS))
def test_the_jvp_through_the_dit_equals_a_float64_finite_difference(blocks):
    """forward(..., tangents=(dx, dt, dh)) is (F, dF): F the plain forward's output, dF the central
    difference of F along the tangents (float64, every block option, training mode with label
    drops); with tangent_rows, the rows left out get dF = 0 and the others the same values."""
    torch.manual_seed(0)
    model = _randomized(create_model("DiT-Ti/2", input_size=8, in_channels=2, num_classes=3, interval_embedding=True,
                                     **BLOCKS[blocks])).double().train()
    g = torch.Generator().manual_seed(6)
    x, dx = torch.randn(3, 2, 8, 8, generator=g, dtype=F64), torch.randn(3, 2, 8, 8, generator=g, dtype=F64)
    t, h = torch.tensor([0.2, 0.5, 0.9], dtype=F64), torch.tensor([0.1, 0.0, 0.6], dtype=F64)
    dt, dh = torch.tensor([-1.0, 0.5, 2.0], dtype=F64), torch.tensor([1.0, -0.3, 0.7], dtype=F64)
    y, drop = torch.tensor([0, 1, 2]), torch.tensor([0, 0, 1])
    out, d_out = model(x, t, y, force_drop_ids=drop, interval=h, tangents=(dx, dt, dh))
    eps = 1e-6
    with torch.no_grad():
        plain = model(x, t, y, force_drop_ids=drop, interval=h)
        ahead = model(x + eps * dx, t + eps * dt, y, force_drop_ids=drop, interval=h + eps * dh)
        behind = model(x - eps * dx, t - eps * dt, y, force_drop_ids=drop, interval=h - eps * dh)
    fd = (ahead - behind) / (2 * eps)
    assert torch.allclose(out, plain, atol=1e-12, rtol=0) and out.requires_grad
    assert (d_out - fd).abs().max() <= 1e-7 * fd.abs().max() and fd.abs().max() > 1e-2
    rows = torch.tensor([True, False, True])
    out2, d2 = model(x, t, y, force_drop_ids=drop, interval=h, tangents=(dx, dt, dh), tangent_rows=rows)
    assert torch.allclose(out2, out, atol=1e-12, rtol=0) and torch.allclose(d2[rows], d_out[rows], atol=1e-12, rtol=0)
    assert torch.equal(d2[~rows], torch.zeros_like(d2[~rows]))


def test_the_jvp_under_bf16_autocast_is_the_fp32_one_within_bf16_error():
    torch.manual_seed(0)
    model = _randomized(create_model("DiT-Ti/2", input_size=4, in_channels=1, num_classes=3, interval_embedding=True,
                                     **BLOCKS["modern"])).train()
    g = torch.Generator().manual_seed(7)
    x, dx = torch.randn(4, 1, 4, 4, generator=g), torch.randn(4, 1, 4, 4, generator=g)
    t, h, y = torch.rand(4, generator=g), torch.rand(4, generator=g) * 0.5, torch.tensor([0, 1, 2, 0])
    tangents, drop = (dx, -torch.ones(4), torch.ones(4)), torch.tensor([0, 0, 1, 0])
    out, d_out = model(x, t, y, force_drop_ids=drop, interval=h, tangents=tangents)
    with autocast("bf16", torch.device("cpu")):
        out16, d16 = model(x, t, y, force_drop_ids=drop, interval=h, tangents=tangents)
    assert out16.dtype == d16.dtype == torch.bfloat16
    for a, b in ((out16, out), (d16, d_out)):
        assert ((a.float() - b).norm() / b.norm()).item() < 3e-2  # bf16 rounds at 2^-8 relative


def _config(**kw):
    return TrainConfig.from_dict(dict(objective="meanflow", **kw))


def _steps(cfg: TrainConfig, steps: int = 2):
    """The weights (one flat tensor) and losses of `steps` MeanFlow training steps of DiT-Ti/4 on
    one fixed batch of 8x8 noise images."""
    torch.manual_seed(0)
    model = create_model(cfg.model.name, input_size=8, in_channels=1, num_classes=10, **model_options(objective_of_run(cfg)))
    step = TrainStep(cfg, model, Dist(device=torch.device("cpu")), "fp32")
    g = torch.Generator().manual_seed(0)
    batch = (torch.randn(cfg.global_batch, 1, 8, 8, generator=g), torch.randint(0, 10, (cfg.global_batch,), generator=g))
    losses = torch.stack([step(i, [batch], [0]) for i in range(steps)])
    return torch.cat([p.detach().flatten() for p in model.parameters()]), losses


STEP = dict(model=dict(name="DiT-Ti/4"), global_batch=8, seed=3, meanflow=dict(flow_share=0.5))


@pytest.mark.parametrize("mode", ["full", "mlp", "ops"])
def test_gradient_checkpointing_trains_meanflow_exactly_as_without(mode):
    """The prediction is a plain forward (recomputed in backward as any), the JVP a pass without
    gradient: checkpointing changes nothing (it was refused while the JVP carried the graph)."""
    plain, plain_losses = _steps(_config(**STEP))
    kept, kept_losses = _steps(_config(**STEP, grad_checkpoint=mode))
    assert torch.equal(plain_losses, kept_losses) and torch.equal(plain, kept)
    assert not torch.equal(plain, _steps(_config(**STEP), steps=1)[0])  # the second step moved the weights


@pytest.mark.slow
def test_a_compiled_meanflow_step_trains_like_eager():
    """--compile (inductor) with --objective meanflow: the same losses and weights as eager
    within float32 rounding (about a minute of compiling on 2 cores)."""
    eager, eager_losses = _steps(_config(**STEP))
    compiled, compiled_losses = _steps(_config(**STEP, compile=True))
    assert torch.isfinite(compiled_losses).all()
    assert torch.allclose(compiled_losses, eager_losses, rtol=1e-4)
    assert torch.allclose(compiled, eager, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("settings, says", [
    (dict(repa=dict(encoder="dinov2")), "REPA (--repa-encoder) does not run"),
    (dict(meanflow=dict(train_cfg=2.0), model=dict(class_dropout_prob=0.0)), "--train-cfg 2 needs"),
    (dict(meanflow=dict(train_cfg=2.0), sample_cfg=4.0), "--sample-cfg: this MeanFlow model has guidance scale 2"),
    (dict(meanflow=dict(flow_share=1.5)), "meanflow settings: meanflow flow_share"),
])
def test_what_the_jvp_does_not_run_with_is_refused_in_one_line(settings, says):
    with pytest.raises(UserError) as e:
        _config(**settings)
    assert says in str(e.value) and "\n" not in str(e.value)


def test_a_meanflow_run_resolves_its_sampling_defaults():
    """The previews: 1 jump, cfg 4 (sampling-time guidance) for omega = 1, the trained omega otherwise;
    flow and diffusion runs record what they did before."""
    assert (_config().sample_steps, _config().sample_cfg) == ("1", 4.0)
    assert _config(meanflow=dict(train_cfg=2.5)).sample_cfg == 2.5
    assert (TrainConfig().sample_steps, TrainConfig().sample_cfg) == ("20", 4.0)
    guided = objective_from_config(dict(objective="meanflow", meanflow=dict(train_cfg=2.5)))
    assert (default_steps(guided), default_cfg(guided, 1.5), samplers_of(guided)) == (1, 2.5, ("meanflow",))
    check_cfg(guided, 2.5)
    with pytest.raises(UserError, match="use --cfg 2.5"):
        check_cfg(guided, 1.0)


def test_sampling_guides_an_unguided_model_and_runs_a_guided_one_once():
    """omega = 1: --cfg w mixes the conditional and null average velocities per jump (one doubled
    batch, the interval doubled with it); omega != 1: one conditional evaluation at --cfg omega."""
    torch.manual_seed(0)
    model = _randomized(create_model("DiT-Ti/2", input_size=4, in_channels=1, num_classes=3, interval_embedding=True)).eval()
    noise, y = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(8)), torch.tensor([0, 1, 2])
    ones, null = torch.ones(3), torch.full((3,), 3)
    with torch.no_grad():
        u_c = -model(noise, 0 * ones, y, interval=ones)[:, :1]
        u_n = -model(noise, 0 * ones, null, interval=ones)[:, :1]
    unguided = MeanFlowObjective()
    sampler = choose_sampler(model, unguided, 1, 3.0, None)
    x = sample_batch(model, sampler, y, noise, torch.Generator(), 3.0)
    assert torch.allclose(x, noise - (u_n + 3 * (u_c - u_n)), atol=1e-5)
    guided = MeanFlowObjective(train_cfg=2.0)
    x = sample_batch(model, choose_sampler(model, guided, 1, 2.0, None), y, noise, torch.Generator(), 2.0)
    assert torch.allclose(x, noise - u_c, atol=1e-6)
    with pytest.raises(UserError, match="samples at that scale only"):
        choose_sampler(model, guided, 1, 1.5, None)


def test_bench_times_a_meanflow_step():
    from ditforge.bench import run_benchmark

    result = run_benchmark("DiT-Ti/4", input_size=4, channels=1, num_classes=10, batch=4, steps=1, warmup=1,
                           objective="meanflow")
    assert result.objective == "meanflow" and result.images_per_s > 0 and " meanflow " in result.line()


# -- the real commands -----------------------------------------------------------------------------

# SGD with momentum: its step is linear in the gradient (a gradient not averaged over ranks shows) and it
# has state to resume; --train-cfg 2 runs the guided target (one more forward through the wrapper) too;
# half the batch at r != t so that each rank has JVP rows
TRAIN = ["--objective", "meanflow", "--data", "digits", "--model", "DiT-Ti/2", "--batch-size", "16", "--ckpt-every", "2",
         "--keep-last", "0", "--log-every", "2", "--no-progress", "--optimizer", "sgd", "--lr", "0.05", "--momentum", "0.9",
         "--train-cfg", "2", "--mf-flow-share", "0.5"]


def _weights(run, step, name="model"):
    return load_file(str(run / "checkpoints" / f"step-{step:07d}" / f"{name}.safetensors"))


def _worst(a, b):
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    run = tmp_path_factory.mktemp("meanflow") / "run"
    run_cli("train", "--run-dir", str(run), "--steps", "4", *TRAIN)
    return run


@pytest.mark.slow
def test_checkpoints_record_the_objective_and_the_interval_input(straight):
    state = json.loads((straight / "checkpoints" / "step-0000004" / "state.json").read_text())
    assert state["config"]["objective"] == "meanflow" and state["config"]["meanflow"]["train_cfg"] == 2.0
    assert state["model_args"]["interval_embedding"] is True
    assert "h_embedder.mlp.2.weight" in _weights(straight, 4, "ema")


@pytest.mark.slow
def test_resume_is_bit_exact(straight, tmp_path):
    run = tmp_path / "resumed"
    shutil.copytree(straight, run)
    shutil.rmtree(run / "checkpoints" / "step-0000004")
    assert "resumed from" in run_cli("train", "--run-dir", str(run), "--steps", "4", *TRAIN).stdout
    for name in ("model", "ema", "optimizer"):
        assert _worst(_weights(straight, 4, name), _weights(run, 4, name)) == 0.0


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_give_the_weights_of_one(straight, tmp_path, parallel):
    """The JVP runs inside the module's forward, under the wrapper: DDP's and FSDP2's gradient
    reductions happen. Measured 6e-11 (model); a JVP on the unwrapped module, bypassing DDP's
    forward, trained each rank on its half: 5.8e-5."""
    run = tmp_path / parallel
    torchrun("train", "--run-dir", str(run), "--parallel", parallel, "--steps", "2", "--sample-steps", "1", *TRAIN)
    for name in ("model", "ema", "optimizer"):
        assert _worst(_weights(straight, 2, name), _weights(run, 2, name)) <= 1e-8, name


@pytest.mark.slow
def test_one_step_sample_of_a_guided_run_and_its_cfg_refusal(straight, tmp_path):
    out = run_cli("sample", str(straight), "--steps", "1", "--classes", "3", "7", "--per-class", "2",
                  "--out", str(tmp_path / "g.png")).stdout
    assert "1 MEANFLOW steps" in out and "cfg 2," in out and (tmp_path / "g.png").stat().st_size > 0
    bad = run_cli("sample", str(straight), "--cfg", "1.5", "--out", str(tmp_path / "b.png"), check=False)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1
    assert "guidance scale 2 built in" in bad.stderr and "use --cfg 2" in bad.stderr


def _jumps(model, z, y, steps):
    """`steps` equal MeanFlow jumps from noise z (N, C, H, W) at t = 1, written out: z_r = z_t - (t - r)
    u(z_t, r, t), u = -F(z, s = 1 - t, h = t - r) (the guidance built in: one conditional call)."""
    times = torch.linspace(1, 0, steps + 1)
    with torch.no_grad():
        for t, r in zip(times[:-1], times[1:]):
            n = z.shape[0]
            z = z + (t - r) * model(z, torch.full((n,), 1 - t), y, interval=torch.full((n,), t - r))[:, : z.shape[1]]
    return z


@pytest.mark.slow
def test_bulk_npz_and_eval_draw_a_meanflow_model_with_its_jumps(straight, tmp_path):
    """`sample RUN --out x.npz` draws a MeanFlow run as the grid does: sample i is the jumps from its
    own starting noise (`start_noise`) at its label (`sample_labels`), at the trained scale, one
    evaluation a jump; another --cfg is refused in bulk too; `eval --steps 2` records 2 evaluations.
    The run's 4 steps leave its interval embedder near zero, so 2 jumps are also checked with
    random weights in `sample_to_npz` itself, where a wrong interval or time shows."""
    from ditforge.sampling.bulk import sample_labels, sample_to_npz, to_hwc_uint8
    from ditforge.sampling.generate import start_noise
    from ditforge.sampling.load import SamplingModel, load_for_sampling

    one = tmp_path / "one.npz"
    assert "6 samples, cfg 2, 1 MEANFLOW steps" in run_cli("sample", str(straight), "--num-samples", "6", "--out", str(one)).stdout
    sm = load_for_sampling(straight)
    y = sample_labels(6, sm.model.num_classes, 0, False)  # (6,)
    z1 = start_noise(0, range(6), (1, 8, 8))  # (6, 1, 8, 8)
    written = np.load(one)
    assert np.array_equal(written["labels"], y.numpy())
    assert np.abs(written["arr_0"].astype(int) - to_hwc_uint8(_jumps(sm.model.eval(), z1, y, 1)).astype(int)).max() <= 1
    bad = run_cli("sample", str(straight), "--num-samples", "6", "--cfg", "1.5", "--out", str(tmp_path / "b.npz"), check=False)
    assert bad.returncode == 2 and "use --cfg 2" in bad.stderr
    report = tmp_path / "report.json"
    run_cli("eval", str(straight), "--steps", "2", "--per-class", "2", "--no-fid", "--json", str(report))
    assert [json.loads(report.read_text())[k] for k in ("nfe", "sampler", "cfg")] == [2, "meanflow", 2.0]

    torch.manual_seed(0)
    random = SamplingModel(_randomized(create_model("DiT-Ti/2", input_size=8, in_channels=1, num_classes=10,
                                                    interval_embedding=True)).eval(), [str(k) for k in range(10)],
                           MeanFlowObjective(train_cfg=2.0))
    two = tmp_path / "two.npz"
    sample_to_npz(random, two, 6, cfg_scale=2.0, steps=2, batch_size=3, shard_size=3, progress=False)
    expected = to_hwc_uint8(_jumps(random.model, z1, y, 2)).astype(int)
    assert ((expected > 5) & (expected < 250)).mean() > 0.5  # grey levels: a change shows
    assert np.abs(np.load(two)["arr_0"].astype(int) - expected).max() <= 1
    assert np.abs(expected - to_hwc_uint8(_jumps(random.model, z1, y, 1)).astype(int)).mean() > 2  # the check can fail
