"""Networks trained on real data, stored one per file: the shared directory reader.

Proxy pools (:mod:`infodistill.proxies`) and expert trajectories (:mod:`infodistill.experts`) are
directories of numbered ``<stem>-NNNN.safetensors`` files, one trained network each, whose string
metadata says which data the network fits and how it was trained. This module holds what both kinds
share: the metadata machinery (:class:`FileMetadata`), listing the numbered files, the top-up rules of a
build (:func:`_top_up`: files already there count, new ones get seeds of their own), the reader that
opens every file once and checks it (:func:`read_trained_files`) and the cache that shares what was read
among the runs of one process (:class:`LoadCache`). Files are read with safetensors only (never unpickled).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from infodistill.data import ClassSampler, DatasetInfo
from infodistill.errors import UserInputError
from infodistill.seeds import run_seeds


def _parse_image_size(text: str) -> tuple[int, int]:
    height, width = text.lower().split("x")
    return int(height), int(width)


def _parse_floats(text: str) -> tuple[float, ...]:
    values = json.loads(text)
    if not isinstance(values, list):
        raise TypeError("not a list")
    return tuple(float(value) for value in values)


COMMON_PARSERS: dict[str, Callable[[str], Any]] = {
    "dataset": str, "augment": str, "version": str, "format": str,
    "channels": int, "num_classes": int, "seed": int, "epochs": int, "batch_size": int, "train_per_class": int,
    "lr": float, "test_accuracy": float,
    "image_size": _parse_image_size, "mean": _parse_floats, "std": _parse_floats,
}
"""Parser of every metadata field that proxies and experts share, by name."""

DATA_FIELDS = ("dataset", "num_classes", "channels", "image_size", "mean", "std")
"""Metadata that must match the dataset a pool (or a set of experts) is used with."""


class FileMetadata:
    """The string metadata of one file of a directory of trained networks (proxies, experts).

    A subclass is a frozen dataclass whose fields are the metadata; ``FORMAT`` is the value of its
    ``format`` field, ``KIND`` names the file in messages, ``COMMAND`` is the subcommand writing it and
    ``PARSERS`` holds a parser for every field.
    """

    FORMAT: ClassVar[str]
    KIND: ClassVar[str]
    COMMAND: ClassVar[str]
    PARSERS: ClassVar[dict[str, Callable[[str], Any]]]

    def to_strings(self) -> dict[str, str]:
        """Flat string mapping for the safetensors header (image size as ``HxW``, tuples as JSON lists)."""
        strings = {}
        for item in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, item.name)
            if item.name == "image_size":
                strings[item.name] = f"{value[0]}x{value[1]}"
            elif isinstance(value, tuple):
                strings[item.name] = json.dumps(list(value))
            else:
                strings[item.name] = str(value) if not isinstance(value, float) else repr(value)
        return strings

    def first_mismatch(self, expected: dict[str, Any], fields: Sequence[str]) -> tuple[str, str, str] | None:
        """The first of ``fields`` whose value differs from ``expected``, as (name, found, expected) for
        messages; None when all agree."""
        for name in fields:
            found = getattr(self, name)
            if not _same_value(found, expected[name]):
                return name, _shown(found), _shown(expected[name])
        return None

    @classmethod
    def from_strings(cls, strings: dict[str, str], path: Path) -> Any:
        """Parse a header written by :meth:`to_strings`; refuse a missing or malformed field, naming the file.
        A field with a default (added in a later version) may be missing: it takes the default."""
        if strings.get("format") != cls.FORMAT:
            raise UserInputError(
                f"{cls.KIND} file {path} has format {strings.get('format')!r}, expected {cls.FORMAT!r}: "
                f"it was not written by 'infodistill {cls.COMMAND}'"
            )
        values: dict[str, Any] = {}
        for item in dataclasses.fields(cls):  # type: ignore[arg-type]
            if item.name not in strings:
                if item.default is not dataclasses.MISSING:
                    continue
                raise UserInputError(f"{cls.KIND} file {path} lacks the metadata field '{item.name}'")
            raw = strings[item.name]
            try:
                values[item.name] = cls.PARSERS[item.name](raw)
            except (ValueError, TypeError):
                raise UserInputError(
                    f"{cls.KIND} file {path}: metadata field '{item.name}' is malformed: {raw[:60]!r}"
                ) from None
        return cls(**values)


def _same_value(found: Any, expected: Any) -> bool:
    if isinstance(found, tuple) and isinstance(expected, tuple):
        return len(found) == len(expected) and all(_same_value(a, b) for a, b in zip(found, expected))
    if isinstance(found, float) or isinstance(expected, float):
        return math.isclose(float(found), float(expected), rel_tol=1e-6, abs_tol=1e-9)
    return found == expected


def _shown(value: Any) -> str:
    if isinstance(value, tuple) and len(value) == 2 and all(isinstance(side, int) for side in value):
        return f"{value[0]}x{value[1]}"
    if isinstance(value, tuple):
        return json.dumps(list(value))
    return repr(value)


def _data_values(info: DatasetInfo) -> dict[str, Any]:
    return {
        "dataset": info.name,
        "num_classes": info.num_classes,
        "channels": info.channels,
        "image_size": tuple(info.image_size),
        "mean": tuple(float(value) for value in info.mean),
        "std": tuple(float(value) for value in info.std),
    }


@dataclass(frozen=True)
class NumberedFiles:
    """One kind of trained-network file: ``STEM-NNNN.safetensors`` in a directory, described by ``metadata``.
    Other files in the directory are ignored."""

    stem: str
    metadata: type[FileMetadata]

    def name(self, index: int) -> str:
        """``STEM-0007.safetensors`` for index 7."""
        return f"{self.stem}-{index:04d}.safetensors"

    def listed(self, directory: str | Path) -> list[tuple[int, Path]]:
        """``(index, path)`` of every file of this kind in ``directory``, by index."""
        pattern = re.compile(re.escape(self.stem) + r"-([0-9]+)\.safetensors")
        found = []
        for path in Path(directory).iterdir():
            match = pattern.fullmatch(path.name)
            if match is not None and path.is_file():
                found.append((int(match.group(1)), path))
        return sorted(found)

    def read_metadata(self, path: str | Path) -> Any:
        """The metadata of one file (its header only); refuse an unreadable file, naming it."""
        path = Path(path)
        try:
            with safe_open(str(path), framework="pt", device="cpu") as handle:
                strings = handle.metadata() or {}
        except (SafetensorError, OSError) as error:
            raise UserInputError(f"{self.metadata.KIND} file {path} is not a readable safetensors file "
                                 f"({error})") from None
        return self.metadata.from_strings(strings, path)


def _files_or_refuse(directory: Path, kind: NumberedFiles, what: str, how_to_build: str) -> list[tuple[int, Path]]:
    """The numbered files of ``directory``; a one-line error saying how to build them when it is missing or empty."""
    if not directory.is_dir():
        raise UserInputError(f"{what} {directory} does not exist; {how_to_build}")
    files = kind.listed(directory)
    if not files:
        raise UserInputError(f"{what} {directory} holds no {kind.stem}-NNNN.safetensors files; {how_to_build}")
    return files


# ----------------------------------------------------------------------------------------------
# Building: the top-up rules and the training data
# ----------------------------------------------------------------------------------------------


def _fresh_seed(candidate: int, used: set[int]) -> int:
    """``candidate`` unless an existing network already used it; then a seed derived from it, deterministically."""
    while candidate in used:
        candidate = run_seeds(candidate, 1)[0]
    return candidate


@dataclass(frozen=True)
class _TopUp:
    """What a build finds in its output directory: the existing files and what is left to train."""

    existing: list[tuple[int, Path, Any]]
    first_index: int
    to_train: int
    candidate_seeds: list[int]
    used_seeds: set[int]

    def planned_seeds(self) -> list[tuple[int, int]]:
        """``(index, seed)`` of every network still to train, in order (seeds distinct from existing ones)."""
        used = set(self.used_seeds)
        planned = []
        for index in range(self.first_index, self.first_index + self.to_train):
            seed = _fresh_seed(self.candidate_seeds[index], used)
            used.add(seed)
            planned.append((index, seed))
        return planned


def _top_up(
    out_dir: Path,
    files: NumberedFiles,
    planned: dict[str, Any],
    fields: Sequence[str],
    count: int,
    seed: int,
) -> _TopUp:
    """Check the files already in ``out_dir`` against the planned build (``UserInputError`` naming the
    first differing field) and plan the rest: new files are numbered after the highest existing
    number, and the one numbered i gets seed ``run_seeds(seed, i + 1)[i]``, or a derived one if an
    existing file used it."""
    if out_dir.exists() and not out_dir.is_dir():
        raise UserInputError(f"{files.metadata.KIND} output {out_dir} exists and is not a directory; pass a directory")
    existing = []
    used_seeds: set[int] = set()
    for index, path in files.listed(out_dir) if out_dir.is_dir() else []:
        metadata = files.read_metadata(path)
        mismatch = metadata.first_mismatch(planned, fields)
        if mismatch is not None:
            name, found, wanted = mismatch
            raise UserInputError(
                f"{out_dir} already holds {files.metadata.COMMAND} with {name} {found} ({path.name}), but this build "
                f"has {name} {wanted}; use another output directory"
            )
        existing.append((index, path, metadata))
        used_seeds.add(metadata.seed)
    to_train = max(count - len(existing), 0)
    first_index = existing[-1][0] + 1 if existing else 0
    return _TopUp(existing, first_index, to_train, run_seeds(seed, first_index + to_train), used_seeds)


def _check_count_and_seed(count: int, seed: int) -> None:
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise UserInputError(f"count must be a positive integer, got {count!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise UserInputError(f"seed must be a non-negative integer, got {seed!r}")


def _check_train_per_class(train_per_class: int) -> None:
    if isinstance(train_per_class, bool) or not isinstance(train_per_class, int) or train_per_class < 0:
        raise UserInputError(f"train_per_class must be an integer >= 0 (0: all images), got {train_per_class!r}")


def _training_part(images: Tensor, labels: Tensor, num_classes: int, train_per_class: int,
                   seed: int) -> tuple[Tensor, Tensor]:
    """The training images and labels, or a class-balanced random part of ``train_per_class`` images per
    class drawn with ``seed`` when it is > 0 (the images of ``RealData.training_subset(train_per_class, seed)``)."""
    if not train_per_class:
        return images, labels
    subset = ClassSampler(images, labels, num_classes)
    return subset.random_subset(train_per_class, torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------
# Loading: one reader for every kind, and the cache of what was read
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainedFile:
    """One file being read: its position in the directory's listing, its number, its path and metadata."""

    position: int
    index: int
    path: Path
    metadata: Any


