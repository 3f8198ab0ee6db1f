"""Proxy pools for the CMI regularizer: build, load, sample.

A pool is a directory of ``proxy-NNNN.safetensors`` files, one trained network each: its state-dict
tensors plus string metadata saying which data it fits (dataset, class count, channels, image size,
normalisation), its architecture and how it was trained. Recipe of the paper (constant): networks
trained from different random inits on the real training set, 40 epochs, SGD lr 0.01, momentum 0.9,
weight decay 1e-3, batch 256, no augmentation, constant learning rate; ResNet18 with instance norm.

Loading reads every file once into one stacked tensor per parameter/buffer (K x ...) on the target
device; each proxy module's tensors are views into that storage, so the pool is held once and
serves both the paper's rule (draw one module per step) and vectorised passes over several proxies
(``torch.func.vmap`` over the stacked weights). Nothing is read from disk after loading, and files
are read with safetensors only (never unpickled). The metadata, the top-up rules of a build and the
reader are shared with the expert trajectories (:mod:`infodistill.trained`); the CMI of a set under a
pool is :func:`infodistill.regularizers.cmi.pool_cmi`.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors.torch import save_file
from torch import Tensor, nn
from torch.func import functional_call, vmap
from tqdm.auto import tqdm

from infodistill import __version__
from infodistill.data import DatasetInfo, RealData
from infodistill.errors import UserInputError
from infodistill.files import atomic_path
from infodistill.models import DistillModel, build_model, parse_model_name
from infodistill.precision import check_precision, resolve_precision
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
    _top_up,
    _TopUp,
    _training_part,
    read_trained_files,
)
from infodistill.training import EvalConfig, resolve_device, top1_accuracy, train_from_scratch, use_batched_training

PROXY_FORMAT = "infodistill-proxy-v1"
"""Value of the ``format`` metadata field of every proxy file."""

DEFAULT_PROXY_ARCH = "ResNet18"


@dataclass(frozen=True)
class ProxyRecord:
    """One proxy of a pool: its number (from the file name), training seed, test accuracy (percent) and file.

    ``path`` is None for a pool built from modules in memory.
    """

    index: int
    seed: int
    test_accuracy: float
    path: Path | None


@dataclass(frozen=True)
class ProxyMetadata(FileMetadata):
    """The string metadata of a proxy file: what data it fits, what it is, how it was trained."""

    FORMAT: ClassVar[str] = PROXY_FORMAT
    KIND: ClassVar[str] = "proxy"
    COMMAND: ClassVar[str] = "proxies"
    PARSERS: ClassVar[dict[str, Callable[[str], Any]]] = {
        **COMMON_PARSERS, "arch": str, "momentum": float, "weight_decay": float, "precision": str,
    }

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


PROXY_FILES = NumberedFiles("proxy", ProxyMetadata)
"""The files that make up a pool: ``proxy-NNNN.safetensors``."""


BUILD_FIELDS = DATA_FIELDS + ("arch", "epochs", "lr", "momentum", "weight_decay", "batch_size", "augment",
                              "train_per_class", "precision")
"""Metadata that must match for a build to add proxies to an existing pool directory."""


def save_proxy(model: nn.Module, path: str | Path, metadata: ProxyMetadata) -> Path:
    """Write ``model``'s state dict and ``metadata`` to ``path`` atomically (complete or absent)."""
    path = Path(path)
    tensors = {name: tensor.detach().to("cpu").contiguous().clone() for name, tensor in model.state_dict().items()}
    with atomic_path(path) as temporary:
        save_file(tensors, str(temporary), metadata=metadata.to_strings())
    return path


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
    _check_train_per_class(train_per_class)
    precision = resolve_precision(check_precision(precision), resolve_device(device), measured=False)
    config = EvalConfig(model=arch, runs=1, epochs=epochs, lr=lr, momentum=momentum, weight_decay=weight_decay,
                        batch_size=batch_size, augment="none", lr_schedule="constant", seed=seed, device=device,
                        precision=precision, batched=batched)
    config.validate()
    planned = dict(_data_values(real.info), arch=parse_model_name(arch).canonical_name, epochs=epochs, lr=float(lr),
                   momentum=float(momentum), weight_decay=float(weight_decay), batch_size=batch_size, augment="none",
                   train_per_class=train_per_class, precision=precision)
    plan = _top_up(Path(out_dir), PROXY_FILES, planned, BUILD_FIELDS, count, seed)
    records = [ProxyRecord(index, metadata.seed, metadata.test_accuracy, path)
               for index, path, metadata in plan.existing]
    if plan.to_train:
        records += _train_proxies(real, Path(out_dir), config, planned, plan, progress)
    return records


