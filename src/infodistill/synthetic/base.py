"""The synthetic set: learnable stored tensors, decoded into labelled images on demand."""

from __future__ import annotations

import torch
from torch import nn


class SyntheticSet(nn.Module):
    """A parameterisation of a labelled synthetic set.

    Subclasses hold the learnable tensors as parameters and decode them in :meth:`images`.
    ``labels`` is a buffer aligned with the decoded images, ordered by class (class 0 first).
    Methods and regularizers read images only through this interface, so any parameterisation
    (pixels, low-rank factors, multi-formation) works with any of them.
    """

    labels: torch.Tensor

    def __init__(self, num_classes: int, images_per_class: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.images_per_class = images_per_class
        self.register_buffer("labels", torch.arange(num_classes).repeat_interleave(images_per_class))

    def images(self) -> torch.Tensor:
        """All decoded images, N x C x H x W, in the normalised input space, ordered by class."""
        raise NotImplementedError

    def class_images(self, label: int) -> torch.Tensor:
        """The decoded images of one class."""
        start = label * self.images_per_class
        return self.images()[start : start + self.images_per_class]

    def images_by_class(self) -> torch.Tensor:
        """Decoded images grouped per class: classes x images_per_class x C x H x W."""
        decoded = self.images()
        return decoded.view(self.num_classes, self.images_per_class, *decoded.shape[1:])
