"""Typed configuration objects: dataclasses filled from YAML files and command-line overrides.

Every setting has one home, a dataclass field with a type and a default. A YAML file may set any
field; flags given on the command line win over the file. Unknown keys and values of the wrong type
are refused with one line that names them.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml

from infodistill.errors import UserInputError

ConfigT = TypeVar("ConfigT")


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Convert a YAML/flag value to the field's declared type, or refuse it naming the key."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key)
            except UserInputError as error:
                errors.append(str(error))
        raise UserInputError(errors[0] if errors else f"config key '{key}': bad value {_shown(value)}")
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise UserInputError(f"config key '{key}': {_shown(value)} is not a boolean (use true or false)")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise UserInputError(f"config key '{key}': {_shown(value)} is not an integer")
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                number = float(value)
            except OverflowError:  # an integer beyond any float
                number = math.inf
            if not math.isfinite(number):  # no setting means anything by an infinite or NaN value
                raise UserInputError(f"config key '{key}': {_shown(value)} is not a finite number")
            return number
        raise UserInputError(f"config key '{key}': {_shown(value)} is not a number")
    if annotation is str:
        if isinstance(value, str):
            return value
        raise UserInputError(f"config key '{key}': {_shown(value)} is not a string")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise UserInputError(f"config key '{key}': {_shown(value)} is not a list")
        (item_type, *_rest) = typing.get_args(annotation)
        return tuple(_coerce(item, item_type, key) for item in value)
    return value


MAX_SEED = 2**63 - 1
"""The largest seed any command takes: seeds are 0..2**63-1 everywhere (what a signed 64-bit integer holds, and
what numpy's seed sequences and torch's generators accept)."""


def check_seed(value: object, name: str = "seed") -> int:
    """``value`` if it is an integer seed in 0..:data:`MAX_SEED`, else a one-line error naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_SEED:
        raise UserInputError(f"{name} must be an integer in 0..{MAX_SEED} (2**63-1), got {_shown(value)}")
    return value


def config_from_mapping(cls: type[ConfigT], values: Mapping[str, Any], source: str = "config") -> ConfigT:
    """Build the dataclass ``cls`` from ``values``, checking every key and type."""
    fields = {field.name: field for field in dataclasses.fields(cls)}  # type: ignore[arg-type]
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise UserInputError(
            f"{source}: unknown key '{unknown[0]}'; allowed keys: {', '.join(sorted(fields))}"
        )
    converted = {key: _coerce(value, hints[key], key) for key, value in values.items()}
    return cls(**converted)


MAX_CONFIG_BYTES = 1 << 20
"""The largest YAML settings file read (1 MiB; a sweep file is a few hundred bytes)."""

MAX_SHOWN = 80
"""How many characters of a bad value an error line shows."""


def _shown(value: Any) -> str:
    """``repr(value)``, cut to :data:`MAX_SHOWN` characters, so one bad value cannot make a huge error line."""
    text = repr(value)
    return text if len(text) <= MAX_SHOWN else f"{text[:MAX_SHOWN]}... ({len(text)} characters)"


class _NoAliasLoader(yaml.SafeLoader):
    """yaml's safe loader refusing anchors and aliases: a settings file has no use for them, and nested
    aliases (a 'billion laughs' file) expand to gigabytes wherever the value is printed or copied."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(None, None, "aliases (*name) are not allowed in settings files",
                                              event.start_mark)
        return super().compose_node(parent, index)


def load_yaml_mapping(path: str | Path) -> dict[str, Any]:
    """Read a YAML file that must hold a mapping; refuse anything else in one line. Files over
    :data:`MAX_CONFIG_BYTES` and YAML aliases are refused."""
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"config file '{path}' does not exist")
    try:
        size = path.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise UserInputError(f"config file '{path}' is {size} bytes; settings files are at most {MAX_CONFIG_BYTES}")
        loaded = yaml.load(path.read_text(), Loader=_NoAliasLoader)  # a SafeLoader: no Python objects
    except (OSError, UnicodeDecodeError) as error:
        raise UserInputError(f"cannot read config file '{path}': {getattr(error, 'strerror', None) or error}") from None
    except yaml.YAMLError as error:
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise UserInputError(f"config file '{path}' is not valid YAML: {first_line}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise UserInputError(f"config file '{path}' must hold a mapping of keys to values")
    return loaded


def build_config(
    cls: type[ConfigT], yaml_path: str | Path | None = None, overrides: Mapping[str, Any] | None = None
) -> ConfigT:
    """Defaults, then the YAML file (if any), then explicit overrides (flags that were given)."""
    values: dict[str, Any] = {}
    if yaml_path is not None:
        values.update(load_yaml_mapping(yaml_path))
        source = f"config file '{yaml_path}'"
    else:
        source = "config"
    values.update({key: value for key, value in (overrides or {}).items() if value is not None})
    return config_from_mapping(cls, values, source)
