"""Low-rank parameterisation (Yang et al., NeurIPS 2023, "An Efficient Dataset Condensation Plugin").

Every synthetic image is stored, per channel, as a product ``A @ B`` of an ``H x r`` and an ``r x W``
factor: ``C * r * (H + W)`` floats instead of ``C * H * W``. At the storage of ``ipc`` pixel images per
class the set therefore holds ``ipc * floor(H * W / (r * (H + W)))`` images per class (28 x 28 at
rank 2: x7; 32 x 32 at rank 2: x8), and any method reads the decoded images where it read pixels.

Initialisation:

- ``noise``: both factors standard normal scaled by ``r ** -0.25``, so each entry of ``A @ B`` (a sum
  of ``r`` products) has unit variance, like the pixel set's noise init;
- ``real``: each image starts as the best rank-``r`` approximation of a real image (truncated SVD per
  channel, ``A = U_r sqrt(S_r)``, ``B = sqrt(S_r) V_r^T``). The official code initialises from noise
  (its real-image path does not work); the SVD start is our improvement, and it reproduces an image
  of rank <= r exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from infodistill.data import ClassSampler
from infodistill.errors import UserInputError
from infodistill.precision import autocast_disabled
from infodistill.settings import AT_LEAST_ONE, setting
from infodistill.synthetic.base import SyntheticSet, register_parameterisation
from infodistill.synthetic.pixels import check_init_and_shape


def images_per_stored(height: int, width: int, rank: int) -> int:
    """How many rank-``rank`` images fit in the floats of one ``height x width`` pixel image."""
    return (height * width) // (rank * (height + width))


def check_rank(rank: object, height: int, width: int) -> int:
    """``rank`` as an int, or a one-line error when it is outside 1..min(H, W) or buys no image."""
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= min(height, width):
        raise UserInputError(f"rank {rank!r} is invalid; it must be an integer in 1..{min(height, width)} "
                             f"(min(H, W) of {height}x{width} images)")
    if images_per_stored(height, width, rank) == 0:
        largest = max(r for r in range(1, min(height, width) + 1) if images_per_stored(height, width, r) > 0)
        raise UserInputError(f"rank {rank} stores more floats per image than a {height}x{width} pixel image; "
                             f"use rank <= {largest}")
    return rank


def truncated_svd_factors(images: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """Factors (N x C x H x r, N x C x r x W) of the best rank-``rank`` approximation of each channel."""
    left, singular, right_t = torch.linalg.svd(images.double(), full_matrices=False)
    root = singular[..., :rank].sqrt()
    factor_a = left[..., :rank] * root.unsqueeze(-2)
    factor_b = root.unsqueeze(-1) * right_t[..., :rank, :]
    return factor_a.to(images.dtype), factor_b.to(images.dtype)


@dataclass(frozen=True)
class LowRankSettings:
    """Settings of low-rank images (``--param lowrank``)."""

    title: ClassVar[str] = "low-rank images (--param lowrank)"
    rank: int = setting(2, "rank of each image channel A @ B; the images per class grow by floor(H*W / (R*(H+W))) "
                        "at the same storage", bounds=AT_LEAST_ONE, metavar="R")


@register_parameterisation("lowrank")
class LowRankSet(SyntheticSet):
    """``images_per_class`` images per class, each channel stored as ``factor_a @ factor_b`` of rank ``rank``.

    ``stored_per_class`` is the IPC whose pixel storage the set may use; ``images_per_class`` (what
    methods, regularizers and the artefact see) is ``stored_per_class * images_per_stored(H, W, rank)``.
    """

    settings = LowRankSettings

    def __init__(self, num_classes: int, stored_per_class: int, image_shape: tuple[int, int, int],
                 rank: int = 2) -> None:
        channels, height, width = image_shape
        self.rank = check_rank(rank, height, width)
        self.stored_per_class = stored_per_class
        self.image_shape = tuple(image_shape)
        super().__init__(num_classes, stored_per_class * images_per_stored(height, width, self.rank))
        count = num_classes * self.images_per_class
        self.factor_a = nn.Parameter(torch.zeros(count, channels, height, self.rank))
        self.factor_b = nn.Parameter(torch.zeros(count, channels, self.rank, width))

    @classmethod
    def initialise(cls, sampler: ClassSampler, images_per_class: int, init: str, generator: torch.Generator,
                   rank: int = 2) -> LowRankSet:
        """From the truncated SVD of real images of each class, or from scaled standard-normal factors."""
        image_shape = check_init_and_shape(sampler, init, "the low-rank parameterisation")
        rank = check_rank(rank, image_shape[1], image_shape[2])
        synthetic = cls(sampler.num_classes, images_per_class, image_shape, rank=rank)
        needed = synthetic.images_per_class
        if init == "real" and needed > sampler.smallest_class_size():
            raise UserInputError(
                f"init 'real' at rank {rank} draws {needed} real images per class, but the smallest class has "
                f"{sampler.smallest_class_size()}; lower ipc, raise rank, or use init 'noise'")
        with torch.no_grad():
            if init == "real":
                real = sampler.sample_classes(needed, generator).flatten(0, 1).float()
                factor_a, factor_b = truncated_svd_factors(real, rank)
                synthetic.factor_a.copy_(factor_a)
                synthetic.factor_b.copy_(factor_b)
            else:
                scale = rank ** -0.25
                synthetic.factor_a.copy_(torch.randn(synthetic.factor_a.shape, generator=generator) * scale)
                synthetic.factor_b.copy_(torch.randn(synthetic.factor_b.shape, generator=generator) * scale)
        return synthetic

    def images(self) -> Tensor:
        with autocast_disabled(self.factor_a.device):  # decoded in float32 also under mixed precision
            return self.factor_a @ self.factor_b

    def class_images(self, label: int) -> Tensor:
        """The decoded images of one class, multiplying only that class's factors."""
        start = label * self.images_per_class
        end = start + self.images_per_class
        with autocast_disabled(self.factor_a.device):
            return self.factor_a[start:end] @ self.factor_b[start:end]

    def budget_floats(self) -> int:
        """Floats of the pixel set this one replaces: ``classes * stored_per_class * C * H * W``."""
        channels, height, width = self.image_shape
        return self.num_classes * self.stored_per_class * channels * height * width
