"""The `train` options are generated from the typed configs: one declaration per field."""

import argparse

from ditforge.cli import build_parser, config_from_args
from ditforge.config import TrainConfig, option_fields

NOT_CONFIG = {"help", "preset", "no_progress"}  # options of the command, not of the run


def _train_parser() -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["train"]


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
