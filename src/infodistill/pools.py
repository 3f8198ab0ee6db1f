"""Proxy pools for the CMI regularizer and expert trajectories for trajectory matching: build, load, sample.

A pool is a directory of ``proxy-NNNN.safetensors`` files, one trained network each: its state-dict
tensors plus string metadata saying which data it fits (dataset, class count, channels, image size,
normalisation), its architecture and how it was trained. Recipe of the paper (constant): networks
trained from different random inits on the real training set, 40 epochs, SGD lr 0.01, momentum 0.9,
weight decay 1e-3, batch 256, no augmentation, constant learning rate; ResNet18 with instance norm.

Loading reads every file once into one stacked tensor per parameter/buffer (K x ...) on the target
device; each proxy module's tensors are views into that storage, so the pool is held once and
serves both the paper's rule (draw one module per step) and vectorised passes over several proxies
(``torch.func.vmap`` over the stacked weights). Nothing is read from disk after loading, and files
are read with safetensors only (never unpickled).

Expert trajectories (MTT, DATM) are a directory of ``expert-NNNN.safetensors`` files, one network
trained with MTT's recipe (plain SGD, constant lr, DSA, optionally ZCA-whitened data) each, holding
one float32 tensor ``trajectory``: its flat parameters before training and after every epoch. Both
kinds share the metadata machinery (:class:`FileMetadata`) and the top-up rules of a build.
"""

from __future__ import annotations

import copy
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
from safetensors.torch import save_file
from torch import Tensor, nn
from torch.func import functional_call, vmap
from torch.nn.utils import parameters_to_vector
from tqdm.auto import tqdm

from infodistill import __version__
from infodistill.data import ClassSampler, DatasetInfo, RealData, whiten
from infodistill.errors import UserInputError
from infodistill.evaluate import (
    AUGMENTATIONS,
    EvalConfig,
    resolve_device,
    run_seeds,
    top1_accuracy,
    train_from_scratch,
    use_batched_training,
)
from infodistill.files import atomic_path
from infodistill.models import DistillModel, build_model, has_batch_norm, parse_model_name
from infodistill.precision import check_precision, resolve_precision
from infodistill.regularizers.cmi import cmi_from_features, vectorise_proxies

PROXY_FORMAT = "infodistill-proxy-v1"
"""Value of the ``format`` metadata field of every proxy file."""

PROXY_FILE_PATTERN = re.compile(r"proxy-([0-9]+)\.safetensors")
"""Names of the files that make up a pool; other files in the directory are ignored."""

DEFAULT_PROXY_ARCH = "ResNet18"

EXPERT_FORMAT = "infodistill-expert-v1"
"""Value of the ``format`` metadata field of every expert-trajectory file."""

EXPERT_FILE_PATTERN = re.compile(r"expert-([0-9]+)\.safetensors")
"""Names of the files that make up a set of expert trajectories."""

EXPERT_TENSOR = "trajectory"
"""Name of the one tensor of an expert file: (epochs + 1) x P float32."""


@dataclass(frozen=True)
class ProxyRecord:
    """One proxy of a pool: its number (from the file name), training seed, test accuracy (percent) and file.

    ``path`` is None for a pool built from modules in memory.
    """

    index: int
    seed: int
    test_accuracy: float
    path: Path | None


def _parse_image_size(text: str) -> tuple[int, int]:
    height, width = text.lower().split("x")
    return int(height), int(width)


def _parse_floats(text: str) -> tuple[float, ...]:
    values = json.loads(text)
    if not isinstance(values, list):
        raise TypeError("not a list")
    return tuple(float(value) for value in values)


def _parse_layout(text: str) -> tuple[tuple[str, tuple[int, ...]], ...]:
    entries = json.loads(text)
    if not isinstance(entries, list):
        raise TypeError("not a list")
    layout = []
    for name, shape in entries:
        if not isinstance(name, str) or not isinstance(shape, list):
            raise TypeError("not [name, shape] pairs")
        layout.append((name, tuple(int(side) for side in shape)))
    return tuple(layout)


class FileMetadata:
    """The string metadata of one file of a directory of trained networks (proxies, experts).

    A subclass is a frozen dataclass whose fields are the metadata; ``FORMAT`` is the value of its
    ``format`` field, ``KIND`` names the file in messages and ``COMMAND`` is the subcommand writing it.
    Every field has a parser in ``_METADATA_PARSERS``.
    """

    FORMAT: ClassVar[str]
    KIND: ClassVar[str]
    COMMAND: ClassVar[str]

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
                values[item.name] = _METADATA_PARSERS[item.name](raw)
            except (ValueError, TypeError):
                raise UserInputError(
                    f"{cls.KIND} file {path}: metadata field '{item.name}' is malformed: {raw[:60]!r}"
                ) from None
        return cls(**values)


@dataclass(frozen=True)
class ProxyMetadata(FileMetadata):
    """The string metadata of a proxy file: what data it fits, what it is, how it was trained."""

    FORMAT: ClassVar[str] = PROXY_FORMAT
    KIND: ClassVar[str] = "proxy"
    COMMAND: ClassVar[str] = "proxies"

    dataset: str
    arch: str
    channels: int
    image_size: tuple[int, int]
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    seed: int
    epochs: int
    lr: float
    momentum: float
    weight_decay: float
    batch_size: int
    test_accuracy: float
    augment: str = "none"
    train_per_class: int = 0
    precision: str = "fp32"
    version: str = __version__
    format: str = PROXY_FORMAT


