"""Every command's options are generated from typed fields: one declaration per field.

`train` from `TrainConfig`; `sample`, `eval`, `extract` and `bench` from their option dataclasses
(`cli.OPTIONS`).
"""

import argparse
import dataclasses

import pytest

from ditforge import flags
from ditforge.cli import OPTIONS, build_parser, config_from_args
from ditforge.config import TrainConfig, option_fields
from ditforge.flags import options_from_args
from ditforge.sampling.command import SampleOptions

NOT_CONFIG = {"help", "preset", "no_progress"}  # options of the command, not of the run


def _parser(command: str) -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[command]


def _train_parser() -> argparse.ArgumentParser:
    return _parser("train")


def test_every_config_field_declares_an_option():
    missing = [path for path, f, _ in option_fields() if "flag" not in f.metadata]
    assert not missing, f"config fields without metadata=flag(...): {missing}"


def test_every_train_option_sets_a_config_field_and_every_field_has_one():
    fields = {path for path, _, _ in option_fields()}
    dests = {a.dest for a in _train_parser()._actions if a.option_strings} - NOT_CONFIG
    assert dests - fields == set(), "options that set no config field"
    assert fields - dests == set(), "config fields that no option sets"


def _given(kind: type, f, action: argparse.Action) -> tuple[list[str], object]:
    """Arguments that set the field to a value other than its default, and that value."""
    if kind is bool:
        return ([f"--no-{action.option_strings[0][2:]}"] if f.default else [action.option_strings[0]]), not f.default
    if action.choices:
        value = next(c for c in action.choices if c != f.default)
        return [action.option_strings[0], str(value)], value
    if action.nargs == 2:
        return [action.option_strings[0], "0.5", "0.25"], [0.5, 0.25]
    return [action.option_strings[0], "7"], action.type("7") if action.type else "7"


def test_each_option_reaches_its_field():
    parser = _train_parser()
    actions = {a.dest: a for a in parser._actions if a.option_strings and a.default is None}
    for path, f, kind in option_fields():
        argv, value = _given(kind, f, actions[path])
        ns = parser.parse_args(argv)
        assert getattr(ns, path) == value, (path, argv)
        others = [p for p, _, _ in option_fields() if p != path and getattr(ns, p) is not None]
        assert not others, (argv, others)


def test_nested_options_land_in_their_sections():
    args = _train_parser().parse_args(
        ["--lr", "0.002", "--model", "DiT-S/2", "--class-dropout", "0", "--diffusion-steps", "500", "--no-grad-checkpoint"]
    )
    cfg = config_from_args(args)
    assert isinstance(cfg, TrainConfig)
    assert cfg.optim.lr == 0.002 and cfg.model.name == "DiT-S/2" and cfg.model.class_dropout_prob == 0.0
    assert cfg.diffusion.diffusion_steps == 500 and cfg.grad_checkpoint == "none"
    assert cfg.optim.betas == (0.9, 0.999) and cfg.steps == 800  # the tiny preset where no option is given


def test_every_command_has_its_options_class():
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert set(sub.choices) == {"train", *OPTIONS}


@pytest.mark.parametrize("command", sorted(OPTIONS))
def test_every_option_of_a_command_sets_a_field_and_every_field_has_one(command):
    cls = OPTIONS[command]
    missing = [f.name for f in dataclasses.fields(cls) if "flag" not in f.metadata]
    assert not missing, f"{cls.__name__} fields without metadata=flag(...): {missing}"
    fields = {f.name for f in dataclasses.fields(cls)}
    dests = {a.dest for a in _parser(command)._actions} - {"help"}
    assert dests - fields == set(), f"{command} options that set no {cls.__name__} field"
    assert fields - dests == set(), f"{cls.__name__} fields that no {command} option sets"


@pytest.mark.parametrize("command", sorted(OPTIONS))
def test_a_command_parses_to_its_options_with_their_defaults(command):
    cls = OPTIONS[command]
    required = {"sample": ["RUN"], "extract": ["--data", "digits", "--out", "STORE"],
                "export": ["RUN", "--format", "hub", "--out", "STORE"], "verify": ["PATH"]}.get(command, [])
    opts = options_from_args(cls, _parser(command).parse_args(required))
    given = {"checkpoint": "RUN", "data": "digits", "out": "STORE", "format": "hub", "path": "PATH"}
    for f in dataclasses.fields(cls):
        expected = f.default if f.default is not dataclasses.MISSING else given[f.name]
        if command == "sample" and f.name == "out":
            expected = "samples.png"
        assert getattr(opts, f.name) == expected, (command, f.name)


def test_sample_options_reach_their_fields():
    args = ["RUN", "--classes", "3", "5", "--cfg-interval", "0.1", "0.9", "--model", "DiT-XL/2", "--raw-weights",
            "--legacy-three-channel-guidance", "--sampler", "heun", "--precision", "bf16"]
    opts = options_from_args(SampleOptions, _parser("sample").parse_args(args))
    assert opts.classes == [3, 5] and opts.cfg_interval == (0.1, 0.9)  # nargs 2 -> the field's tuple
    assert opts.model_name == "DiT-XL/2" and opts.raw_weights and not opts.use_ema and opts.legacy_three_channel
    assert opts.sampler == "heun" and opts.precision == "bf16" and opts.checkpoint == "RUN"


def test_a_field_without_an_option_is_refused_when_the_parser_is_built():
    @dataclasses.dataclass
    class Bare:
        size: int = 3  # no flag(...)

    with pytest.raises(TypeError, match="size declares no option"):
        flags.add_options(argparse.ArgumentParser(), Bare)
