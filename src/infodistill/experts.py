"""Expert trajectories for trajectory matching (MTT, DATM): build, load, read a weight vector.

A set of experts is a directory of ``expert-NNNN.safetensors`` files, one network trained with MTT's
recipe (plain SGD, constant lr, DSA, optionally ZCA-whitened data) each, holding one float32 tensor
``trajectory``: its flat parameters before training and after every epoch, plus string metadata saying
which data it fits, the model, the recipe and the parameter layout. The metadata machinery, the top-up
rules of a build and the reader are shared with the proxy pools (:mod:`infodistill.trained`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors.torch import save_file
from torch import Tensor, nn
from torch.nn.utils import parameters_to_vector
from tqdm.auto import tqdm

from infodistill import __version__
from infodistill.data import DatasetInfo, RealData, whiten
from infodistill.errors import UserInputError
from infodistill.files import atomic_path
from infodistill.models import build_model, has_batch_norm, parse_model_name
from infodistill.trained import (
    COMMON_PARSERS,
    DATA_FIELDS,
    FileMetadata,
    LoadCache,
    NumberedFiles,
    TrainedFile,
    _check_count_and_seed,
    _check_train_per_class,
    _data_values,
    _files_or_refuse,
    _same_value,
    _top_up,
    _TopUp,
    _training_part,
    read_trained_files,
)
from infodistill.training import AUGMENTATIONS, EvalConfig, resolve_device, top1_accuracy, train_from_scratch

EXPERT_FORMAT = "infodistill-expert-v1"
"""Value of the ``format`` metadata field of every expert-trajectory file."""

EXPERT_TENSOR = "trajectory"
"""Name of the one tensor of an expert file: (epochs + 1) x P float32."""


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


@dataclass(frozen=True)
class ExpertMetadata(FileMetadata):
    """The string metadata of an expert-trajectory file: the data, the model, the recipe, the layout.

    ``layout`` is the (name, shape) of every parameter in ``named_parameters()`` order, as stored
    flat in each row of the trajectory; ``zca`` is the whitening epsilon of the data (0: none).
    """

    FORMAT: ClassVar[str] = EXPERT_FORMAT
    KIND: ClassVar[str] = "expert"
    COMMAND: ClassVar[str] = "experts"
    PARSERS: ClassVar[dict[str, Callable[[str], Any]]] = {
        **COMMON_PARSERS, "model": str, "zca": float, "layout": _parse_layout,
    }

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


EXPERT_FILES = NumberedFiles("expert", ExpertMetadata)
"""The files that make up a set of expert trajectories: ``expert-NNNN.safetensors``."""


EXPERT_BUILD_FIELDS = DATA_FIELDS + ("model", "epochs", "lr", "batch_size", "augment", "zca", "layout",
                                     "train_per_class")
"""Metadata that must match for a build to add experts to an existing directory."""

EXPERT_SHARED_FIELDS = ("model", "epochs", "layout", "lr", "zca")
"""Metadata on which all experts of a directory must agree to be loaded together."""


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
    :func:`~infodistill.proxies.train_proxy_pool`: experts already there count when built for the same
    data, model and recipe (otherwise ``UserInputError`` naming the field); new ones are numbered after
    the highest existing number and the one numbered i is trained with seed ``run_seeds(seed, i + 1)[i]``,
    so an interrupted build continued with the same arguments ends with the same files. Returns the
    records of every expert in ``out_dir``, by index.
    """
    _check_count_and_seed(count, seed)
    _check_expert_settings(epochs, lr, batch_size, augment, zca)
    _check_train_per_class(train_per_class)
    config = expert_config(model, epochs, lr, batch_size, augment, seed, device)
    config.validate()
    template = _expert_template(model, real.info)
    planned = dict(_data_values(real.info), model=parse_model_name(model).canonical_name, epochs=epochs,
                   lr=float(lr), batch_size=batch_size, augment=augment, zca=float(zca),
                   layout=parameter_layout(template), train_per_class=train_per_class)
    plan = _top_up(Path(out_dir), EXPERT_FILES, planned, EXPERT_BUILD_FIELDS, count, seed)
    records = [ExpertRecord(index, metadata.seed, metadata.test_accuracy, path)
               for index, path, metadata in plan.existing]
    if plan.to_train:
        records += _train_trajectories(real, Path(out_dir), config, planned, plan, zca, progress)
    return records