@dataclass(frozen=True)
class ExpertMetadata(FileMetadata):
    """The string metadata of an expert-trajectory file: the data, the model, the recipe, the layout.

    ``layout`` is the (name, shape) of every parameter in ``named_parameters()`` order, as stored
    flat in each row of the trajectory; ``zca`` is the whitening epsilon of the data (0: none).
    """

    FORMAT: ClassVar[str] = EXPERT_FORMAT
    KIND: ClassVar[str] = "expert"
    COMMAND: ClassVar[str] = "experts"

    dataset: str
    num_classes: int
    channels: int
    image_size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    model: str
    epochs: int
    lr: float
    batch_size: int
    augment: str
    zca: float
    seed: int
    test_accuracy: float
    layout: tuple[tuple[str, tuple[int, ...]], ...]
    train_per_class: int = 0
    version: str = __version__
    format: str = EXPERT_FORMAT


_METADATA_PARSERS: dict[str, Callable[[str], Any]] = {
    "dataset": str, "arch": str, "augment": str, "version": str, "format": str,
    "channels": int, "num_classes": int, "seed": int, "epochs": int, "batch_size": int,
    "lr": float, "momentum": float, "weight_decay": float, "test_accuracy": float,
    "image_size": _parse_image_size, "mean": _parse_floats, "std": _parse_floats,
    "model": str, "zca": float, "layout": _parse_layout, "train_per_class": int, "precision": str,
}
"""Parser of every metadata field of :class:`ProxyMetadata` and :class:`ExpertMetadata`, by name."""

DATA_FIELDS = ("dataset", "num_classes", "channels", "image_size", "mean", "std")
"""Metadata that must match the dataset a pool is used with."""

BUILD_FIELDS = DATA_FIELDS + ("arch", "epochs", "lr", "momentum", "weight_decay", "batch_size", "augment",
                              "train_per_class", "precision")
"""Metadata that must match for a build to add proxies to an existing pool directory."""

EXPERT_BUILD_FIELDS = DATA_FIELDS + ("model", "epochs", "lr", "batch_size", "augment", "zca", "layout",
                                     "train_per_class")
"""Metadata that must match for a build to add experts to an existing directory."""

EXPERT_SHARED_FIELDS = ("model", "epochs", "layout", "lr", "zca")
"""Metadata on which all experts of a directory must agree to be loaded together."""


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


def save_proxy(model: nn.Module, path: str | Path, metadata: ProxyMetadata) -> Path:
    """Write ``model``'s state dict and ``metadata`` to ``path`` atomically (complete or absent)."""
    path = Path(path)
    tensors = {name: tensor.detach().to("cpu").contiguous().clone() for name, tensor in model.state_dict().items()}
    with atomic_path(path) as temporary:
        save_file(tensors, str(temporary), metadata=metadata.to_strings())
    return path


