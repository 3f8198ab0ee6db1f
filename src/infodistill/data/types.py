"""What a real dataset is in memory: its fixed description, its splits as uint8 tensors, and the spec a
registry entry gives (reader, downloader)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch


@dataclass(frozen=True)
class DatasetInfo:
    """What a model and the evaluation need to know about a dataset, without its pixels."""

    name: str
    channels: int
    image_size: tuple[int, int]
    num_classes: int
    class_names: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError(f"{self.name}: mean/std need {self.channels} entries, got {self.mean} / {self.std}")
        if len(self.class_names) != self.num_classes:
            raise ValueError(f"{self.name}: {self.num_classes} classes but {len(self.class_names)} class names")


@dataclass
class RealData:
    """A dataset held in memory as uint8 images (N x C x H x W) and int64 labels, both splits."""

    info: DatasetInfo
    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor

    def _statistics(self, reference: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean = torch.tensor(self.info.mean, dtype=torch.float32, device=reference.device).view(-1, 1, 1)
        std = torch.tensor(self.info.std, dtype=torch.float32, device=reference.device).view(-1, 1, 1)
        return mean, std

    def normalise(self, images_uint8: torch.Tensor) -> torch.Tensor:
        """Pixel values 0..255 -> float32 ``(x / 255 - mean) / std`` per channel (C x H x W or a batch)."""
        mean, std = self._statistics(images_uint8)
        return (images_uint8.to(torch.float32) / 255.0 - mean) / std

    def denormalise(self, images: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`normalise`: float images in [0, 1] pixel units (not clamped)."""
        mean, std = self._statistics(images)
        return images.to(torch.float32) * std + mean

    def train_tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised float32 training images and their labels."""
        return self.normalise(self.train_images), self.train_labels

    def test_tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised float32 test images and their labels."""
        return self.normalise(self.test_images), self.test_labels

    def training_subset(self, per_class: int, seed: int) -> RealData:
        """The same data with a class-balanced random part of the training split (``per_class`` images
        of each class, drawn with ``seed``); the test split is kept whole. For quick experts and demos."""
        from infodistill.data.sampler import ClassSampler

        sampler = ClassSampler(self.train_images, self.train_labels, self.info.num_classes)
        images, labels = sampler.random_subset(per_class, torch.Generator().manual_seed(seed))
        return dataclasses.replace(self, train_images=images, train_labels=labels)


class Splits(NamedTuple):
    """What a reader returns: uint8 N x C x H x W arrays, integer labels, optional class names."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    class_names: tuple[str, ...] | None = None


class MissingFiles(Exception):
    """Raised by a reader when the files are not there; carries every path it looked for."""

    def __init__(self, paths: Sequence[str]):
        super().__init__(", ".join(paths))
        self.paths = list(paths)


@dataclass(frozen=True)
class DatasetSpec:
    """One registered dataset: its fixed description, how to read it and how to download it.

    ``read(root)`` returns :class:`Splits` or raises :class:`MissingFiles`; ``download(root)``
    fetches the files into the data root; ``describe(root)`` (optional) refines the fixed info from
    small side files (Tiny-ImageNet's class names); ``how_to_get`` is appended to the missing-files
    message.
    """

    info: DatasetInfo
    read: Callable[[Path], Splits]
    download: Callable[[Path], None]
    describe: Callable[[Path], DatasetInfo] | None = None
    how_to_get: str = ""
