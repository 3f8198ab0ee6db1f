"""What a regularizer is: a weighted loss over the synthetic set, added by the loop to every image update."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from infodistill.data import ClassSampler, DatasetInfo
from infodistill.registry import Registry


@dataclass
class RegularizerSetup:
    """What a regularizer may read when the loop builds it, once per run (:meth:`Regularizer.build`)."""

    config: Any
    """The run's settings (a ``DistillConfig``): the regularizer reads the ones it declares."""
    sampler: ClassSampler
    info: DatasetInfo
    device: torch.device
    pool: Any | None
    """The run's proxy pool (``--proxies``), or None."""
    generator: torch.Generator
    """A random stream of the regularizer's own, for initialising tensors it learns."""
    optimizer: torch.optim.Optimizer
    """The run's optimiser: tensors the regularizer learns join it as a named parameter group, which the loop
    steps with the images and checkpoints."""


class Regularizer(ABC):
    """A loss term over labelled synthetic images, independent of the distillation method."""

    name: ClassVar[str] = "regularizer"
    settings: ClassVar[type | None] = None
    """The dataclass declaring this regularizer's settings (their help and range); the run's config holds them."""
    config_fields: ClassVar[frozenset[str]] = frozenset()
    """The settings this regularizer reads beside its weight: validation refuses one that is set while the
    regularizer is off, instead of ignoring it."""
    switch: ClassVar[str] = ""
    """How a config turns the regularizer on, for error messages (e.g. ``"mim_weight > 0"``)."""
    weight_field: ClassVar[str] = ""
    """The setting that holds the term's weight (and turns it on), e.g. ``"mim_weight"``."""

    @classmethod
    def enabled(cls, config: Any) -> bool:
        """Whether ``config`` turns this regularizer on."""
        raise NotImplementedError(f"regularizer '{cls.name}' does not say when it is on")

    @classmethod
    def build(cls, setup: RegularizerSetup) -> Regularizer:
        """The regularizer of a run whose config turns it on."""
        raise NotImplementedError(f"regularizer '{cls.name}' cannot be built from a run's settings")

    @classmethod
    def every(cls, config: Any) -> int:
        """How many iterations apart the loop computes the term (1: every iteration)."""
        return 1

    @classmethod
    def artefact_metadata(cls, config: Any) -> dict[str, str]:
        """String metadata this regularizer adds to the artefact of a run it was on in (its settings)."""
        return {name: str(getattr(config, name)) for name in sorted(cls.config_fields)}
    class_decomposable: ClassVar[bool] = False
    """True when the loss over the whole set is a sum of per-class parts, each depending only on its
    class's images, so that a run split over processes can compute it class by class (:meth:`class_share`)."""

    @abstractmethod
    def loss(self, images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Scalar loss over (images, labels); ``generator`` supplies any randomness (e.g. proxy choice)."""

    def class_share(self, images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator,
                    total_samples: int, total_classes: int) -> torch.Tensor:
        """The part of :meth:`loss` carried by the classes present in (images, labels), a subset of a set of
        ``total_samples`` images in ``total_classes`` classes: over a partition of the classes the parts
        sum to the loss of the whole set. It makes the same random draws as :meth:`loss`."""
        raise NotImplementedError(f"regularizer '{self.name}' does not split over classes")


REGULARIZER_REGISTRY = Registry("regularizer")
"""Regularizer name -> class (the term's name in logs and artefacts), filled as each module is imported."""

register_regularizer = REGULARIZER_REGISTRY.register
"""Class decorator: make a regularizer known to the loop by name."""


def regularizers_on(config: Any) -> list[str]:
    """The names of the registered regularizers ``config`` turns on, in registration order."""
    return [name for name, cls in REGULARIZER_REGISTRY.items() if cls.enabled(config)]
