"""ZCA whitening of normalised images, as trajectory matching (MTT) optionally trains on.

The images are flattened to D-vectors x, centred by their mean m, and mapped to ``W (x - m)`` with

    C = cov(x) (unbiased, float64),   C = U diag(lambda) U^T,   W = U diag(1 / sqrt(lambda + epsilon)) U^T.

``epsilon`` regularises the small eigenvalues (MTT uses kornia's ZCA with epsilon 0.1); W is
symmetric, so whitening is one matrix product per image, and ``U diag(sqrt(lambda + epsilon)) U^T``
undoes it. The transform is fitted on the (normalised) training split only and applied to both splits.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from infodistill.data.datasets import RealData
from infodistill.errors import UserInputError


def _check_epsilon(epsilon: float) -> float:
    if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)) or not math.isfinite(epsilon) or epsilon <= 0:
        raise UserInputError(f"ZCA epsilon must be a positive finite number, got {epsilon!r}")
    return float(epsilon)


class ZCAWhitening:
    """A ZCA whitening transform fitted on N x C x H x W float images (deterministic: float64 on the CPU).

    ``mean`` (D) and ``matrix`` (D x D, symmetric) are float64 on the CPU; calling the object whitens
    a batch of the fitted image shape and returns float32 of the same shape, on the batch's device.
    """

    def __init__(self, images: Tensor, epsilon: float = 0.1, chunk: int = 4096) -> None:
        self.epsilon = _check_epsilon(epsilon)
        if images.dim() != 4 or len(images) < 2:
            raise UserInputError(
                f"ZCA whitening is fitted on at least 2 images N x C x H x W, got {list(images.shape)}"
            )
        self.image_shape = tuple(images.shape[1:])
        flat = images.detach().reshape(len(images), -1)
        dimension = flat.shape[1]
        total = torch.zeros(dimension, dtype=torch.float64)
        for block in flat.split(chunk):
            total += block.to("cpu", torch.float64).sum(dim=0)
        self.mean = total / len(flat)
        covariance = torch.zeros(dimension, dimension, dtype=torch.float64)
        for block in flat.split(chunk):
            centred = block.to("cpu", torch.float64) - self.mean
            covariance += centred.T @ centred
        covariance /= len(flat) - 1
        eigenvalues, eigenvectors = torch.linalg.eigh(covariance)
        self.eigenvalues = eigenvalues.clamp_min(0)  # rounding can leave null directions slightly negative
        scale = (self.eigenvalues + self.epsilon).rsqrt()
        self.matrix = (eigenvectors * scale) @ eigenvectors.T
        self.inverse_matrix = (eigenvectors / scale) @ eigenvectors.T
        self._on_device: dict[tuple[torch.device, bool], tuple[Tensor, Tensor]] = {}

    def _prepared(self, device: torch.device, inverse: bool) -> tuple[Tensor, Tensor]:
        key = (device, inverse)
        if key not in self._on_device:
            matrix = self.inverse_matrix if inverse else self.matrix
            self._on_device[key] = (self.mean.to(device, torch.float32), matrix.to(device, torch.float32))
        return self._on_device[key]

    def _check_shape(self, images: Tensor) -> None:
        if images.dim() != 4 or tuple(images.shape[1:]) != self.image_shape:
            expected = " x ".join(str(side) for side in self.image_shape)
            raise UserInputError(f"ZCA whitening was fitted on N x {expected} images, got {list(images.shape)}")

    def __call__(self, images: Tensor) -> Tensor:
        """``W (x - mean)`` for every image of the N x C x H x W batch; float32, same shape."""
        self._check_shape(images)
        mean, matrix = self._prepared(images.device, inverse=False)
        return ((images.reshape(len(images), -1).to(torch.float32) - mean) @ matrix).reshape(images.shape)

    def inverse(self, images: Tensor) -> Tensor:
        """Undo :meth:`__call__`: ``W^-1 y + mean``; float32, same shape."""
        self._check_shape(images)
        mean, matrix = self._prepared(images.device, inverse=True)
        return (images.reshape(len(images), -1).to(torch.float32) @ matrix + mean).reshape(images.shape)


@dataclass
class WhitenedData(RealData):
    """``RealData`` whose normalised space is ZCA-whitened: :meth:`normalise` (and so ``train_tensors``
    and ``test_tensors``) normalises, then whitens with a transform fitted once on the normalised
    training split; :meth:`denormalise` undoes both. ``info`` is the plain dataset's."""

    zca_epsilon: float = 0.1
    _whitening: ZCAWhitening | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def whitening(self) -> ZCAWhitening:
        """The transform, fitted on the first use."""
        if self._whitening is None:
            self._whitening = ZCAWhitening(super().normalise(self.train_images), self.zca_epsilon)
        return self._whitening

    def normalise(self, images_uint8: Tensor) -> Tensor:
        """Pixel values 0..255 -> normalised, whitened float32 (C x H x W or a batch)."""
        normalised = super().normalise(images_uint8)
        if normalised.dim() == 3:
            return self.whitening(normalised.unsqueeze(0)).squeeze(0)
        return self.whitening(normalised)

    def denormalise(self, images: Tensor) -> Tensor:
        """Inverse of :meth:`normalise`: float images in [0, 1] pixel units (not clamped)."""
        if images.dim() == 3:
            return super().denormalise(self.whitening.inverse(images.unsqueeze(0)).squeeze(0))
        return super().denormalise(self.whitening.inverse(images))


def whiten(real: RealData, epsilon: float) -> WhitenedData:
    """``real`` with its normalised space ZCA-whitened with regularisation ``epsilon`` (> 0)."""
    epsilon = _check_epsilon(epsilon)
    if isinstance(real, WhitenedData) and real.zca_epsilon == epsilon:
        return real
    plain = {item.name: getattr(real, item.name) for item in dataclasses.fields(RealData)}
    return WhitenedData(**plain, zca_epsilon=epsilon)