def _read_metadata(path: str | Path, kind: type[FileMetadata]) -> Any:
    """The metadata of one file (its header only); refuse an unreadable file, naming it."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            strings = handle.metadata() or {}
    except (SafetensorError, OSError) as error:
        raise UserInputError(f"{kind.KIND} file {path} is not a readable safetensors file ({error})") from None
    return kind.from_strings(strings, path)


def read_proxy_metadata(path: str | Path) -> ProxyMetadata:
    """The metadata of one proxy file (its header only); refuse an unreadable file, naming it."""
    return _read_metadata(path, ProxyMetadata)


def read_expert_metadata(path: str | Path) -> ExpertMetadata:
    """The metadata of one expert file (its header only); refuse an unreadable file, naming it."""
    return _read_metadata(path, ExpertMetadata)


def _numbered_files(directory: str | Path, pattern: re.Pattern[str]) -> list[tuple[int, Path]]:
    found = []
    for path in Path(directory).iterdir():
        match = pattern.fullmatch(path.name)
        if match is not None and path.is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def proxy_files(directory: str | Path) -> list[tuple[int, Path]]:
    """``(index, path)`` of every ``proxy-NNNN.safetensors`` in ``directory``, by index."""
    return _numbered_files(directory, PROXY_FILE_PATTERN)


def expert_files(directory: str | Path) -> list[tuple[int, Path]]:
    """``(index, path)`` of every ``expert-NNNN.safetensors`` in ``directory``, by index."""
    return _numbered_files(directory, EXPERT_FILE_PATTERN)


def _files_or_refuse(directory: Path, lister: Callable[[Path], list[tuple[int, Path]]], what: str, stem: str,
                     how_to_build: str) -> list[tuple[int, Path]]:
    """The numbered files of ``directory``; a one-line error saying how to build them when it is missing or empty."""
    if not directory.is_dir():
        raise UserInputError(f"{what} {directory} does not exist; {how_to_build}")
    files = lister(directory)
    if not files:
        raise UserInputError(f"{what} {directory} holds no {stem}-NNNN.safetensors files; {how_to_build}")
    return files


def proxy_file_name(index: int) -> str:
    """``proxy-0007.safetensors`` for index 7."""
    return f"proxy-{index:04d}.safetensors"


def expert_file_name(index: int) -> str:
    """``expert-0007.safetensors`` for index 7."""
    return f"expert-{index:04d}.safetensors"


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
    kind: type[FileMetadata],
    files: Callable[[Path], list[tuple[int, Path]]],
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
        raise UserInputError(f"{kind.KIND} output {out_dir} exists and is not a directory; pass a directory")
    existing = []
    used_seeds: set[int] = set()
    for index, path in files(out_dir) if out_dir.is_dir() else []:
        metadata = _read_metadata(path, kind)
        mismatch = metadata.first_mismatch(planned, fields)
        if mismatch is not None:
            name, found, wanted = mismatch
            raise UserInputError(
                f"{out_dir} already holds {kind.COMMAND} with {name} {found} ({path.name}), but this build "
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


def train_proxy_pool(
    real: RealData,
    out_dir: str | Path,
    arch: str = DEFAULT_PROXY_ARCH,
    count: int = 8,
    epochs: int = 40,
    seed: int = 0,
    device: str = "cpu",
    progress: bool = True,
    lr: float = 0.01,
    momentum: float = 0.9,
    weight_decay: float = 1e-3,
    batch_size: int = 256,
    train_per_class: int = 0,
    precision: str = "fp32",
    batched: str = "off",
) -> list[ProxyRecord]:
    """Train proxies on ``real``'s training set and write them to ``out_dir``; return the pool's records.

    ``train_per_class`` > 0 trains on a class-balanced random part of that many images per class (drawn
    with ``seed``; quicker proxies on a CPU), ``precision`` is the arithmetic of the training forward
    passes (``fp32``, ``bf16`` or ``auto``, resolved here and recorded), ``batched`` trains the proxies
    still to build together as one vectorised model (``on``; ``auto``: on GPUs) instead of one after
    another; both give the same networks up to rounding.

    ``count`` is the size of the pool wanted in ``out_dir``. Proxies are trained one after another and
    each is written (atomically) as soon as it is trained, so an interrupted build keeps the finished
    ones. Proxies already in ``out_dir`` count toward ``count`` when they were built for the same data
    with the same architecture and recipe (otherwise: ``UserInputError`` naming the field); new ones
    are numbered after the highest existing number. The proxy numbered i is trained with seed
    ``run_seeds(seed, i + 1)[i]`` (replaced by a derived one if an existing proxy already used it), so
    an interrupted build continued with the same arguments ends with the same files as one never
    interrupted. Each proxy's accuracy on the real test set is recorded in its metadata. Returns the
    records of every proxy in ``out_dir``, existing and new, by index.
    """
    _check_count_and_seed(count, seed)
    if isinstance(train_per_class, bool) or not isinstance(train_per_class, int) or train_per_class < 0:
        raise UserInputError(f"train_per_class must be an integer >= 0 (0: all images), got {train_per_class!r}")
    precision = resolve_precision(check_precision(precision), resolve_device(device), measured=False)
    config = EvalConfig(model=arch, runs=1, epochs=epochs, lr=lr, momentum=momentum, weight_decay=weight_decay,
                        batch_size=batch_size, augment="none", lr_schedule="constant", seed=seed, device=device,
                        precision=precision, batched=batched)
    config.validate()
    canonical_arch = parse_model_name(arch).canonical_name
    info = real.info
    planned = dict(_data_values(info), arch=canonical_arch, epochs=epochs, lr=float(lr), momentum=float(momentum),
                   weight_decay=float(weight_decay), batch_size=batch_size, augment="none",
                   train_per_class=train_per_class, precision=precision)
    plan = _top_up(Path(out_dir), ProxyMetadata, proxy_files, planned, BUILD_FIELDS, count, seed)
    records = [ProxyRecord(index, metadata.seed, metadata.test_accuracy, path)
               for index, path, metadata in plan.existing]
    if plan.to_train == 0:
        return records

    train_images, train_labels = real.train_tensors()
    if train_per_class:
        subset = ClassSampler(train_images, train_labels, info.num_classes)
        train_images, train_labels = subset.random_subset(train_per_class, torch.Generator().manual_seed(seed))
    test_images, test_labels = real.test_tensors()
    planned_seeds = plan.planned_seeds()
    # trained together (vectorised) in groups, one after another otherwise; each proxy is written at once
    together = use_batched_training(dataclasses.replace(config, runs=len(planned_seeds)), resolve_device(device))
    groups = [planned_seeds] if together else [[entry] for entry in planned_seeds]
    bar = tqdm(total=plan.to_train, desc=f"proxies {canonical_arch}", unit="proxy", disable=not progress)
    with bar:
        for group in groups:
            models, _ = train_from_scratch(train_images, train_labels, info.num_classes,
                                           dataclasses.replace(config, runs=len(group)),
                                           [proxy_seed for _, proxy_seed in group], progress=progress)
            for (index, proxy_seed), model in zip(group, models):
                accuracy = top1_accuracy(model, test_images, test_labels)
                metadata = ProxyMetadata(seed=proxy_seed, test_accuracy=accuracy, **planned)
                path = save_proxy(model, Path(out_dir) / proxy_file_name(index), metadata)
                records.append(ProxyRecord(index, proxy_seed, accuracy, path))
                bar.set_postfix(test_acc=f"{accuracy:.1f}%")
                bar.update(1)
    return records


class _EmbedForward(nn.Module):
    """A wrapper whose ``forward`` is the wrapped model's ``embed`` (functional_call calls ``forward``)."""

    def __init__(self, model: DistillModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: Tensor) -> Tensor:
        return self.model.embed(images)


