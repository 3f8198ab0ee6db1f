"""What a regularizer is: a weighted loss over the synthetic set, added by the loop to every image update."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch


class Regularizer(ABC):
    """A loss term over labelled synthetic images, independent of the distillation method."""

    name: str = "regularizer"

    @abstractmethod
    def loss(self, images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Scalar loss over (images, labels); ``generator`` supplies any randomness (e.g. proxy choice)."""
