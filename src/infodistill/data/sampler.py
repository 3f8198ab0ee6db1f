"""Class-wise random batches of real images, drawn from tensors already in memory.

Distillation methods (gradient and distribution matching, the CMI regularizer) repeatedly need "n
real images of class c"; indexing per-class index tensors built once keeps that free of disk reads
and of scanning the labels every step.
"""

from __future__ import annotations

import torch

from infodistill.errors import UserInputError


class ClassSampler:
    """Random batches of real images of one class, from tensors in memory (no disk reads after construction)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, num_classes: int):
        """``images``: N x ... (any dtype, usually normalised float); ``labels``: N integers in 0..num_classes-1."""
        if num_classes < 1:
            raise UserInputError(f"num_classes must be at least 1, got {num_classes}")
        if labels.dim() != 1 or len(labels) != len(images):
            raise UserInputError(
                f"labels must be one label per image: got labels {list(labels.shape)} for images {list(images.shape)}"
            )
        labels = labels.to(torch.int64)
        if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
            raise UserInputError(
                f"labels span {int(labels.min())}..{int(labels.max())}; allowed are 0..{num_classes - 1}"
            )
        self.images = images
        self.labels = labels
        self.num_classes = num_classes
        self._indices_by_class = [
            torch.nonzero(labels == c, as_tuple=False).flatten().to(images.device) for c in range(num_classes)
        ]

    def _check_class(self, c: int) -> None:
        if not 0 <= c < self.num_classes:
            raise UserInputError(f"class {c} is out of range; allowed are 0..{self.num_classes - 1}")

    def _check_n(self, c: int, n: int, what: str = "n") -> None:
        size = self.class_count(c)
        if n <= 0 or n > size:
            raise UserInputError(
                f"{what}={n} images cannot be drawn from class {c}, which has {size}; allowed are 1..{size}"
            )

    def class_count(self, c: int) -> int:
        """Number of images of class ``c``."""
        self._check_class(c)
        return len(self._indices_by_class[c])

    def counts(self) -> torch.Tensor:
        """Images per class, int64 tensor of length ``num_classes``."""
        return torch.tensor([len(indices) for indices in self._indices_by_class], dtype=torch.int64)

    def smallest_class_size(self) -> int:
        """Size of the smallest class: the largest ``n`` that :meth:`sample_classes` accepts."""
        return min(len(indices) for indices in self._indices_by_class)

    def _draw_indices(self, c: int, n: int, generator: torch.Generator) -> torch.Tensor:
        indices = self._indices_by_class[c]
        order = torch.randperm(len(indices), generator=generator, device=generator.device)[:n]
        return indices[order.to(indices.device)]

    def sample(self, c: int, n: int, generator: torch.Generator) -> torch.Tensor:
        """``n`` distinct images of class ``c`` (n x ...), drawn without replacement."""
        self._check_class(c)
        self._check_n(c, n)
        return self.images[self._draw_indices(c, n, generator)]

    def sample_classes(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """One batch of ``n`` distinct images per class, stacked as C x n x ... (classes in order)."""
        for c in range(self.num_classes):
            self._check_n(c, n)
        return torch.stack([self.images[self._draw_indices(c, n, generator)] for c in range(self.num_classes)])

    def random_subset(self, ipc: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """A class-balanced random subset: ``ipc`` images per class, ordered by class, and their labels."""
        for c in range(self.num_classes):
            self._check_n(c, ipc, what="ipc")
        indices = torch.cat([self._draw_indices(c, ipc, generator) for c in range(self.num_classes)])
        labels = torch.arange(self.num_classes, dtype=torch.int64).repeat_interleave(ipc)
        return self.images[indices], labels.to(self.labels.device)
