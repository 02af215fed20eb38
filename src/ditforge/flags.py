"""How a typed field declares its command-line option: once, beside the field.

    lr: float = field(default=1e-4, metadata=flag("--lr", "AdamW learning rate"))

Every command's parser is built from such fields: `train` from ``TrainConfig`` (sections
expanded in place, also the flow objective's fields, declared in ``flow/objective.py``), and
`sample`, `eval`, `extract`, `bench` from the option dataclasses of the modules that run them
(``sampling.command.SampleOptions``, ``evaluation.command.EvalOptions``, ``data.store.extract.ExtractOptions``,
``bench.BenchOptions``). ``tests/test_cli_options.py`` fails if a field has no option or an
option no field. A saved section of such fields (a run's config.json) is read back by
`section_from_dict`, which names a key this version lacks in one line.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any, Callable, Mapping

from ditforge.errors import UserError

__all__ = ["add_option", "add_options", "flag", "option_fields", "options_from_args", "section_from_dict"]


def flag(name: str, help: str | Callable[[], str], *, shown: str | None = None, **argparse: Any) -> dict[str, Any]:
    """Field metadata naming the command-line option that sets the field: its one declaration.

    The type comes from the annotation (`X | None`: X; tuple[float, float]: two numbers;
    list[int]: ints, with `nargs` given here; bool in `train`: --x / --no-x, elsewhere give
    `action="store_true"`), and `argparse` adds keywords such as `choices`, `metavar`, `nargs`,
    `const`, `action`, `required`. A `name` without dashes is a positional argument. `help` and
    `choices` may be callables, called when the parser is built (to import what the declaring
    module does not). `shown` is the default written into the help (train: else the 'tiny'
    preset's value; elsewhere: else the field's default). `negation=(FLAG, VALUE)` adds a second
    option that sets the field to VALUE.
    """
    return {"flag": dict(name=name, help=help, shown=shown, **argparse)}


def option_fields(cls: type, prefix: str = "") -> list[tuple[str, dataclasses.Field, type]]:
    """(dotted path, field, resolved type) of every setting of the dataclass `cls`, nested
    sections (dataclass-typed fields) expanded in place."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            out += option_fields(hints[f.name], f"{prefix}{f.name}.")
        else:
            out.append((prefix + f.name, f, hints[f.name]))
    return out


def _field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _unwrap(kind: type) -> type:
    """X | None -> X; any other type as it is."""
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        args = [t for t in typing.get_args(kind) if t is not type(None)]
        if len(args) == 1:
            return args[0]
    return kind


def add_option(
    p: argparse.ArgumentParser, path: str, f: dataclasses.Field, kind: type, default: Any = None,
    shown: Callable[[str], Any] | None = None,
) -> None:
    """The option that `flag(...)` declares for the field at `path` (also its dest), with `default`.
    `shown(path)` gives the default the help states where the declaration does not (train: the
    'tiny' preset's value); without it the parser's formatter states the option's own default."""
    if "flag" not in f.metadata:
        raise TypeError(f"field {path} declares no option: give it metadata=flag(...)")
    spec = dict(f.metadata["flag"])
    name, help_text, stated = spec.pop("name"), spec.pop("help"), spec.pop("shown")
    negation = spec.pop("negation", None)
    help_text = help_text() if callable(help_text) else help_text
    if callable(spec.get("choices")):
        spec["choices"] = spec["choices"]()
    base = _unwrap(kind)
    if base is bool:
        spec.setdefault("action", argparse.BooleanOptionalAction)
    elif typing.get_origin(base) is tuple:
        args = typing.get_args(base)
        spec.setdefault("type", args[0])
        spec.setdefault("nargs", len(args))
    elif typing.get_origin(base) is list:
        spec.setdefault("type", typing.get_args(base)[0])
    elif base is not str:
        spec.setdefault("type", base)
    if stated is None and shown is not None:
        stated = shown(path)
    if stated is not None:
        help_text = f"{help_text} (default: {stated})"
    if not name.startswith("-"):  # positional: argparse takes its dest and metavar from the name
        if f.default is not dataclasses.MISSING:
            spec.setdefault("default", default)
        p.add_argument(name, help=help_text, **spec)
        return
    if base is not bool and "choices" not in spec:
        spec.setdefault("metavar", name.lstrip("-").replace("-", "_").upper())  # --class-dropout CLASS_DROPOUT
    p.add_argument(name, dest=path, default=default, help=help_text, **spec)
    if negation is not None:
        neg_name, neg_value = negation
        p.add_argument(neg_name, dest=path, action="store_const", const=neg_value, default=argparse.SUPPRESS,
                       help=f"same as {name} {neg_value}")


def add_options(p: argparse.ArgumentParser, cls: type) -> None:
    """One option per field of the flat dataclass `cls`, in field order, each defaulting to the field's default."""
    for path, f, kind in option_fields(cls):
        add_option(p, path, f, kind, default=_field_default(f))


def options_from_args(cls: type, args: argparse.Namespace) -> Any:
    """The `cls` that the parsed `args` of an `add_options(p, cls)` parser describe (lists of tuple fields as tuples)."""
    values = {}
    for path, _, kind in option_fields(cls):
        v = getattr(args, path)
        if v is not None and typing.get_origin(_unwrap(kind)) is tuple:
            v = tuple(v)
        values[path] = v
    return cls(**values)


def section_from_dict(cls: type, section: str, values: Mapping[str, Any]) -> Any:
    """``cls(**values)``: a section of a run's saved config (``TrainConfig``'s model, optim, flow,
    meanflow, ...) from its dict. A key that `cls` lacks (a run written by a newer version) or a
    value it refuses with a ValueError is a one-line UserError naming it (its own UserErrors pass
    as they are); an unknown key was a TypeError from the constructor, an internal error."""
    known = [f.name for f in dataclasses.fields(cls) if f.init]
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise UserError(f"{section} settings: {', '.join(map(repr, unknown))} is not a setting of this version of "
                        f"ditforge (it knows {', '.join(known)}); a run that records it was written by a newer "
                        "version: read it with that version")
    try:
        return cls(**values)
    except UserError:
        raise  # the section's own message, as its flags get it
    except ValueError as e:  # a value the section refuses; a TypeError stays ours
        raise UserError(f"{section} settings: {e}") from None