EMBED_PREFIX = "model."
"""Prefix of the stacked state's names as seen by the :class:`_EmbedForward` template."""


@dataclass(frozen=True)
class StackedProxies:
    """Several proxies as one set of stacked tensors (K x ...), for one vectorised forward pass.

    ``template`` is a weightless (meta-device) module whose forward is the proxies' ``embed``;
    ``state`` maps its parameter and buffer names to tensors stacked over the K proxies;
    ``indices`` are the pool indices of the K proxies, in stacking order.
    """

    template: nn.Module
    state: dict[str, Tensor]
    indices: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.indices)

    def embed(self, images: Tensor) -> Tensor:
        """Penultimate features of ``images`` under every proxy: K x N x D (differentiable w.r.t. images)."""

        def embed_one(state: dict[str, Tensor], batch: Tensor) -> Tensor:
            return functional_call(self.template, state, (batch,))

        return vmap(embed_one, in_dims=(0, None))(self.state, images)


class ProxyPool:
    """K frozen proxy networks of one architecture, held in memory on one device, sampled at random.

    Build one with :meth:`load` (a directory written by :func:`train_proxy_pool`) or from modules in
    memory. Every proxy is in eval mode with ``requires_grad`` off; its tensors are views into the
    pool's stacked storage, which :meth:`stacked` and :meth:`cmi` use for vectorised passes.
    """

    def __init__(
        self,
        models: Sequence[DistillModel],
        arch: str,
        info: DatasetInfo,
        records: Sequence[ProxyRecord] | None = None,
    ) -> None:
        """A pool over copies of ``models`` (the given modules are left unchanged), on their device."""
        if not models:
            raise UserInputError("a proxy pool needs at least one model")
        states = [model.state_dict() for model in models]
        keys = list(states[0])
        for position, state in enumerate(states):
            if list(state) != keys or any(state[key].shape != states[0][key].shape for key in keys):
                raise UserInputError(f"model {position} of the pool does not have the architecture of model 0 ({arch})")
        stacked = {key: torch.stack([state[key].detach() for state in states]) for key in keys}
        if records is None:
            records = [ProxyRecord(index, -1, float("nan"), None) for index in range(len(models))]
        self._setup(models[0], stacked, parse_model_name(arch).canonical_name, info, records)

    def _setup(
        self, template: DistillModel, state: dict[str, Tensor], arch: str, info: DatasetInfo,
        records: Sequence[ProxyRecord],
    ) -> None:
        count = len(next(iter(state.values())))
        if len(records) != count:
            raise ValueError(f"{len(records)} records for {count} proxies")
        meta_template = copy.deepcopy(template).to("meta").eval().requires_grad_(False)
        state_names = {name for name, _ in meta_template.named_parameters()} | {
            name for name, _ in meta_template.named_buffers()
        }
        if state_names != set(state):
            raise ValueError(
                f"{arch}: parameters and buffers {sorted(state_names ^ set(state))} are not in the state dict"
            )
        self.arch = arch
        self.info = info
        self.pooled = bool(getattr(template, "pooled_embedding", False))
        self.records: tuple[ProxyRecord, ...] = tuple(records)
        self.device = next(iter(state.values())).device
        self._state = state
        self._template = _EmbedForward(meta_template)
        self._models: list[DistillModel] = []
        for position in range(count):
            model = copy.deepcopy(meta_template)
            model.load_state_dict({name: tensor[position] for name, tensor in state.items()}, strict=True, assign=True)
            self._models.append(model.eval().requires_grad_(False))

    @classmethod
    def load(cls, directory: str | Path, info: DatasetInfo, device: str = "cpu") -> ProxyPool:
        """Read every ``proxy-NNNN.safetensors`` of ``directory`` once, onto ``device``.

        Refuses (``UserInputError``, one line) a missing or empty directory, an unreadable or corrupt
        file (named), a pool built for other data than ``info`` (naming the field, the pool's value and
        the expected one), and a directory mixing architectures.
        """
        directory = Path(directory)
        target = resolve_device(device)
        files = _files_or_refuse(directory, proxy_files, "proxy pool directory", "proxy",
                                 f"build one with 'infodistill proxies --dataset {info.name} --out {directory}'")
        expected_data = _data_values(info)
        arch: str | None = None
        template: DistillModel | None = None
        state: dict[str, Tensor] = {}
        records = []
        for position, (index, path) in enumerate(files):
            try:
                with safe_open(str(path), framework="pt", device="cpu") as handle:
                    metadata = ProxyMetadata.from_strings(handle.metadata() or {}, path)
                    mismatch = metadata.first_mismatch(expected_data, DATA_FIELDS)
                    if mismatch is not None:
                        name, found, wanted = mismatch
                        raise UserInputError(
                            f"proxy pool {directory} does not fit dataset '{info.name}': {name} is "
                            f"{found} in {path.name}, expected {wanted}"
                        )
                    if arch is None:
                        arch = metadata.arch
                        try:
                            template = build_model(arch, info.channels, info.num_classes, info.image_size, seed=0)
                        except UserInputError as error:
                            raise UserInputError(f"proxy file {path}: {error}") from None
                        state = {
                            name: torch.empty((len(files), *tensor.shape), dtype=tensor.dtype, device=target)
                            for name, tensor in template.state_dict().items()
                        }
                    elif metadata.arch != arch:
                        raise UserInputError(
                            f"proxy pool {directory} mixes architectures: arch is {metadata.arch!r} in {path.name}, "
                            f"expected {arch!r} (as in {files[0][1].name})"
                        )
                    names = set(handle.keys())
                    if names != set(state):
                        differing = sorted(names ^ set(state))
                        raise UserInputError(
                            f"proxy file {path} does not hold the tensors of a {arch}: {len(differing)} names differ "
                            f"(e.g. {differing[0]!r})"
                        )
                    for name, destination in state.items():
                        tensor = handle.get_tensor(name)
                        if tensor.shape != destination.shape[1:] or tensor.dtype != destination.dtype:
                            raise UserInputError(
                                f"proxy file {path}: tensor {name!r} is {tensor.dtype} {list(tensor.shape)}, a {arch} "
                                f"needs {destination.dtype} {list(destination.shape[1:])}"
                            )
                        destination[position].copy_(tensor)
            except (SafetensorError, OSError) as error:
                raise UserInputError(f"proxy file {path} is not a readable safetensors file ({error})") from None
            records.append(ProxyRecord(index, metadata.seed, metadata.test_accuracy, path))
        assert arch is not None and template is not None
        pool = cls.__new__(cls)
        pool._setup(template, state, arch, info, records)
        return pool

    def __len__(self) -> int:
        return len(self._models)

    def require_pooled(self, what: str = "the CMI") -> None:
        """Refuse, in one line, a pool whose embedding is a flattened spatial map (ConvNet, AlexNet, VGG):
        a softmax over it measures where activations sit, not what the image shows."""
        if not self.pooled:
            where = f" in {self.records[0].path.parent}" if self.records and self.records[0].path else ""
            raise UserInputError(
                f"the proxies{where} are {self.arch}, whose embedding is a flattened spatial map, not a pooled "
                f"vector; {what} needs pooled proxies: build them with `infodistill proxies --arch ResNet18` "
                "(the paper's) or `--arch ConvNetGAP-3` (a ConvNet with a globally pooled embedding)")

    def __getitem__(self, index: int) -> DistillModel:
        """The proxy at position ``index`` (0..len-1, in file-number order)."""
        return self._models[index]

    @property
    def num_classes(self) -> int:
        return self.info.num_classes

    def sample_index(self, generator: torch.Generator) -> int:
        """Position of one proxy drawn uniformly at random with ``generator``."""
        return int(torch.randint(len(self), (1,), generator=generator, device=generator.device).item())

    def sample(self, generator: torch.Generator) -> DistillModel:
        """One proxy drawn uniformly at random with ``generator`` (the paper's rule, once per step)."""
        return self[self.sample_index(generator)]

    def sample_indices(self, k: int, generator: torch.Generator) -> list[int]:
        """``k`` distinct positions drawn uniformly at random with ``generator``."""
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= len(self):
            raise UserInputError(
                f"cannot draw {k!r} distinct proxies from a pool of {len(self)}; allowed are 1..{len(self)}"
            )
        return torch.randperm(len(self), generator=generator, device=generator.device)[:k].tolist()

    def stacked(self, indices: Sequence[int]) -> StackedProxies:
        """The proxies at ``indices`` as stacked tensors for :func:`cmi_per_proxy`.

        A run of consecutive ascending indices (the whole pool included) is served as views of the
        pool's storage with no copy; any other selection gathers the k proxies' tensors.
        """
        indices = tuple(int(index) for index in indices)
        if not indices or any(not 0 <= index < len(self) for index in indices):
            raise UserInputError(f"proxy indices {list(indices)} must be non-empty and in 0..{len(self) - 1}")
        start = indices[0]
        if indices == tuple(range(start, start + len(indices))):
            state = {EMBED_PREFIX + name: tensor[start : start + len(indices)] for name, tensor in self._state.items()}
        else:
            selection = torch.tensor(indices, device=self.device)
            state = {EMBED_PREFIX + name: tensor.index_select(0, selection) for name, tensor in self._state.items()}
        return StackedProxies(self._template, state, indices)

    @torch.no_grad()
    def cmi(
        self,
        images: Tensor,
        labels: Tensor,
        num_classes: int,
        chunk: int = 16,
        image_batch: int = 512,
        batched: str = "auto",
    ) -> Tensor:
        """The empirical CMI of (images, labels) under EVERY proxy of the pool: K values, no gradient.

        With vmap (``batched``, see :func:`~infodistill.regularizers.cmi.vectorise_proxies`) the pool
        is processed ``chunk`` proxies at a time; images go through in batches of ``image_batch``
        (features do not depend on the batch: the proxies are in eval mode). Both bound memory.
        """
        for name, value in (("chunk", chunk), ("image_batch", image_batch)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UserInputError(f"{name} must be a positive integer, got {value!r}")
        self.require_pooled()
        vectorised = vectorise_proxies(batched, self.device)
        images = images.to(self.device)
        labels = labels.to(self.device)
        batches = images.split(image_batch)
        values = []
        for start in range(0, len(self), chunk if vectorised else 1):
            if vectorised:
                stacked = self.stacked(range(start, min(start + chunk, len(self))))
                features = torch.cat([stacked.embed(batch) for batch in batches], dim=1)
            else:
                features = torch.cat([self[start].embed(batch) for batch in batches]).unsqueeze(0)
            values.append(cmi_from_features(features, labels, num_classes))
        return torch.cat(values)


# ----------------------------------------------------------------------------------------------
# Expert trajectories (trajectory matching: MTT, DATM)
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExpertRecord:
    """One expert of a directory: its number (from the file name), training seed, final test accuracy
    (percent) and file."""

    index: int
    seed: int
    test_accuracy: float
    path: Path


def parameter_layout(model: nn.Module) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """(name, shape) of every parameter of ``model`` in ``named_parameters()`` order: the layout of a
    flat weight vector (the concatenation of ``p.flatten()`` in that order)."""
    return tuple((name, tuple(parameter.shape)) for name, parameter in model.named_parameters())


def flat_parameters(model: nn.Module) -> Tensor:
    """The concatenation of ``p.flatten()`` for ``model.named_parameters()`` in order, detached, float32."""
    return parameters_to_vector(model.parameters()).detach().to(torch.float32)


def _expert_template(model: str, info: DatasetInfo) -> nn.Module:
    """A module of ``model`` for ``info``; refuse one with batch-norm running statistics."""
    template = build_model(model, info.channels, info.num_classes, info.image_size, seed=0)
    if has_batch_norm(template):
        raise UserInputError(
            f"experts need a model without batch norm (their files store parameters only, not running statistics); "
            f"{parse_model_name(model).canonical_name} has batch norm: use e.g. ConvNet-3 (instance norm)"
        )
    return template


def _check_expert_settings(epochs: int, lr: float, batch_size: int, augment: str, zca: float) -> None:
    for name, value in (("epochs", epochs), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UserInputError(f"{name} must be a positive integer, got {value!r}")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
        raise UserInputError(f"lr must be a positive finite number, got {lr!r}")
    if augment not in AUGMENTATIONS:
        raise UserInputError(f"augment {augment!r} is not one of: {', '.join(AUGMENTATIONS)}")
    if isinstance(zca, bool) or not isinstance(zca, (int, float)) or not math.isfinite(zca) or zca < 0:
        raise UserInputError(f"zca must be a finite number >= 0 (the whitening epsilon; 0 turns it off), got {zca!r}")


def expert_config(model: str, epochs: int, lr: float, batch_size: int, augment: str, seed: int = 0,
                  device: str = "cpu") -> EvalConfig:
    """MTT's expert recipe as an evaluation config: plain SGD (no momentum, no weight decay) at a
    constant learning rate, one run."""
    return EvalConfig(model=model, runs=1, epochs=epochs, lr=float(lr), momentum=0.0, weight_decay=0.0,
                      batch_size=batch_size, augment=augment, lr_schedule="constant", seed=seed, device=device)


def train_experts(
    real: RealData,
    out_dir: str | Path,
    model: str = "ConvNet-3",
    count: int = 5,
    epochs: int = 50,
    lr: float = 0.01,
    batch_size: int = 256,
    augment: str = "dsa",
    zca: float = 0.0,
    seed: int = 0,
    device: str = "cpu",
    progress: bool = True,
    train_per_class: int = 0,
) -> list[ExpertRecord]:
    """Train expert networks on ``real``'s training set, recording their weights after every epoch.

    MTT's recipe: SGD with no momentum and no weight decay at the constant rate ``lr``, ``augment``
    ("dsa" or "none"), on ZCA-whitened data when ``zca`` > 0 (the whitening epsilon), on a class-balanced
    random part of ``train_per_class`` images per class when given (0: all; quicker experts). The expert
    numbered i is written to ``expert-NNNN.safetensors`` (atomically, as soon as it is trained) with one
    float32 tensor ``trajectory`` of shape (epochs + 1) x P: row 0 the initial weights, row e the
    weights after epoch e, each row the model's parameters flattened in ``named_parameters()`` order.

    ``count`` is the number of experts wanted in ``out_dir``, with the top-up rules of
    :func:`train_proxy_pool`: experts already there count when built for the same data, model and
    recipe (otherwise ``UserInputError`` naming the field); new ones are numbered after the highest
    existing number and the one numbered i is trained with seed ``run_seeds(seed, i + 1)[i]``, so an
    interrupted build continued with the same arguments ends with the same files. Returns the records
    of every expert in ``out_dir``, by index.
    """
    _check_count_and_seed(count, seed)
    _check_expert_settings(epochs, lr, batch_size, augment, zca)
    if isinstance(train_per_class, bool) or not isinstance(train_per_class, int) or train_per_class < 0:
        raise UserInputError(f"train_per_class must be an integer >= 0 (0: all images), got {train_per_class!r}")
    config = expert_config(model, epochs, lr, batch_size, augment, seed, device)
    config.validate()
    info = real.info
    template = _expert_template(model, info)
    canonical_model = parse_model_name(model).canonical_name
    planned = dict(_data_values(info), model=canonical_model, epochs=epochs, lr=float(lr), batch_size=batch_size,
                   augment=augment, zca=float(zca), layout=parameter_layout(template), train_per_class=train_per_class)
    plan = _top_up(Path(out_dir), ExpertMetadata, expert_files, planned, EXPERT_BUILD_FIELDS, count, seed)
    records = [ExpertRecord(index, metadata.seed, metadata.test_accuracy, path)
               for index, path, metadata in plan.existing]
    if plan.to_train == 0:
        return records

    data = whiten(real, zca) if zca > 0 else real
    train_images, train_labels = data.train_tensors()
    if train_per_class:  # the same images as real.training_subset(train_per_class, seed)
        subset = ClassSampler(train_images, train_labels, info.num_classes)
        train_images, train_labels = subset.random_subset(train_per_class, torch.Generator().manual_seed(seed))
    test_images, test_labels = data.test_tensors()
    size = sum(math.prod(shape) for _, shape in planned["layout"])
    bar = tqdm(total=plan.to_train, desc=f"experts {canonical_model}", unit="expert", disable=not progress)
    with bar:
        for index, expert_seed in plan.planned_seeds():
            trajectory = torch.empty(epochs + 1, size, dtype=torch.float32)
            # train_from_scratch starts from build_model(config.model, ..., seed=expert_seed): the same weights.
            initial = build_model(config.model, info.channels, info.num_classes, info.image_size, seed=expert_seed)
            trajectory[0] = flat_parameters(initial)

            def record_epoch(run: int, epoch: int, network: nn.Module, trajectory: Tensor = trajectory) -> None:
                trajectory[epoch + 1] = flat_parameters(network).cpu()

            (network,), _ = train_from_scratch(train_images, train_labels, info.num_classes, config, [expert_seed],
                                               progress=progress, after_epoch=record_epoch)
            accuracy = top1_accuracy(network, test_images, test_labels)
            metadata = ExpertMetadata(seed=expert_seed, test_accuracy=accuracy, **planned)
            path = Path(out_dir) / expert_file_name(index)
            with atomic_path(path) as temporary:
                save_file({EXPERT_TENSOR: trajectory}, str(temporary), metadata=metadata.to_strings())
            records.append(ExpertRecord(index, expert_seed, accuracy, path))
            bar.set_postfix(test_acc=f"{accuracy:.1f}%")
            bar.update(1)
    return records


class ExpertTrajectories:
    """E expert trajectories of one model, held in memory as one tensor E x (epochs + 1) x P.

    Build with :meth:`load` (a directory written by :func:`train_experts`). ``weights(e, t)`` is the
    flat parameter vector of expert e after epoch t (t = 0: its initial weights), in the layout of
    ``layout`` (``named_parameters()`` order of :meth:`build_model`).
    """

    def __init__(self, trajectories: Tensor, records: Sequence[ExpertRecord], info: DatasetInfo,
                 metadata: ExpertMetadata) -> None:
        self.trajectories = trajectories
        self.records: tuple[ExpertRecord, ...] = tuple(records)
        self.info = info
        self.model: str = metadata.model
        self.epochs: int = metadata.epochs
        self.lr: float = metadata.lr
        self.zca: float = metadata.zca
        self.layout: list[tuple[str, tuple[int, ...]]] = list(metadata.layout)
        self.device = trajectories.device

    @classmethod
    def load(
        cls,
        directory: str | Path,
        info: DatasetInfo,
        model: str | None = None,
        zca: float | None = None,
        device: str = "cpu",
    ) -> ExpertTrajectories:
        """Read every ``expert-NNNN.safetensors`` of ``directory`` once, onto ``device``.

        Refuses (``UserInputError``, one line) a missing or empty directory, an unreadable or corrupt
        file (named), experts built for other data than ``info`` (naming the field, the file's value and
        the expected one), for another model than ``model`` or another whitening than ``zca`` (when
        given), and experts that disagree with each other on model, epochs, layout, lr or zca.
        """
        directory = Path(directory)
        target = resolve_device(device)
        files = _files_or_refuse(directory, expert_files, "expert directory", "expert",
                                 f"build them with 'infodistill experts --dataset {info.name} --out {directory}'")
        expected: dict[str, Any] = dict(_data_values(info))
        checked = list(DATA_FIELDS)
        if model is not None:
            expected["model"] = parse_model_name(model).canonical_name
            checked.append("model")
        if zca is not None:
            expected["zca"] = float(zca)
            checked.append("zca")
        first: ExpertMetadata | None = None
        trajectories = torch.empty(0)
        records = []
        for position, (index, path) in enumerate(files):
            try:
                with safe_open(str(path), framework="pt", device="cpu") as handle:
                    metadata = ExpertMetadata.from_strings(handle.metadata() or {}, path)
                    mismatch = metadata.first_mismatch(expected, checked)
                    if mismatch is not None:
                        name, found, wanted = mismatch
                        raise UserInputError(
                            f"experts in {directory} do not fit this run: {name} is {found} in {path.name}, "
                            f"expected {wanted}"
                        )
                    if first is None:
                        first = metadata
                        try:
                            layout = parameter_layout(_expert_template(metadata.model, info))
                        except UserInputError as error:
                            raise UserInputError(f"expert file {path}: {error}") from None
                        if not _same_value(layout, metadata.layout):
                            raise UserInputError(
                                f"expert file {path}: its parameter layout is not that of a {metadata.model} for "
                                f"dataset '{info.name}' (written by another version?)"
                            )
                        size = sum(math.prod(shape) for _, shape in layout)
                        trajectories = torch.empty(len(files), metadata.epochs + 1, size, dtype=torch.float32,
                                                   device=target)
                    else:
                        differing = first.first_mismatch(
                            {name: getattr(metadata, name) for name in EXPERT_SHARED_FIELDS}, EXPERT_SHARED_FIELDS
                        )
                        if differing is not None:
                            name, found, wanted = differing
                            raise UserInputError(
                                f"experts in {directory} disagree: {name} is {wanted} in {path.name} but {found} in "
                                f"{files[0][1].name}; keep one kind of expert per directory"
                            )
                    if set(handle.keys()) != {EXPERT_TENSOR}:
                        raise UserInputError(
                            f"expert file {path} holds tensors {sorted(handle.keys())}, expected only {EXPERT_TENSOR!r}"
                        )
                    tensor = handle.get_tensor(EXPERT_TENSOR)
                    if tensor.shape != trajectories.shape[1:] or tensor.dtype != torch.float32:
                        raise UserInputError(
                            f"expert file {path}: {EXPERT_TENSOR!r} is {tensor.dtype} {list(tensor.shape)}, expected "
                            f"torch.float32 {list(trajectories.shape[1:])} (epochs + 1 rows of the flat weights)"
                        )
                    trajectories[position].copy_(tensor)
            except (SafetensorError, OSError) as error:
                raise UserInputError(f"expert file {path} is not a readable safetensors file ({error})") from None
            records.append(ExpertRecord(index, metadata.seed, metadata.test_accuracy, path))
        assert first is not None
        return cls(trajectories, records, info, first)

    def __len__(self) -> int:
        return len(self.trajectories)

    @property
    def num_parameters(self) -> int:
        """P, the length of one flat weight vector."""
        return self.trajectories.shape[2]

    def sample_index(self, generator: torch.Generator) -> int:
        """Position of one expert drawn uniformly at random with ``generator``."""
        return int(torch.randint(len(self), (1,), generator=generator, device=generator.device).item())

    def weights(self, expert: int, epoch: int) -> Tensor:
        """The flat weights (P, a view) of expert ``expert`` (0..E-1) after ``epoch`` epochs (0..epochs)."""
        if not 0 <= expert < len(self):
            raise UserInputError(f"expert {expert} is out of range; allowed are 0..{len(self) - 1}")
        if not 0 <= epoch <= self.epochs:
            raise UserInputError(f"epoch {epoch} is out of range; the experts have epochs 0..{self.epochs}")
        return self.trajectories[expert, epoch]

    def build_model(self, seed: int = 0) -> nn.Module:
        """A module of the experts' architecture for their dataset, on the experts' device."""
        info = self.info
        return build_model(self.model, info.channels, info.num_classes, info.image_size, seed=seed).to(self.device)


class LoadCache:
    """Proxy pools and expert trajectories read once and shared by the runs of one process.

    A sweep or an experiment runs many distillations over the same pools; each run asks the cache,
    which reads a directory the first time and hands back the same (read-only) object afterwards.
    A run without a cache reads its files itself, as before.
    """

    def __init__(self) -> None:
        self._loaded: dict[tuple, Any] = {}
        self.reads = 0

    def _get(self, key: tuple, read: Callable[[], Any]) -> Any:
        if key not in self._loaded:
            self._loaded[key] = read()
            self.reads += 1
        return self._loaded[key]

    def proxies(self, directory: str | Path, info: DatasetInfo, device: str = "cpu") -> ProxyPool:
        """The pool of ``directory`` for ``info`` on ``device`` (see :meth:`ProxyPool.load`)."""
        key = ("proxies", str(Path(directory).resolve()), info, str(device))
        return self._get(key, lambda: ProxyPool.load(directory, info, device=device))

    def experts(self, directory: str | Path, info: DatasetInfo, model: str | None = None, zca: float | None = None,
                device: str = "cpu") -> ExpertTrajectories:
        """The trajectories of ``directory`` (see :meth:`ExpertTrajectories.load`)."""
        key = ("experts", str(Path(directory).resolve()), info, model, zca, str(device))
        return self._get(key, lambda: ExpertTrajectories.load(directory, info, model=model, zca=zca, device=device))


def load_proxy_pool(directory: str | Path, info: DatasetInfo, device: str = "cpu",
                    cache: LoadCache | None = None) -> ProxyPool:
    """The pool of ``directory``: from ``cache`` when given, else read now."""
    return cache.proxies(directory, info, device) if cache is not None else ProxyPool.load(directory, info, device)


def load_experts(directory: str | Path, info: DatasetInfo, model: str | None = None, zca: float | None = None,
                 device: str = "cpu", cache: LoadCache | None = None) -> ExpertTrajectories:
    """The trajectories of ``directory``: from ``cache`` when given, else read now."""
    if cache is not None:
        return cache.experts(directory, info, model=model, zca=zca, device=device)
    return ExpertTrajectories.load(directory, info, model=model, zca=zca, device=device)
