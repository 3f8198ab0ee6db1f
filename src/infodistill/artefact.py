"""The distilled-set artefact: one ``.safetensors`` file plus a PNG grid beside it.

Tensors: ``images`` (float32, N x C x H x W, normalised input space), ``labels`` (int64, N), and
optionally ``soft_labels`` (float32, N x classes), ``lr`` (a learned step size, one element) and
``stored.<name>``: the parameterisation's stored tensors the images were decoded from (low-rank factors,
multi-formation images; none for plain pixels).
String metadata records where the set came from (dataset, normalisation, class names, method, ipc,
parameterisation, regularizers, seed, iterations, package version). Loading never unpickles.
Writing goes to a temporary file that is renamed into place, so an existing artefact is never left
half-written.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torchvision.utils import make_grid, save_image

from infodistill import __version__
from infodistill.errors import UserInputError
from infodistill.files import atomic_path, atomic_paths

STORED_PREFIX = "stored."


@dataclass(frozen=True)
class SetMetadata:
    """Where a distilled set came from; stored as strings in the safetensors header."""

    dataset: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classes: tuple[str, ...]
    method: str
    ipc: int
    seed: int
    parameterisation: str = "pixels"
    regularizers: dict[str, float] = field(default_factory=dict)
    iterations: int = 0
    version: str = __version__
    extra: dict[str, str] = field(default_factory=dict)

    def to_strings(self) -> dict[str, str]:
        """Flat string mapping for the safetensors header (lists and dicts as JSON)."""
        strings = {}
        for item in dataclasses.fields(self):
            value = getattr(self, item.name)
            strings[item.name] = value if isinstance(value, str) else json.dumps(value)
        return strings

    @classmethod
    def from_strings(cls, strings: dict[str, str], source: str) -> SetMetadata:
        """Parse the header written by :meth:`to_strings`; refuse a header that lacks a field."""
        values: dict[str, Any] = {}
        for item in dataclasses.fields(cls):
            if item.name not in strings:
                if item.default is not dataclasses.MISSING or item.default_factory is not dataclasses.MISSING:
                    continue
                raise UserInputError(f"artefact '{source}' lacks the metadata field '{item.name}'")
            raw = strings[item.name]
            if item.type in ("str", str):
                values[item.name] = raw
                continue
            try:
                parsed = json.loads(raw)
            except json.JSONDecodeError:
                raise UserInputError(
                    f"artefact '{source}': metadata field '{item.name}' is not valid JSON: {raw[:60]!r}"
                ) from None
            values[item.name] = tuple(parsed) if isinstance(parsed, list) else parsed
        return cls(**values)


@dataclass
class DistilledSet:
    """A labelled synthetic (or selected real) image set with its provenance."""

    images: torch.Tensor
    labels: torch.Tensor
    metadata: SetMetadata
    soft_labels: torch.Tensor | None = None
    lr: torch.Tensor | None = None
    stored: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.metadata.classes)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    def validate(self, source: str) -> None:
        """Check shapes, dtypes and label ranges; refuse an inconsistent set naming what is wrong."""
        images, labels = self.images, self.labels
        if images.dim() != 4 or images.dtype != torch.float32:
            raise UserInputError(
                f"{source}: 'images' must be float32 N x C x H x W, got {images.dtype} {list(images.shape)}"
            )
        if labels.dim() != 1 or labels.dtype != torch.int64 or len(labels) != len(images):
            raise UserInputError(
                f"{source}: 'labels' must be int64 of length {len(images)}, got {labels.dtype} {list(labels.shape)}"
            )
        if len(images) == 0:
            raise UserInputError(f"{source}: the set holds no images")
        if labels.min() < 0 or labels.max() >= self.num_classes:
            raise UserInputError(
                f"{source}: labels span {int(labels.min())}..{int(labels.max())} but the set has "
                f"{self.num_classes} classes (0..{self.num_classes - 1})"
            )
        mean, std = self.metadata.mean, self.metadata.std
        if not (isinstance(mean, tuple) and isinstance(std, tuple)):
            raise UserInputError(f"{source}: metadata 'mean' and 'std' must be lists of numbers, got {mean!r}, {std!r}")
        if len(mean) != images.shape[1] or len(std) != images.shape[1]:
            raise UserInputError(
                f"{source}: mean/std have {len(mean)} entries but the images have {images.shape[1]} channels"
            )
        if self.soft_labels is not None and tuple(self.soft_labels.shape) != (len(images), self.num_classes):
            raise UserInputError(
                f"{source}: 'soft_labels' must be {len(images)} x {self.num_classes}, "
                f"got {list(self.soft_labels.shape)}"
            )
        if self.lr is not None and self.lr.numel() != 1:
            raise UserInputError(f"{source}: 'lr' must hold one value, got {self.lr.numel()}")
        self._check_values(source)

    def _check_values(self, source: str) -> None:
        """Refuse values no reader can use, which would otherwise train or score garbage without a word:
        non-finite images or stored tensors, a learned lr that is not a finite number > 0, soft labels that
        are not float probabilities (finite, >= 0, each row summing to 1), and normalisation or metadata
        numbers (std, relabelling temperature, ZCA epsilon) that are not finite or not > 0."""
        tensors = {"images": self.images, **{STORED_PREFIX + name: value for name, value in self.stored.items()}}
        for name, tensor in tensors.items():
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise UserInputError(f"{source}: '{name}' holds NaN or infinite values; every value must be finite")
        if self.lr is not None:
            value = float(self.lr.reshape(-1)[0]) if self.lr.is_floating_point() else None
            if value is None or not (math.isfinite(value) and value > 0):
                raise UserInputError(f"{source}: 'lr' must be a finite float > 0 (a learned step size), "
                                     f"got {self.lr.reshape(-1)[0].item()!r} ({self.lr.dtype})")
        if self.soft_labels is not None:
            _check_soft_labels(self.soft_labels, source)
        metadata = self.metadata
        if not all(_is_number(value) and math.isfinite(value) for value in metadata.mean):
            raise UserInputError(f"{source}: metadata 'mean' must hold finite numbers, got {list(metadata.mean)}")
        if not all(_is_number(value) and math.isfinite(value) and value > 0 for value in metadata.std):
            raise UserInputError(f"{source}: metadata 'std' must hold finite numbers > 0, got {list(metadata.std)}")
        for key in ("relabel_temperature", "zca"):
            if key in metadata.extra:
                _positive_number(metadata.extra[key], key, source)

    def denormalised(self) -> torch.Tensor:
        """Images back in [0, 1] pixel units, clamped, for viewing."""
        mean = torch.tensor(self.metadata.mean).view(1, -1, 1, 1)
        std = torch.tensor(self.metadata.std).view(1, -1, 1, 1)
        return (self.images.detach().cpu() * std + mean).clamp(0, 1)

    def tensors(self) -> dict[str, torch.Tensor]:
        tensors = {"images": self.images.detach().cpu().contiguous(), "labels": self.labels.cpu().contiguous()}
        if self.soft_labels is not None:
            tensors["soft_labels"] = self.soft_labels.detach().cpu().float().contiguous()
        if self.lr is not None:
            tensors["lr"] = self.lr.detach().cpu().float().reshape(1).contiguous()
        tensors.update({STORED_PREFIX + name: value.detach().cpu().contiguous() for name, value in self.stored.items()})
        return tensors


SOFT_LABEL_TOLERANCE = 1e-3
"""How far a row of soft labels may sum from 1 (float32 softmax outputs sum to 1 within about 1e-6)."""


def _check_soft_labels(soft: torch.Tensor, source: str) -> None:
    """Soft labels are per-image class probabilities: float32, finite, >= 0, each row summing to 1."""
    allowed = "float32 probabilities (finite, >= 0, each row summing to 1)"
    if soft.dtype != torch.float32:
        raise UserInputError(f"{source}: 'soft_labels' must be {allowed}, got dtype {soft.dtype}")
    if not bool(torch.isfinite(soft).all()):
        raise UserInputError(f"{source}: 'soft_labels' must be {allowed}, got NaN or infinite values")
    if bool((soft < 0).any()):
        raise UserInputError(f"{source}: 'soft_labels' must be {allowed}, got a negative value {float(soft.min()):g}")
    sums = soft.double().sum(dim=1)
    worst = int((sums - 1).abs().argmax()) if len(sums) else 0
    if len(sums) and abs(float(sums[worst]) - 1) > SOFT_LABEL_TOLERANCE:
        raise UserInputError(f"{source}: 'soft_labels' must be {allowed}, got row {worst} summing to "
                             f"{float(sums[worst]):g}")


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _positive_number(text: str, key: str, source: str) -> float:
    """A metadata number that must be finite and > 0 (a temperature, an epsilon), or a one-line refusal."""
    try:
        value = float(text)
    except (TypeError, ValueError):
        value = float("nan")
    if not (math.isfinite(value) and value > 0):
        raise UserInputError(f"{source}: metadata '{key}' must be a finite number > 0, got {text!r}")
    return value


def grid_path_for(artefact_path: str | Path) -> Path:
    """The PNG grid that lives beside an artefact: ``set.safetensors`` -> ``set.png``."""
    return Path(artefact_path).with_suffix(".png")


def _grid_image(distilled: DistilledSet) -> torch.Tensor:
    """The PNG grid's image: the set's images, one row per class (classes in label order)."""
    order = torch.argsort(distilled.labels, stable=True)
    counts = torch.bincount(distilled.labels, minlength=distilled.num_classes)
    per_row = int(counts.max())
    images = distilled.denormalised()[order]
    if int(counts.min()) != per_row:  # unequal classes: pad each row with blanks so rows stay classes
        rows = []
        for label in range(distilled.num_classes):
            members = images[distilled.labels[order] == label]
            blank = torch.ones(per_row - len(members), *images.shape[1:])
            rows.append(torch.cat([members, blank]))
        images = torch.cat(rows)
    return make_grid(images, nrow=per_row, padding=1, pad_value=1.0)


def save_grid(distilled: DistilledSet, path: str | Path) -> Path:
    """Write a PNG grid of the images, one row per class (classes in label order)."""
    with atomic_path(path) as temporary:
        save_image(_grid_image(distilled), temporary, format="png")
    return Path(path)


def save_set(distilled: DistilledSet, path: str | Path, grid: bool = True) -> Path:
    """Write the artefact atomically (and its PNG grid); return the artefact path."""
    distilled.validate(f"artefact '{path}'")
    path = Path(path)
    targets = [path, grid_path_for(path)] if grid else [path]
    try:
        with atomic_paths(*targets) as temporaries:  # the old set and its PNG stay until both new files are written
            for target, temporary in zip(targets, temporaries):
                try:
                    if target == path:
                        save_file(distilled.tensors(), str(temporary), metadata=distilled.metadata.to_strings())
                    else:
                        save_image(_grid_image(distilled), temporary, format="png")
                except OSError as error:
                    raise UserInputError(f"cannot write '{target}': {error.strerror or error}") from None
    except OSError as error:
        raise UserInputError(f"cannot write '{path}': {error.strerror or error}") from None
    return path


def load_set(path: str | Path) -> DistilledSet:
    """Read and validate an artefact. Missing, truncated or foreign files give one clear error."""
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"artefact '{path}' does not exist (expected a .safetensors file)")
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), framework="pt") as handle:
            strings = handle.metadata() or {}
    except (SafetensorError, OSError, ValueError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise UserInputError(
            f"artefact '{path}' is not a readable safetensors file ({reason}); it may be truncated or of another format"
        ) from None
    missing = [name for name in ("images", "labels") if name not in tensors]
    if missing:
        raise UserInputError(f"artefact '{path}' lacks the tensor '{missing[0]}' (needs 'images' and 'labels')")
    metadata = SetMetadata.from_strings(strings, str(path))
    distilled = DistilledSet(
        images=tensors["images"],
        labels=tensors["labels"],
        metadata=metadata,
        soft_labels=tensors.get("soft_labels"),
        lr=tensors.get("lr"),
        stored={name[len(STORED_PREFIX):]: value for name, value in tensors.items() if name.startswith(STORED_PREFIX)},
    )
    distilled.validate(f"artefact '{path}'")
    return distilled
