"""Settings declared once, by their owner: a dataclass field with its help text and allowed values beside it.

Each part of a run (the run itself, each method, parameterisation and regularizer) declares its settings as a
frozen dataclass whose fields are made with :func:`setting`. Everything else is generated from those
declarations: the command-line flags and their ``--help`` (:func:`add_flags`), the YAML keys (the field names,
read by :func:`infodistill.config.config_from_mapping`) and the range checks (:func:`check_values`). A new
setting is one field; no flag, YAML key or check is written by hand.

A small generator of our own rather than a configuration library: the settings are plain frozen dataclasses
(typed, checked by mypy, hashable, compared with ``==`` on resume), and the generated argparse parser keeps the
command line exactly as it was; the libraries that generate parsers from dataclasses (simple-parsing, tyro)
would each change flag spellings and help layout and add a dependency for about 150 lines.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from infodistill.errors import UserInputError


@dataclass(frozen=True)
class Bounds:
    """The allowed range of a numeric setting: ``low``/``high`` (None: unbounded), each inclusive unless open.

    ``note`` says what a boundary value means (``"0 turns it off"``) and is shown in errors."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    note: str = ""

    def admits(self, value: float) -> bool:
        """Whether ``value`` is a finite number inside the range."""
        if not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return not (self.high is not None and (value >= self.high if self.high_open else value > self.high))

    def describe(self, integer: bool) -> str:
        """The range in words, as an error line says it: ``a positive integer``, ``in [0, 1)``, ..."""
        note = f" ({self.note})" if self.note else ""
        if self.high is not None:
            left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
            return f"in {left}{self.low:g}, {self.high:g}{right}{note}"
        if integer:
            if self.low == 1 and not self.low_open:
                return f"a positive integer{note}"
            return f">= {self.low:g}{note}"
        if self.low == 0 and self.low_open:
            return f"positive and finite{note}"
        return f"a finite number >= {self.low:g}{note}"


POSITIVE = Bounds(low=0, low_open=True)
"""A number above 0 (a learning rate, a temperature)."""
AT_LEAST_ONE = Bounds(low=1)
"""A count of at least one."""
NON_NEGATIVE = Bounds(low=0)
"""A number or count of at least 0."""


def setting(default: Any, help: str, *, bounds: Bounds | None = None, choices: Iterable[str] | None = None,
            metavar: str | None = None, default_text: str | None = None) -> Any:
    """A settings field: its default, the help line of its flag, and its allowed values (``bounds`` for numbers,
    ``choices`` for names). ``default_text`` replaces the default in ``--help`` where None means something
    (``"the method's"``)."""
    metadata = {"help": help, "bounds": bounds, "choices": tuple(choices) if choices is not None else None,
                "metavar": metavar, "default_text": default_text}
    return dataclasses.field(default=default, metadata=metadata)


def declared(cls: type) -> tuple[dataclasses.Field, ...]:
    """The fields of the settings dataclass ``cls`` (each made with :func:`setting`)."""
    return dataclasses.fields(cls)


def _base_type(annotation: Any) -> Any:
    """``int`` for ``int | None`` and so on: the field's type without its optional None."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        options = [option for option in typing.get_args(annotation) if option is not type(None)]
        return options[0] if len(options) == 1 else str
    return annotation


def check_values(settings: Any) -> None:
    """Refuse a value outside its declared bounds or choices with one line naming the setting and what is
    allowed. None (the part's default) is always allowed."""
    hints = typing.get_type_hints(type(settings))
    for field in declared(type(settings)):
        value = getattr(settings, field.name)
        if value is None:
            continue
        choices, bounds = field.metadata.get("choices"), field.metadata.get("bounds")
        if choices is not None and isinstance(value, str) and value not in choices:
            raise UserInputError(f"{field.name} '{value}' is not one of: {', '.join(choices)}")
        if bounds is not None and isinstance(value, (int, float)) and not isinstance(value, bool) \
                and not bounds.admits(value):
            integer = _base_type(hints[field.name]) is int
            raise UserInputError(f"{field.name} must be {bounds.describe(integer)}, got {value}")


def title_of(cls: type) -> str:
    """The heading a settings group's flags appear under in ``--help`` (its ``title``)."""
    return str(vars(cls).get("title", cls.__name__))


def check_int(value: object, name: str, minimum: int = 1, owner: str = "") -> int:
    """``value`` if it is an integer >= ``minimum`` (not a bool), else one line naming ``owner name`` and the
    value: the one integer check of the constructors that take settings directly (methods, regularizers)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        prefix = f"{owner} " if owner else ""
        raise UserInputError(f"{prefix}{name}={value!r} is invalid; it must be an integer >= {minimum}")
    return value


def flag_name(name: str) -> str:
    """The flag of a setting: ``lr_images`` -> ``--lr-images``."""
    return "--" + name.replace("_", "-")


def _help_of(field: dataclasses.Field) -> str:
    """The flag's help: the declared line and its default (or what None means)."""
    text = field.metadata["default_text"]
    if text is None:
        default = field.default
        text = ("on" if default else "off") if isinstance(default, bool) else str(default)
    return f"{field.metadata['help']} (default: {text})"


def add_flags(parser: argparse._ActionsContainer, cls: type, only: Iterable[str] | None = None) -> None:
    """Add one flag per field of the settings dataclass ``cls`` (or of the fields in ``only``). Every flag
    defaults to None, so that a flag not given leaves the YAML file's value (or the field's default) in place;
    booleans get ``--name/--no-name``."""
    hints = typing.get_type_hints(cls)
    wanted = set(only) if only is not None else None
    for field in declared(cls):
        if wanted is not None and field.name not in wanted:
            continue
        kind = _base_type(hints[field.name])
        options: dict[str, Any] = {"dest": field.name, "default": None, "help": _help_of(field)}
        if kind is bool:
            options["action"] = argparse.BooleanOptionalAction
        else:
            options["type"] = kind if kind in (int, float) else str
            choices = field.metadata["choices"]
            if choices:
                options["choices"] = choices
            options["metavar"] = field.metadata["metavar"] or ("|".join(choices) if choices else
                                                               {int: "N", float: "X"}.get(kind, "TEXT"))
        parser.add_argument(flag_name(field.name), **options)


def given_flags(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The settings of ``cls`` given as flags (those not given are left out)."""
    return {field.name: getattr(args, field.name) for field in declared(cls)
            if getattr(args, field.name, None) is not None}
