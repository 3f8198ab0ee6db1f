"""Registries: the extension points (methods, regularizers) filled by a class decorator as each module loads.

A registry is a dict from name to class with two additions: :meth:`Registry.register`, a decorator that
sets the class's ``name`` and refuses a name registered twice, and :meth:`Registry.lookup`, which refuses an
unknown name in one line listing the known ones (the user's error, exit status 2).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from infodistill.errors import UserInputError


class Registry(dict[str, Any]):
    """Name -> registered class, for one ``kind`` of part ("method", "regularizer")."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind

    def register(self, name: str) -> Callable[[Any], Any]:
        """Class decorator: make a class available by ``name`` (and set its ``name``)."""

        def decorate(cls: Any) -> Any:
            if name in self:
                raise ValueError(f"{self.kind} '{name}' is registered twice")
            cls.name = name
            self[name] = cls
            return cls

        return decorate

    def lookup(self, name: str) -> Any:
        """The class registered as ``name``, or a one-line error listing the known names."""
        if name not in self:
            raise UserInputError(f"unknown {self.kind} '{name}'; choose one of: {', '.join(sorted(self))}")
        return self[name]