def _train_trajectories(real: RealData, out_dir: Path, config: EvalConfig, planned: dict[str, Any], plan: _TopUp,
                        zca: float, progress: bool) -> list[ExpertRecord]:
    """Train the experts ``plan`` leaves to build, writing each to ``out_dir`` as soon as it is trained."""
    info = real.info
    data = whiten(real, zca) if zca > 0 else real
    # the same images as real.training_subset(train_per_class, seed)
    train_images, train_labels = _training_part(*data.train_tensors(), info.num_classes, planned["train_per_class"],
                                                config.seed)
    test_images, test_labels = data.test_tensors()
    size = sum(math.prod(shape) for _, shape in planned["layout"])
    records = []
    bar = tqdm(total=plan.to_train, desc=f"experts {planned['model']}", unit="expert", disable=not progress)
    with bar:
        for index, expert_seed in plan.planned_seeds():
            trajectory = torch.empty(config.epochs + 1, size, dtype=torch.float32)
            # train_from_scratch starts from build_model(config.model, ..., seed=expert_seed): the same weights.
            initial = build_model(config.model, info.channels, info.num_classes, info.image_size, seed=expert_seed)
            trajectory[0] = flat_parameters(initial)

            def record_epoch(run: int, epoch: int, network: nn.Module, trajectory: Tensor = trajectory) -> None:
                trajectory[epoch + 1] = flat_parameters(network).cpu()

            (network,), _ = train_from_scratch(train_images, train_labels, info.num_classes, config, [expert_seed],
                                               progress=progress, after_epoch=record_epoch)
            accuracy = top1_accuracy(network, test_images, test_labels)
            metadata = ExpertMetadata(seed=expert_seed, test_accuracy=accuracy, **planned)
            path = out_dir / EXPERT_FILES.name(index)
            with atomic_path(path) as temporary:
                save_file({EXPERT_TENSOR: trajectory}, str(temporary), metadata=metadata.to_strings())
            records.append(ExpertRecord(index, expert_seed, accuracy, path))
            bar.set_postfix(test_acc=f"{accuracy:.1f}%")
            bar.update(1)
    return records


class _TrajectoryReader:
    """The trajectories of a directory's files, copied into one tensor E x (epochs + 1) x P on ``device``.

    The first file fixes the model, epochs and layout (checked against the model built for ``info``);
    every later file must agree with it on :data:`EXPERT_SHARED_FIELDS`."""

    def __init__(self, directory: Path, info: DatasetInfo, files: Sequence[tuple[int, Path]],
                 device: torch.device) -> None:
        self.directory = directory
        self.info = info
        self.files = files
        self.device = device
        self.first: ExpertMetadata | None = None
        self.trajectories = torch.empty(0)

    def _start(self, metadata: ExpertMetadata, path: Path) -> None:
        info = self.info
        try:
            layout = parameter_layout(_expert_template(metadata.model, info))
        except UserInputError as error:
            raise UserInputError(f"expert file {path}: {error}") from None
        if not _same_value(layout, metadata.layout):
            raise UserInputError(
                f"expert file {path}: its parameter layout is not that of a {metadata.model} for "
                f"dataset '{info.name}' (written by another version?)"
            )
        self.first = metadata
        size = sum(math.prod(shape) for _, shape in layout)
        self.trajectories = torch.empty(len(self.files), metadata.epochs + 1, size, dtype=torch.float32,
                                        device=self.device)

    def read(self, trained: TrainedFile, handle: Any) -> None:
        path, metadata = trained.path, trained.metadata
        if self.first is None:
            self._start(metadata, path)
        else:
            differing = self.first.first_mismatch(
                {name: getattr(metadata, name) for name in EXPERT_SHARED_FIELDS}, EXPERT_SHARED_FIELDS
            )
            if differing is not None:
                name, found, wanted = differing
                raise UserInputError(
                    f"experts in {self.directory} disagree: {name} is {wanted} in {path.name} but {found} in "
                    f"{self.files[0][1].name}; keep one kind of expert per directory"
                )
        if set(handle.keys()) != {EXPERT_TENSOR}:
            raise UserInputError(
                f"expert file {path} holds tensors {sorted(handle.keys())}, expected only {EXPERT_TENSOR!r}"
            )
        tensor = handle.get_tensor(EXPERT_TENSOR)
        expected_shape = self.trajectories.shape[1:]
        if tensor.shape != expected_shape or tensor.dtype != torch.float32:
            raise UserInputError(
                f"expert file {path}: {EXPERT_TENSOR!r} is {tensor.dtype} {list(tensor.shape)}, expected "
                f"torch.float32 {list(expected_shape)} (epochs + 1 rows of the flat weights)"
            )
        self.trajectories[trained.position].copy_(tensor)


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
        files = _files_or_refuse(directory, EXPERT_FILES, "expert directory",
                                 f"build them with 'infodistill experts --dataset {info.name} --out {directory}'")
        expected: dict[str, Any] = dict(_data_values(info))
        checked = list(DATA_FIELDS)
        if model is not None:
            expected["model"] = parse_model_name(model).canonical_name
            checked.append("model")
        if zca is not None:
            expected["zca"] = float(zca)
            checked.append("zca")

        def misfit(name: str, found: str, wanted: str, path: Path) -> str:
            return f"experts in {directory} do not fit this run: {name} is {found} in {path.name}, expected {wanted}"

        reader = _TrajectoryReader(directory, info, files, target)
        read = read_trained_files(files, ExpertMetadata, expected, checked, misfit, reader.read)
        records = [ExpertRecord(file.index, file.metadata.seed, file.metadata.test_accuracy, file.path)
                   for file in read]
        assert reader.first is not None
        return cls(reader.trajectories, records, info, reader.first)

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


def load_experts(directory: str | Path, info: DatasetInfo, model: str | None = None, zca: float | None = None,
                 device: str = "cpu", cache: LoadCache | None = None) -> ExpertTrajectories:
    """The trajectories of ``directory``: from ``cache`` when given (read once per process), else read now."""
    if cache is None:
        return ExpertTrajectories.load(directory, info, model=model, zca=zca, device=device)
    key = ("experts", str(Path(directory).resolve()), info, model, zca, str(device))
    return cache.get(key, lambda: ExpertTrajectories.load(directory, info, model=model, zca=zca, device=device))