def _train_proxies(real: RealData, out_dir: Path, config: EvalConfig, planned: dict[str, Any], plan: _TopUp,
                   progress: bool) -> list[ProxyRecord]:
    """Train the proxies ``plan`` leaves to build, writing each to ``out_dir`` as soon as it is trained."""
    info = real.info
    train_images, train_labels = _training_part(*real.train_tensors(), info.num_classes, planned["train_per_class"],
                                                config.seed)
    test_images, test_labels = real.test_tensors()
    planned_seeds = plan.planned_seeds()
    # trained together (vectorised) in groups, one after another otherwise; each proxy is written at once
    together = use_batched_training(dataclasses.replace(config, runs=len(planned_seeds)),
                                    resolve_device(config.device))
    groups = [planned_seeds] if together else [[entry] for entry in planned_seeds]
    records = []
    bar = tqdm(total=plan.to_train, desc=f"proxies {planned['arch']}", unit="proxy", disable=not progress)
    with bar:
        for group in groups:
            models, _ = train_from_scratch(train_images, train_labels, info.num_classes,
                                           dataclasses.replace(config, runs=len(group)),
                                           [proxy_seed for _, proxy_seed in group], progress=progress)
            for (index, proxy_seed), model in zip(group, models):
                accuracy = top1_accuracy(model, test_images, test_labels)
                metadata = ProxyMetadata(seed=proxy_seed, test_accuracy=accuracy, **planned)
                path = save_proxy(model, out_dir / PROXY_FILES.name(index), metadata)
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


class _PoolReader:
    """The tensors of a pool's files, copied into one stacked tensor per name (K x ...) on ``device``.

    The first file fixes the architecture (its template and the stacked storage); every later file must
    be of the same architecture and hold exactly its tensors."""

    def __init__(self, directory: Path, info: DatasetInfo, files: Sequence[tuple[int, Path]],
                 device: torch.device) -> None:
        self.directory = directory
        self.info = info
        self.files = files
        self.device = device
        self.arch: str | None = None
        self.template: DistillModel | None = None
        self.state: dict[str, Tensor] = {}

    def _start(self, arch: str, path: Path) -> None:
        info = self.info
        try:
            self.template = build_model(arch, info.channels, info.num_classes, info.image_size, seed=0)
        except UserInputError as error:
            raise UserInputError(f"proxy file {path}: {error}") from None
        self.arch = arch
        self.state = {
            name: torch.empty((len(self.files), *tensor.shape), dtype=tensor.dtype, device=self.device)
            for name, tensor in self.template.state_dict().items()
        }

    def read(self, trained: TrainedFile, handle: Any) -> None:
        path, arch = trained.path, trained.metadata.arch
        if self.arch is None:
            self._start(arch, path)
        elif arch != self.arch:
            raise UserInputError(
                f"proxy pool {self.directory} mixes architectures: arch is {arch!r} in {path.name}, "
                f"expected {self.arch!r} (as in {self.files[0][1].name})"
            )
        names = set(handle.keys())
        if names != set(self.state):
            differing = sorted(names ^ set(self.state))
            raise UserInputError(
                f"proxy file {path} does not hold the tensors of a {self.arch}: {len(differing)} names differ "
                f"(e.g. {differing[0]!r})"
            )
        for name, destination in self.state.items():
            tensor = handle.get_tensor(name)
            if tensor.shape != destination.shape[1:] or tensor.dtype != destination.dtype:
                raise UserInputError(
                    f"proxy file {path}: tensor {name!r} is {tensor.dtype} {list(tensor.shape)}, a {self.arch} "
                    f"needs {destination.dtype} {list(destination.shape[1:])}"
                )
            destination[trained.position].copy_(tensor)


class ProxyPool:
    """K frozen proxy networks of one architecture, held in memory on one device, sampled at random.

    Build one with :meth:`load` (a directory written by :func:`train_proxy_pool`) or from modules in
    memory. Every proxy is in eval mode with ``requires_grad`` off; its tensors are views into the
    pool's stacked storage, which :meth:`stacked` (and :func:`~infodistill.regularizers.cmi.pool_cmi`)
    use for vectorised passes.
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
        files = _files_or_refuse(directory, PROXY_FILES, "proxy pool directory",
                                 f"build one with 'infodistill proxies --dataset {info.name} --out {directory}'")

        def misfit(name: str, found: str, wanted: str, path: Path) -> str:
            return (f"proxy pool {directory} does not fit dataset '{info.name}': {name} is {found} in {path.name}, "
                    f"expected {wanted}")

        reader = _PoolReader(directory, info, files, target)
        read = read_trained_files(files, ProxyMetadata, _data_values(info), DATA_FIELDS, misfit, reader.read)
        records = [ProxyRecord(file.index, file.metadata.seed, file.metadata.test_accuracy, file.path) for file in read]
        assert reader.arch is not None and reader.template is not None
        pool = cls.__new__(cls)
        pool._setup(reader.template, reader.state, reader.arch, info, records)
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
        """The proxies at ``indices`` as stacked tensors for :func:`~infodistill.regularizers.cmi.cmi_per_proxy`.

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


def load_proxy_pool(directory: str | Path, info: DatasetInfo, device: str = "cpu",
                    cache: LoadCache | None = None) -> ProxyPool:
    """The pool of ``directory``: from ``cache`` when given (read once per process), else read now."""
    if cache is None:
        return ProxyPool.load(directory, info, device)
    key = ("proxies", str(Path(directory).resolve()), info, str(device))
    return cache.get(key, lambda: ProxyPool.load(directory, info, device=device))
