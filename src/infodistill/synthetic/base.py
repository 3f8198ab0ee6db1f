"""The synthetic set: learnable stored tensors, decoded into labelled images on demand."""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import nn

from infodistill.errors import UserInputError


class SyntheticSet(nn.Module):
    """A parameterisation of a labelled synthetic set.

    Subclasses hold the learnable tensors as parameters and decode them in :meth:`images`.
    ``labels`` is a buffer aligned with the decoded images, ordered by class (class 0 first).
    Methods and regularizers read images only through this interface, so any parameterisation
    (pixels, low-rank factors, multi-formation) works with any of them.
    """

    labels: torch.Tensor
    name: str = "set"
    rows_by_class: ClassVar[bool] = True
    """Every stored tensor holds its rows class by class (class 0 first, equally many per class), and a
    class's images decode from its own rows alone. A run split over processes relies on it to step and
    gather each class's rows (``docs/distributed.md``); a parameterisation whose stored tensors mix
    classes (a shared basis) sets False and is refused there."""
    settings: ClassVar[type | None] = None
    """The dataclass declaring this parameterisation's settings (their help and range), or None."""

    @classmethod
    def artefact_metadata(cls, config: Any) -> dict[str, str]:
        """What a run's artefact records of this parameterisation: its settings, as strings."""
        if cls.settings is None:
            return {}
        return {field.name: str(getattr(config, field.name)) for field in dataclasses.fields(cls.settings)}

    def __init__(self, num_classes: int, images_per_class: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.images_per_class = images_per_class
        self.register_buffer("labels", torch.arange(num_classes).repeat_interleave(images_per_class))

    def images(self) -> torch.Tensor:
        """All decoded images, N x C x H x W, in the normalised input space, ordered by class."""
        raise NotImplementedError

    def forward(self) -> torch.Tensor:
        """Same as :meth:`images`, so ``torch.func.functional_call`` can decode other stored tensors."""
        return self.images()

    def class_images(self, label: int) -> torch.Tensor:
        """The decoded images of one class."""
        start = label * self.images_per_class
        return self.images()[start : start + self.images_per_class]

    def storage_floats(self) -> int:
        """Floats the set stores (its learnable tensors): what "same memory" compares."""
        return sum(parameter.numel() for parameter in self.parameters())

    def budget_floats(self) -> int:
        """Floats of the pixel set of the same IPC, the budget this set must not exceed."""
        return self.storage_floats()

    def stored_tensors(self) -> dict[str, torch.Tensor]:
        """The stored tensors to keep in the artefact beside the decoded images (none for pixels)."""
        return {name: parameter.detach() for name, parameter in self.named_parameters()}

    def images_by_class(self) -> torch.Tensor:
        """Decoded images grouped per class: classes x images_per_class x C x H x W."""
        decoded = self.images()
        return decoded.view(self.num_classes, self.images_per_class, *decoded.shape[1:])


PARAMETERISATION_REGISTRY: dict[str, Callable[..., SyntheticSet]] = {}
"""Name (``--param NAME``) -> initialiser ``initialise(sampler, ipc, init, generator, **settings)``."""


def parameterisation_class(name: str) -> type[SyntheticSet]:
    """The registered class for ``name``, or a one-line error listing the known parameterisations."""
    if name not in PARAMETERISATION_REGISTRY:
        raise UserInputError(f"param '{name}' is not one of: {', '.join(sorted(PARAMETERISATION_REGISTRY))}")
    return PARAMETERISATION_REGISTRY[name].__self__  # type: ignore[attr-defined]


def register_parameterisation(name: str) -> Callable[[Any], Any]:
    """Class decorator: make a parameterisation available by name; its ``initialise`` classmethod builds it."""

    def decorate(cls: Any) -> Any:
        if name in PARAMETERISATION_REGISTRY:
            raise ValueError(f"parameterisation '{name}' is registered twice")
        cls.name = name
        PARAMETERISATION_REGISTRY[name] = cls.initialise
        return cls

    return decorate


def build_synthetic(name: str, sampler: Any, ipc: int, init: str, generator: torch.Generator,
                    **settings: Any) -> SyntheticSet:
    """Initialise parameterisation ``name`` with ``ipc`` stored images per class.

    ``settings`` may hold options of every parameterisation (e.g. ``factor``); each receives those
    its ``initialise`` accepts, so one config serves all.
    """
    if name not in PARAMETERISATION_REGISTRY:
        raise UserInputError(f"param '{name}' is not one of: {', '.join(sorted(PARAMETERISATION_REGISTRY))}")
    initialise = PARAMETERISATION_REGISTRY[name]
    accepted = inspect.signature(initialise).parameters
    chosen = {key: value for key, value in settings.items() if key in accepted and value is not None}
    return initialise(sampler, ipc, init, generator, **chosen)


INITIALISE_ARGUMENTS = ("sampler", "images_per_class", "init", "generator")
"""The arguments every parameterisation's ``initialise`` takes; the ones after them are its settings."""


def parameterisation_settings(name: str) -> frozenset[str]:
    """The settings parameterisation ``name`` reads (its ``initialise``'s arguments beyond the common ones,
    e.g. ``rank``): validation refuses them for another parameterisation instead of ignoring them."""
    parameters = inspect.signature(PARAMETERISATION_REGISTRY[name]).parameters
    return frozenset(parameters) - set(INITIALISE_ARGUMENTS)
