"""Config objects: validation names the bad value; JSON round trip; presets follow the paper."""

import pytest

from ditforge.config import PRESETS, TrainConfig, preset


def test_json_round_trip(tmp_path):
    cfg = TrainConfig.from_dict(preset("tiny"))
    cfg.save(tmp_path / "c.json")
    assert TrainConfig.load(tmp_path / "c.json") == cfg


@pytest.mark.parametrize(
    "change, needle",
    [
        ({"steps": 0}, "steps must be a positive integer, got 0"),
        ({"global_batch": -1}, "global_batch"),
        ({"precision": "fp8"}, "'fp8'"),
        ({"ema_decay": 1.0}, "ema_decay"),
        ({"model": {"name": "DiT-XXL/2"}}, "'DiT-XXL/2'"),
        ({"model": {"class_dropout_prob": 1.0}}, "class_dropout_prob"),
        ({"optim": {"lr": -1}}, "lr must be a positive"),
        ({"optim": {"betas": [0.9, 1.5]}}, "betas"),
        ({"diffusion": {"noise_schedule": "quadratic"}}, "'quadratic'"),
        ({"unknown_field": 1}, "unknown config fields"),
    ],
)
def test_bad_values_are_named(change, needle):
    with pytest.raises(ValueError, match=None) as err:
        TrainConfig.from_dict(change)
    assert needle in str(err.value)


def test_paper_presets_follow_the_recipe():
    for size in ("S", "B", "L", "XL"):
        for patch in (2, 4, 8):
            cfg = TrainConfig.from_dict(preset(f"DiT-{size}/{patch}"))
            assert cfg.model.name == f"DiT-{size}/{patch}"
            assert cfg.optim.lr == 1e-4 and cfg.optim.weight_decay == 0 and cfg.optim.betas == (0.9, 0.999)
            assert cfg.global_batch == 256 and cfg.ema_decay == 0.9999 and not cfg.ema_warmup
            assert cfg.hflip and cfg.model.class_dropout_prob == 0.1 and cfg.model.learn_sigma
            assert cfg.diffusion.noise_schedule == "linear" and cfg.diffusion.diffusion_steps == 1000
    assert len(PRESETS) == 16
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        preset("huge")


def test_lightning_presets_follow_lightningdits_config():
    """configs/lightningdit_xl_vavae_f16d32.yaml of hustvl/LightningDiT, on DiT sizes (config.py)."""
    for size in ("B", "L", "XL"):
        cfg = TrainConfig.from_dict(preset(f"LightningDiT-{size}/2"))
        m = cfg.model
        assert (m.name, m.learn_sigma, m.norm, m.mlp, m.rope, m.qk_norm) == (f"DiT-{size}/2", False, "rms", "swiglu", True, False)
        assert cfg.objective == "flow" and (cfg.sample_sampler, cfg.sample_steps) == ("euler", "250")
        f = cfg.flow
        assert (f.path, f.prediction, f.time_distribution, f.time_mean, f.time_std, f.cosine_weight) == (
            "linear", "velocity", "logit-normal", 0.0, 1.0, 1.0)
        assert (cfg.optim.lr, cfg.optim.betas, cfg.optim.weight_decay) == (2e-4, (0.9, 0.95), 0.0)
        assert (cfg.global_batch, cfg.steps, cfg.ema_decay) == (1024, 80_000, 0.9999)