def read_trained_files(
    files: Sequence[tuple[int, Path]],
    kind: type[FileMetadata],
    expected: dict[str, Any],
    fields: Sequence[str],
    misfit: Callable[[str, str, str, Path], str],
    read: Callable[[TrainedFile, Any], None],
) -> list[TrainedFile]:
    """Open each of ``files`` once, in order: parse its metadata as ``kind``, refuse one whose ``fields``
    differ from ``expected`` (``UserInputError`` with ``misfit(name, found, wanted, path)``), then call
    ``read(file, handle)`` with the open safetensors handle to check and copy its tensors.

    An unreadable or corrupt file is refused in one line naming it. Returns the files read, in order."""
    read_files = []
    for position, (index, path) in enumerate(files):
        try:
            with safe_open(str(path), framework="pt", device="cpu") as handle:
                metadata = kind.from_strings(handle.metadata() or {}, path)
                mismatch = metadata.first_mismatch(expected, fields)
                if mismatch is not None:
                    name, found, wanted = mismatch
                    raise UserInputError(misfit(name, found, wanted, path))
                trained = TrainedFile(position, index, path, metadata)
                read(trained, handle)
        except (SafetensorError, OSError) as error:
            raise UserInputError(f"{kind.KIND} file {path} is not a readable safetensors file ({error})") from None
        read_files.append(trained)
    return read_files


class LoadCache:
    """Proxy pools and expert trajectories read once and shared by the runs of one process.

    A sweep or an experiment runs many distillations over the same pools; each run asks the cache
    (through :func:`~infodistill.proxies.load_proxy_pool` and :func:`~infodistill.experts.load_experts`),
    which reads a directory the first time and hands back the same (read-only) object afterwards.
    A run without a cache reads its files itself, as before.
    """

    def __init__(self) -> None:
        self._loaded: dict[tuple, Any] = {}
        self.reads = 0

    def get(self, key: tuple, read: Callable[[], Any]) -> Any:
        """What ``read()`` returned the first time ``key`` was asked for (reading it now if never)."""
        if key not in self._loaded:
            self._loaded[key] = read()
            self.reads += 1
        return self._loaded[key]
