"""How a typed config field declares its command-line option: once, beside the field.

    lr: float = field(default=1e-4, metadata=flag("--lr", "AdamW learning rate"))

``config.option_fields()`` lists every field of ``TrainConfig`` (sections expanded in place,
also the flow objective's fields, declared in ``flow/objective.py``) and ``cli.py`` builds the
``train`` parser from them; ``tests/test_cli_options.py`` fails if a field has no option.
"""

from __future__ import annotations

from typing import Any, Callable

__all__ = ["flag"]


def flag(name: str, help: str | Callable[[], str], *, shown: str | None = None, **argparse: Any) -> dict[str, Any]:
    """Field metadata naming the `ditforge train` option that sets the field: its one declaration.

    `cli.py` builds the train parser from these (`option_fields`): the type comes from the
    annotation (bool: --x / --no-x; tuple[float, float]: two numbers; `X | None`: X), the default
    shown in the help is the 'tiny' preset's value (or `shown`), and `argparse` adds keywords such
    as `choices`, `metavar`, `nargs`, `const`. `help` and `choices` may be callables, called when
    the parser is built (to import what the config module does not). `negation=(FLAG, VALUE)`
    adds a second option that sets the field to VALUE.
    """
    return {"flag": dict(name=name, help=help, shown=shown, **argparse)}
