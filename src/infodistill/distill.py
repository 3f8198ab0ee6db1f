"""The distillation loop: one loop for every method x parameterisation x regularizers.

Per iteration the loop builds a :class:`~infodistill.methods.DistillContext` with the iteration's own
random stream, and for each matching loss the method yields it adds the weighted regularizers,
steps the image optimiser, and logs every term. Around that it keeps the run safe and repeatable:

- seeds: every iteration draws from a generator derived from (seed, iteration), so a run resumed
  from a checkpoint at iteration k continues exactly as the uninterrupted run did (bit for bit on CPU);
- checkpoints: the synthetic set, the optimiser's momentum and the resolved settings, written
  atomically every ``checkpoint_every`` iterations; ``resume`` continues from the last one;
- a loss that becomes NaN or infinite, or an update that makes a stepped tensor so, stops the run at that
  iteration (in every process of a split run); the last good checkpoint stays as it was, and no artefact
  is written from non-finite state;
- the run directory: one run at a time (an OS lock, taken by rank 0), and a fresh run never overwrites
  files already there;
- logs: every loss term per iteration to ``metrics.jsonl`` and TensorBoard (``tb/``);
- output: the artefact ``set.safetensors`` with its PNG grid, and ``config.yaml``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import time
from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import yaml
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from infodistill import __version__
from infodistill.artefact import DistilledSet, SetMetadata, save_set
from infodistill.augment import DSA
from infodistill.config import check_seed, config_from_mapping
from infodistill.data import ClassSampler, RealData, load_dataset
from infodistill.data.zca import whiten
from infodistill.errors import UserInputError
from infodistill.evaluate import EvalResult, evaluate_set
from infodistill.files import atomic_path, directory_in_use, directory_lock
from infodistill.methods import (
    METHOD_REGISTRY,
    ClassUpdate,
    DistillContext,
    Method,
    MethodDefaults,
    MethodSetup,
    method_class,
    method_fields,
    method_settings,
)
from infodistill.methods.base import MatchingSettings
from infodistill.methods.datm import DATMSettings
from infodistill.methods.gradient_matching import GradientMatchingSettings
from infodistill.methods.idc import IDCSettings
from infodistill.methods.mtt import TrajectorySettings
from infodistill.methods.sre2l import DWASettings, RecoverSettings
from infodistill.models import parse_model_name
from infodistill.parallel import (
    SINGLE_PROCESS,
    ProcessGroup,
    all_gather_objects,
    all_gather_tensors,
    all_reduce_sum,
    is_main,
    partition,
    rank_device,
)
from infodistill.precision import PRECISIONS, autocast_context, resolve_precision, to_fp32
from infodistill.proxies import ProxyPool, load_proxy_pool
from infodistill.regularizers import CMIRegularizer, Regularizer, cmi_from_features
from infodistill.regularizers.base import REGULARIZER_REGISTRY, regularizers_on
from infodistill.regularizers.cmi import CMISettings, cmi_weight_active, pool_cmi
from infodistill.regularizers.mim import MIMSettings
from infodistill.settings import AT_LEAST_ONE, POSITIVE, Bounds, check_values, setting
from infodistill.synthetic import (
    INITS,
    PARAMETERISATION_REGISTRY,
    SyntheticSet,
    build_synthetic,
    parameterisation_settings,
)
from infodistill.synthetic.lowrank import LowRankSettings
from infodistill.synthetic.multi import MultiSettings
from infodistill.trained import LoadCache
from infodistill.training import EvalConfig, resolve_device

log = logging.getLogger("infodistill")

CHECKPOINT_NAME = "checkpoint.safetensors"
ARTEFACT_NAME = "set.safetensors"
CONFIG_NAME = "config.yaml"
METRICS_NAME = "metrics.jsonl"
# Settings that may differ between a run and its resumption (they do not change what is computed).
RESUMABLE_CHANGES = ("iterations", "checkpoint_every", "eval_every", "eval_epochs", "eval_runs", "eval_model",
                     "monitor_every", "device", "data_root")
SETTINGS_OF_OLDER_RUNS = {"precision": "fp32"}
"""Settings added after checkpoints were first written, with the value that runs written before them used
(a checkpoint without the key is compared with this value on resume)."""


LOOP_FIELDS = frozenset({
    "dataset", "method", "ipc", "iterations", "param", "init", "model", "lr_images", "momentum_images", "optimizer",
    "lr_schedule", "ema_decay", "zca", "cmi_weight", "mim_weight", "proxies", "held_out_proxies", "seed", "device",
    "precision", "data_root", "checkpoint_every", "eval_every", "monitor_every", "eval_model", "eval_epochs",
    "eval_runs",
})
"""``DistillConfig`` fields the loop reads in every run, whatever the method, parameterisation and regularizers
(``cmi_weight`` and ``mim_weight`` are the switches of their regularizers). Every other field belongs to the
parts that declare it (:func:`part_fields`); validation refuses it when it is set and no chosen part reads it."""

METHOD_DEFAULT_FIELDS = ("iterations", "lr_images", "momentum_images", "batch_real", "augment", "param", "ema_decay",
                         "init", "optimizer", "lr_schedule")
"""The fields :meth:`DistillConfig.with_method_defaults` fills from the method's published settings."""


class LossDiverged(RuntimeError):
    """A loss became NaN or infinite; the run stopped and its last good checkpoint was kept."""



OPTIMIZERS = ("sgd", "adam")
LR_SCHEDULES = ("constant", "cosine")


@dataclass(frozen=True)
class RunSettings:
    """What a run distils, with which network, for how long, and what it logs and evaluates on the way."""

    title: ClassVar[str] = "run"
    dataset: str = setting("fashion-mnist", "dataset name", metavar="NAME")
    data_root: str | None = setting(None, "data root", metavar="DIR",
                                    default_text="$INFODISTILL_DATA or ~/.cache/infodistill/data")
    method: str = setting("dm", "distillation method: dm, dc, dsa, mtt, datm, idc, sre2l, dwa", metavar="NAME")
    ipc: int = setting(10, "synthetic images per class", bounds=AT_LEAST_ONE, metavar="N")
    iterations: int | None = setting(None, "iterations", bounds=AT_LEAST_ONE, metavar="N",
                                     default_text="the method's, DM 20000, DC/DSA 1000")
    param: str | None = setting(None, "parameterisation: pixels, lowrank, multi", metavar="NAME",
                                default_text="the method's; idc: multi")
    init: str | None = setting(None, "start from real images or noise", choices=INITS, default_text="real")
    model: str = setting("ConvNet-3", "matching network architecture", metavar="NAME")
    seed: int = setting(0, "seed of the run, 0..2**63-1")
    device: str = setting("cpu", "device", metavar="cpu|cuda")
    precision: str = setting("auto", "arithmetic of the networks' forward passes: bf16 runs them under autocast, the "
                             "images and the optimiser stay float32; auto is bf16 for DM on CPUs with native bf16, "
                             "else fp32; fixed for a run (docs/precision.md)", choices=PRECISIONS)
    checkpoint_every: int = setting(100, "iterations between checkpoints", bounds=AT_LEAST_ONE, metavar="N")
    monitor_every: int = setting(10, "with --proxies: log the set's CMI under the pool every N iterations, also "
                                 "without the CMI term (pass --cmi-weight 0 to only monitor)",
                                 bounds=Bounds(low=0, note="0 turns CMI monitoring off"), metavar="N",
                                 default_text="10; 0: off")
    eval_every: int = setting(0, "evaluate the set every N iterations",
                              bounds=Bounds(low=0, note="0 turns periodic evaluation off"), metavar="N",
                              default_text="0, off")
    eval_model: str = setting("ConvNet-3", "model of periodic evaluation", metavar="NAME")
    eval_epochs: int = setting(300, "epochs of periodic evaluation", bounds=AT_LEAST_ONE, metavar="E")
    eval_runs: int = setting(1, "runs of periodic evaluation", bounds=AT_LEAST_ONE, metavar="N")


@dataclass(frozen=True)
class ImageSettings:
    """How the images are optimised and stored: the optimiser of the set, its schedule, an average, whitening."""

    title: ClassVar[str] = "image optimisation"
    lr_images: float | None = setting(None, "image learning rate", bounds=POSITIVE, default_text="the method's")
    momentum_images: float | None = setting(None, "image SGD momentum", bounds=Bounds(0, 1, high_open=True),
                                            default_text="0.5")
    optimizer: str | None = setting(None, "image optimiser", choices=OPTIMIZERS,
                                    default_text="the method's; sre2l: adam")
    lr_schedule: str | None = setting(None, "image learning-rate schedule", choices=LR_SCHEDULES,
                                      default_text="the method's; sre2l: cosine")
    ema_decay: float | None = setting(None, "store an exponential moving average of the images",
                                      bounds=Bounds(0, 1, high_open=True, note="0 turns the average off"),
                                      metavar="D", default_text="DATM 0.999, else off")
    zca: float = setting(0.0, "ZCA-whiten the data with this regularisation, as the experts were",
                         bounds=Bounds(low=0, note="0 turns whitening off"), metavar="EPS", default_text="0, off")


SETTINGS_GROUPS: tuple[type, ...] = (RunSettings, ImageSettings, MatchingSettings, GradientMatchingSettings,
                                     IDCSettings, TrajectorySettings, DATMSettings, RecoverSettings, DWASettings,
                                     LowRankSettings, MultiSettings, CMISettings, MIMSettings)
"""Every owner's settings, in the order ``--help`` shows them; :class:`DistillConfig` is their union."""


@dataclass(frozen=True)
class DistillConfig(MIMSettings, CMISettings, MultiSettings, LowRankSettings, DWASettings, RecoverSettings,
                    DATMSettings, TrajectorySettings, IDCSettings, GradientMatchingSettings, MatchingSettings,
                    ImageSettings, RunSettings):
    """Everything that defines a distillation run: the union of the owners' settings (:data:`SETTINGS_GROUPS`),
    each declared once with its help and range by the part that reads it. ``None`` means: the method's
    published default."""

    title: ClassVar[str] = "distillation"

    def validate(self) -> None:
        """Refuse values outside their declared range with one line naming the value and what is allowed,
        then combinations no part can run, then settings no chosen part reads."""
        method_class(self.method)
        check_values(self)
        check_seed(self.seed)
        if self.param is not None and self.param not in PARAMETERISATION_REGISTRY:
            raise UserInputError(f"param '{self.param}' is not one of: {', '.join(sorted(PARAMETERISATION_REGISTRY))}")
        parse_model_name(self.model)
        parse_model_name(self.eval_model)
        check_cmi_weight(self.cmi_weight)
        if self.zca > 0 and method_class(self.method).clips_to_pixel_range:
            raise UserInputError(f"zca {self.zca:g} does not apply to method '{self.method}': it clips images to the "
                                 "pixel range, which whitened images do not have; drop --zca")
        if self.mim_weight > 0 and not method_class(self.method).reads_real_data:
            raise UserInputError(f"mim_weight {self.mim_weight:g} needs real data, but method '{self.method}' distils "
                                 "from its teacher alone; drop --mim-weight or choose a method that reads real data")
        if self.uses_cmi and self.proxies is None:
            raise UserInputError(
                "a CMI weight needs a proxy pool: pass --proxies DIR (build one with `infodistill proxies`)"
            )
        if self.held_out_proxies is not None and self.proxies is None:
            raise UserInputError(
                "held_out_proxies monitors the set's CMI beside the pool of --proxies: pass --proxies DIR too"
            )
        self._check_unused_settings()
        resolve_device(self.device)

    def _check_unused_settings(self) -> None:
        """Refuse a setting that no chosen part reads (a method's ``lr_net`` for DM, ``rank`` for multi-formation
        images, ``mim_temperature`` without MIM), naming the parts that do read it, instead of ignoring it.

        A value equal to the field's default is never refused, nor one equal to the chosen method's published
        setting for a field :meth:`with_method_defaults` fills (presets and the ``config.yaml`` of a finished run
        write such values out)."""
        resolved = self.with_method_defaults()
        published = method_class(self.method).defaults(self.ipc)
        chosen: dict[str, list[str]] = {"method": [self.method], "param": [str(resolved.param)],
                                        "regularizer": _configured_regularizers(resolved)}
        parts = part_fields()
        for field in dataclasses.fields(self):
            name, value = field.name, getattr(self, field.name)
            if name in LOOP_FIELDS or value == field.default:
                continue
            if name in METHOD_DEFAULT_FIELDS and value == getattr(published, name):
                continue
            if any(name in parts[kind][part] for kind, names in chosen.items() for part in names):
                continue
            kind, users = next((kind, sorted(part for part, fields in by_part.items() if name in fields))
                               for kind, by_part in parts.items() if any(name in f for f in by_part.values()))
            if kind == "method":
                raise UserInputError(f"{name} does not apply to method '{self.method}'; it applies to: "
                                     f"{', '.join(users)}")
            if kind == "param":
                raise UserInputError(f"{name} does not apply to param '{resolved.param}'; it applies to: "
                                     f"{', '.join(users)}")
            on = ", ".join(chosen["regularizer"]) or "none"
            raise UserInputError(f"{name} does not apply to the regularizers on ({on}); it applies to: "
                                 + ", ".join(f"{user} (on with {REGULARIZER_REGISTRY[user].switch})" for user in users))
        if resolved.uses_cmi and resolved.cmi_weight != "auto" and self.cmi_auto_scale != 1.0:
            raise UserInputError(f"cmi_auto_scale does not apply to a fixed cmi_weight {resolved.cmi_weight:g}; "
                                 "it applies to: cmi_weight 'auto'")

    @property
    def uses_cmi(self) -> bool:
        return cmi_weight_active(self.cmi_weight)

    def with_method_defaults(self) -> DistillConfig:
        """The same config with every unset field filled from the method's published settings."""
        defaults: MethodDefaults = method_class(self.method).defaults(self.ipc)
        filled = {name: getattr(defaults, name) for name in METHOD_DEFAULT_FIELDS if getattr(self, name) is None}
        if self.cmi_weight is None and self.proxies is not None and defaults.cmi_weight is not None:
            filled["cmi_weight"] = defaults.cmi_weight
        return dataclasses.replace(self, **filled)


def parse_cmi_weight(value: float | str | None) -> float | str | None:
    """A CMI weight as given (a flag's text, a YAML value): None, ``'auto'`` or a number."""
    if not isinstance(value, str) or value == "auto":
        return value
    try:
        return float(value)
    except ValueError:
        raise UserInputError(f"cmi_weight must be a number >= 0 or 'auto', got '{value}'") from None


def check_cmi_weight(weight: float | str | None) -> None:
    """Refuse a CMI weight that is not None, ``'auto'`` or a finite number >= 0."""
    if isinstance(weight, str) and weight != "auto":
        raise UserInputError(f"cmi_weight must be a number >= 0 or 'auto', got '{weight}'")
    if isinstance(weight, (int, float)) and not (weight >= 0 and np.isfinite(weight)):
        raise UserInputError(f"cmi_weight must be a number >= 0 or 'auto', got {weight}")


RENAMED_SETTINGS = {
    "cmi_auto_fraction": "cmi_auto_scale, which scales the gradient-norm ratio instead of the loss fraction "
                         "(docs/cmi.md); the default 1 is the paper's strength",
}
"""Settings of earlier releases that were replaced: old key -> the new key and what changed."""


def distill_config_from(values: dict[str, Any], source: str = "config") -> DistillConfig:
    """Build and check a :class:`DistillConfig` from a mapping (YAML file plus flags); a replaced key is refused
    with a line naming its successor."""
    for old, new in RENAMED_SETTINGS.items():
        if old in values:
            raise UserInputError(f"{source}: '{old}' was replaced by {new}")
    if "cmi_weight" in values:
        values = {**values, "cmi_weight": parse_cmi_weight(values["cmi_weight"])}
    return config_from_mapping(DistillConfig, values, source)



def schedule_factor(schedule: str, iteration: int, iterations: int) -> float:
    """Multiplier of the base learning rates at ``iteration``: 1, or the cosine decay
    ``0.5 * (1 + cos(pi * iteration / iterations))`` (SRe2L's schedule)."""
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * iteration / iterations))
    return 1.0


# Independent random streams of a run: one per iteration, one for the initial set, one for calibration,
# one for the method's preparation, one for the MIM projection heads.
ITERATION_STREAM, INIT_STREAM, CALIBRATION_STREAM, SETUP_STREAM, MIM_STREAM = 0, 1, 2, 3, 4


def stream_seed(seed: int, stream: int, index: int = 0, *more: int) -> int:
    """Seed of one random stream, fixed by (run seed, stream, index, *more) and independent of every other."""
    return int(np.random.SeedSequence([seed, stream, index, *more]).generate_state(1, np.uint64)[0] >> 1)


@dataclass
class RegularizerTerm:
    """A regularizer with its weight and how often it is computed (every ``every`` iterations)."""

    name: str
    regularizer: Regularizer
    weight: float
    every: int = 1

    def active(self, iteration: int) -> bool:
        return self.weight > 0 and iteration % self.every == 0


@dataclass
class DistillResult:
    """Where a finished run wrote its outputs, and the settings it resolved."""

    out_dir: Path
    artefact: Path
    config: DistillConfig
    regularizer_weights: dict[str, float]
    iterations: int
    seconds: float


class RunFiles:
    """The files of one run directory."""

    def __init__(self, out_dir: str | Path) -> None:
        self.root = Path(out_dir)
        self.checkpoint = self.root / CHECKPOINT_NAME
        self.artefact = self.root / ARTEFACT_NAME
        self.config = self.root / CONFIG_NAME
        self.metrics = self.root / METRICS_NAME
        self.tensorboard = self.root / "tb"


def build_method(config: DistillConfig) -> Method:
    """The method object, given those config fields that its constructor takes (same names)."""
    cls = method_class(config.method)
    accepted = method_settings(cls)
    settings = {name: getattr(config, name) for name in accepted if hasattr(config, name)}
    return cls(**{name: value for name, value in settings.items() if value is not None})


def make_context(config: DistillConfig, iteration: int, synthetic: SyntheticSet, sampler: ClassSampler,
                  real: RealData, augment: DSA | None, device: torch.device,
                  stream: int = ITERATION_STREAM, classes: tuple[int, ...] | None = None,
                  split: ProcessSplit | None = None) -> DistillContext:
    """The context of one iteration; ``classes``: those this process computes (None: all), or ``split``:
    this process's share of a run split over processes (its classes, image positions or trajectories)."""
    generator = torch.Generator().manual_seed(stream_seed(config.seed, stream, iteration))

    def substream(index: int) -> torch.Generator:
        return torch.Generator().manual_seed(stream_seed(config.seed, stream, iteration, index))

    share: dict[str, Any] = {"classes": classes}
    if split is not None:
        share = {split.context_field: split.mine}
        if split.kind == "classes":
            share["share_set"] = lambda: split.refresh(synthetic)
    return DistillContext(iteration=iteration, generator=generator, synthetic=synthetic, sampler=sampler,
                          info=real.info, augment=augment, device=device, model_name=config.model,
                          substream=substream, **share)


SPLIT_KINDS = {"classes": "classes", "images": "image_positions", "trajectories": "trajectories"}
"""Each way a method divides a run over processes (``Method.process_split``) -> the context field that
gives a process its share."""


@dataclass(frozen=True)
class ProcessSplit:
    """A run divided over processes (``docs/distributed.md``). Every process holds the whole set and makes
    every random draw; rank r computes the share ``parts[r]``: its classes, its image positions (the j-th
    image of every class), or its trajectories.

    For classes and images a process steps only its own rows of the set (the others get a zero gradient
    there), and the whole set is gathered from the rows' owners when it is logged, checkpointed or written,
    or when a method reads all of it (:meth:`refresh`). For trajectories every process computes a part of
    the gradient of the whole set; the loop sums the gradients, so all processes step the same set."""

    group: ProcessGroup
    kind: str
    parts: tuple[tuple[int, ...], ...]

    @property
    def mine(self) -> tuple[int, ...]:
        """This process's share."""
        return self.parts[self.group.rank]

    @property
    def context_field(self) -> str:
        return SPLIT_KINDS[self.kind]

    @property
    def replicated(self) -> bool:
        """True when every process steps the whole set (gradients summed), False when each steps its rows."""
        return self.kind == "trajectories"

    def _rows(self, synthetic: SyntheticSet, tensor: torch.Tensor, part: tuple[int, ...]) -> torch.Tensor:
        """Indices of the rows of ``tensor`` (a stored tensor of the set, or one of its shape) owned by ``part``."""
        per_class, remainder = divmod(tensor.shape[0], synthetic.num_classes)
        if remainder:
            raise ValueError(f"a tensor of shape {list(tensor.shape)} does not hold {synthetic.num_classes} classes")
        if self.kind == "classes":
            rows = [c * per_class + i for c in part for i in range(per_class)]
        else:
            rows = [c * per_class + j for c in range(synthetic.num_classes) for j in part]
        return torch.tensor(rows, dtype=torch.long, device=tensor.device)

    def gather(self, synthetic: SyntheticSet, tensor: torch.Tensor) -> torch.Tensor:
        """A stored tensor of ``synthetic`` (or one of its shape: momentum, average) made whole: each row from
        the process that steps it. A collective: every process calls it alike."""
        tensor = tensor.detach()
        if self.replicated:
            return tensor
        chunks = all_gather_tensors(self.group, tensor[self._rows(synthetic, tensor, self.mine)])
        whole = tensor.clone()
        for part, chunk in zip(self.parts, chunks):
            whole[self._rows(synthetic, tensor, part)] = chunk
        return whole

    @torch.no_grad()
    def refresh(self, synthetic: SyntheticSet) -> None:
        """Copy the rows other processes stepped into this process's set (a collective)."""
        if self.replicated:
            return
        for parameter in synthetic.parameters():
            parameter.copy_(self.gather(synthetic, parameter))


def _configured_regularizers(config: DistillConfig) -> list[str]:
    return regularizers_on(config)


def part_fields() -> dict[str, dict[str, frozenset[str]]]:
    """Per kind of part (method, param, regularizer), the ``DistillConfig`` fields each registered part reads:
    a method's constructor settings and ``reads_from_loop``, a parameterisation's ``initialise`` settings, a
    regularizer's ``config_fields``. Fields outside :data:`LOOP_FIELDS` are valid only for the parts listing them."""
    names = {field.name for field in dataclasses.fields(DistillConfig)}
    return {
        "method": {name: method_fields(method_class(name)) & names for name in METHOD_REGISTRY},
        "param": {name: parameterisation_settings(name) & names for name in PARAMETERISATION_REGISTRY},
        "regularizer": {name: cls.config_fields & names for name, cls in REGULARIZER_REGISTRY.items()},
    }


def plan_split(config: DistillConfig, world_size: int, num_classes: int) -> tuple[str, list[list[int]]]:
    """How a run divides over ``world_size`` processes: (kind, each process's share), the kind being the
    method's ``process_split`` and the shares contiguous runs of classes, image positions or trajectories
    (:func:`~infodistill.parallel.partition`). Refuses, with one line, a method, network,
    regularizer or parameterisation that cannot divide, and more processes than there are shares."""
    config = config.with_method_defaults()
    cls = method_class(config.method)
    kind = cls.process_split
    supported = sorted(name for name in METHOD_REGISTRY if method_class(name).process_split is not None)
    problems = [cls.split_problem(config.model)]
    if kind == "classes":
        problems += [f"the {name.upper()} regularizer does not split over classes" for name in
                     _configured_regularizers(config) if not REGULARIZER_REGISTRY[name].class_decomposable]
        assert config.param is not None  # with_method_defaults() fills it
        parameterisation = getattr(PARAMETERISATION_REGISTRY.get(config.param), "__self__", None)
        if parameterisation is not None and not parameterisation.rows_by_class:
            problems.append(f"param '{config.param}' stores tensors shared between classes")
    elif kind == "images":
        problems += [f"method '{config.method}' splits its images over processes, and the {name.upper()} "
                     "regularizer needs every image of a class" for name in _configured_regularizers(config)]
        if config.param != "pixels":
            problems.append(f"method '{config.method}' splits its images over processes, which needs param "
                            f"'pixels' (param '{config.param}' decodes one stored tensor into several images)")
    problems = [problem for problem in problems if problem]
    if problems:
        raise UserInputError(f"{problems[0]}; in {world_size} processes the supported methods are: "
                             f"{', '.join(supported)}; run it in one process")
    if kind == "classes":
        return kind, partition(num_classes, world_size)
    if kind == "images":
        return kind, partition(config.ipc, world_size, "images per class (--ipc)")
    return kind, partition(config.trajectories or 1, world_size, "trajectories per iteration (--trajectories)")


PUBLISHED_CMI_WEIGHTS: dict[str, float] = {"dm": 8000.0, "dc": 5e4, "dsa": 5e4, "idc": 100.0}
"""The CMI paper's lambda at IPC 10 on CIFAR-10, per method (methods.md, section 1, from the official code)."""

CMI_TARGET_RATIOS: dict[str, dict[int, float]] = {
    "dm": {10: 0.44, 50: 0.29},
    "dsa": {10: 1.46},
    "dc": {10: 1.46},
    "idc": {10: 0.024},
}
"""'auto''s target ratio ||lambda * grad CMI(S_0)|| / ||grad L_method(S_0)|| per method and IPC: the ratio the
paper's lambda (DM 8000 / 2000 at IPC 10 / 50, DSA 5e4, IDC 100 per class) gives on the initial set under a
pool of the paper's proxies (instance-norm ResNet18, 512-d pooled), measured on Fashion-MNIST at the paper's
256 real images per class with ``benchmarks/bench_cmi_calibration.py`` (docs/cmi.md, which gives the pool and
each figure). DM at IPC 10 / 50: 0.44 / 0.29, DSA at IPC 10: 1.46, IDC at IPC 10: 0.024 (4 ResNet18-IN,
82.8-83.5 % test accuracy). DC takes DSA's ratio (the paper
gives both one lambda); methods without a published lambda take DM's; the nearest measured IPC is used (the
smaller on a tie)."""

CALIBRATION_DRAWS = 3
"""Iterations of the calibration stream whose matching-loss gradients 'auto' averages (one random network
each for DM): the norm of one draw varies with the network."""


@dataclass(frozen=True)
class CMICalibration:
    """How 'auto' chose the CMI weight on the initial set S_0, recorded in config.yaml and the artefact:
    ``weight = scale * target_ratio * method_grad_norm / cmi_grad_norm``, the norms taken over the tensors
    the optimiser steps (the pixels of a pixel set)."""

    target_ratio: float
    scale: float
    method_grad_norm: float
    cmi_grad_norm: float
    initial_loss: float
    initial_cmi: float
    weight: float

    @property
    def ratio(self) -> float:
        """The gradient ratio the weight gives on S_0: ``weight * cmi_grad_norm / method_grad_norm``."""
        return self.weight * self.cmi_grad_norm / self.method_grad_norm

    def to_dict(self) -> dict[str, float]:
        return {**dataclasses.asdict(self), "ratio": self.ratio}


def cmi_target_ratio(method: str, ipc: int) -> float:
    """The gradient ratio 'auto' aims at for ``method`` at ``ipc`` (:data:`CMI_TARGET_RATIOS`)."""
    by_ipc = CMI_TARGET_RATIOS.get(method, CMI_TARGET_RATIOS["dm"])
    return by_ipc[min(by_ipc, key=lambda measured: (abs(measured - ipc), measured))]


def _gradient_norm(value: torch.Tensor, learned: Sequence[torch.Tensor]) -> float:
    grads = torch.autograd.grad(value, learned, allow_unused=True)
    return math.sqrt(sum(float(grad.double().pow(2).sum()) for grad in grads if grad is not None))


def initial_gradients(method: Method, regularizer: CMIRegularizer, contexts: list[DistillContext],
                      precision: str = "fp32") -> tuple[float, float, float, float]:
    """(mean matching loss, mean norm of its gradient, CMI, norm of the CMI's gradient) on the initial set.

    The matching loss is the method's first loss of each context (one per calibration draw); its gradient
    is taken over the tensors the optimiser steps. The CMI is the mean over the WHOLE pool (not one random
    draw, so the weight does not hinge on one proxy), on the images that loss concerns (the whole set, or
    one class's for a per-class update), with the regularizer's per-class rule."""
    losses, norms, label = [], [], None
    learned = [parameter for parameter in contexts[0].synthetic.parameters()]
    for context in contexts:
        steps = computed_in(precision, context.device, method.iteration(context))
        first = next(steps)
        loss = first.loss if isinstance(first, ClassUpdate) else first
        assert loss is not None  # only a run split by class yields a ClassUpdate without a loss
        matching = to_fp32(loss)
        label = first.label if isinstance(first, ClassUpdate) else None
        losses.append(float(matching.detach()))
        norms.append(_gradient_norm(matching, learned))
        steps.close()
    synthetic = contexts[0].synthetic
    images, labels = _regularized_images(synthetic, label)
    pool = regularizer.pool
    with autocast_context(precision, contexts[0].device):
        values = [cmi_from_features(pool[index].embed(images), labels, pool.num_classes,
                                    per_class=regularizer.per_class) for index in range(len(pool))]
    cmi = to_fp32(torch.stack(values).mean())
    return float(np.mean(losses)), float(np.mean(norms)), float(cmi.detach()), _gradient_norm(cmi, learned)


def calibrate_cmi_weight(method: Method, regularizer: CMIRegularizer, contexts: list[DistillContext],
                         target_ratio: float, scale: float = 1.0, precision: str = "fp32") -> CMICalibration:
    """The 'auto' rule: lambda such that ``||lambda * grad CMI|| = scale * target_ratio * ||grad L_method||``
    on the initial set (:func:`initial_gradients`). The gradient ratio, not the loss ratio, is what sets
    how hard the term pulls against the matching loss (docs/cmi.md). The contexts come from a separate random
    stream, so calibrating does not change the run's iterations."""
    loss, method_norm, cmi, cmi_norm = initial_gradients(method, regularizer, contexts, precision)
    if not (cmi_norm > 0 and math.isfinite(cmi_norm)):
        raise UserInputError(f"cmi_weight 'auto' cannot calibrate: the CMI term's gradient on the initial set is "
                             f"{cmi_norm:g} (CMI {cmi:g}; with one image per class every class is its own centroid); "
                             "give a number instead")
    if not (method_norm > 0 and math.isfinite(method_norm)):
        raise UserInputError(f"cmi_weight 'auto' cannot calibrate: the matching loss's gradient on the initial set "
                             f"is {method_norm:g}; give a number instead")
    weight = scale * target_ratio * method_norm / cmi_norm
    return CMICalibration(target_ratio=target_ratio, scale=scale, method_grad_norm=method_norm, cmi_grad_norm=cmi_norm,
                          initial_loss=loss, initial_cmi=cmi, weight=weight)


class ImageAverage:
    """Exponential moving average of the synthetic set's stored tensors (DATM keeps one of its images).

    The decay warms up as ``min(decay, (1 + n) / (10 + n))`` after n updates, so a short run is not
    dominated by its initial images. The artefact is decoded from the averaged tensors.
    """

    def __init__(self, synthetic: SyntheticSet, decay: float) -> None:
        self.decay = decay
        self.count = 0
        self.shadow = {name: parameter.detach().clone() for name, parameter in synthetic.named_parameters()}

    @torch.no_grad()
    def update(self, synthetic: SyntheticSet) -> None:
        self.count += 1
        decay = min(self.decay, (1 + self.count) / (10 + self.count))
        for name, parameter in synthetic.named_parameters():
            self.shadow[name].mul_(decay).add_(parameter.detach(), alpha=1 - decay)

    @torch.no_grad()
    def images(self, synthetic: SyntheticSet) -> torch.Tensor:
        """The set decoded from the averaged tensors."""
        return torch.func.functional_call(synthetic, self.shadow, ())


def _regularized_images(synthetic: SyntheticSet, label: int | None,
                        classes: tuple[int, ...] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The images the regularizers see: the whole set, one class for a per-class update, or the classes
    of this process in a run split over processes."""
    if label is not None:
        classes = (label,)
    if classes is None:
        return synthetic.images(), synthetic.labels
    images = [synthetic.class_images(c) for c in classes]
    labels = [synthetic.labels.new_full((len(batch),), c) for batch, c in zip(images, classes)]
    return (images[0], labels[0]) if len(images) == 1 else (torch.cat(images), torch.cat(labels))


def _summed_over_processes(values: dict[str, torch.Tensor], group: ProcessGroup) -> dict[str, float]:
    """The loss terms as numbers, each summed over the processes of a split run (one collective)."""
    if not group.distributed:
        return {name: float(value.detach()) for name, value in values.items()}
    summed = all_reduce_sum(group, torch.stack([value.detach().double() for value in values.values()]))
    return dict(zip(values, summed.tolist()))


def computed_in(precision: str, device: torch.device | str, steps: Iterator[Any]) -> Generator[Any, None, None]:
    """The items of ``steps`` (a method's iteration), each computed in ``precision``: the generator is
    advanced inside :func:`~infodistill.precision.autocast_context`, and left outside it between items
    (where the loop steps the optimiser)."""
    try:
        while True:
            with autocast_context(precision, device):
                try:
                    item = next(steps)
                except StopIteration:
                    return
            yield item
    finally:
        close = getattr(steps, "close", None)  # a generator: let it finish as when iterated directly
        if close is not None:
            close()


def _sum_gradients_over_processes(parameters: list[torch.Tensor], group: ProcessGroup) -> None:
    """Replace each parameter's gradient by its sum over the processes (one collective; a missing
    gradient counts as zeros)."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in parameters]
    summed = all_reduce_sum(group, torch.cat([grad.reshape(-1) for grad in grads]))
    for parameter, chunk in zip(parameters, summed.split([grad.numel() for grad in grads])):
        parameter.grad = chunk.view_as(parameter).to(parameter.dtype)


def run_iteration(method: Method, terms: list[RegularizerTerm], context: DistillContext,
                  optimizer: torch.optim.Optimizer, average: ImageAverage | None = None,
                  split: ProcessSplit | None = None, precision: str = "fp32") -> dict[str, float]:
    """One iteration: for every matching loss the method yields, add the active regularizers and
    update the images (and the method's learned tensors). For a :class:`ClassUpdate` the regularizers
    see that class's images only. Returns each loss term averaged over the iteration's updates.

    In a run split by class (``context.classes`` set) the method's loss and each regularizer's
    :meth:`~infodistill.regularizers.Regularizer.class_share` cover this process's classes. In a run split
    by trajectory (``split.replicated``) the method's loss covers this process's trajectories, the
    regularizers are computed by rank 0 alone on the whole set, and the gradients are summed over the
    processes before the step. The logged terms, and the divergence check, are sums over the processes.

    ``precision``: the method's and the regularizers' forward passes run in it (``docs/precision.md``);
    every loss term is float32 before it is weighted, summed and logged, and the backward pass and the
    optimiser step run outside autocast on the float32 tensors."""
    synthetic = context.synthetic
    group = split.group if split is not None else SINGLE_PROCESS
    replicated = split is not None and split.replicated
    classes = getattr(context, "classes", None)  # a minimal context (tests) need not carry it
    device = getattr(context, "device", torch.device("cpu"))  # nor its device
    learned = [p for param_group in optimizer.param_groups for p in param_group["params"]]
    sums: dict[str, float] = {}
    updates = 0
    non_finite: str | None = None  # in a split run: how this process's first non-finite update is reported
    for step in computed_in(precision, device, method.iteration(context)):
        matching, label = (step.loss, step.label) if isinstance(step, ClassUpdate) else (step, None)
        active = [term for term in terms if term.active(context.iteration)]
        if matching is None:  # another process's class update (a run split by class): its draws, a zero step
            _add_update(sums, _skipped_update(method, active, context), context.iteration, group)
            for parameter in learned:
                parameter.grad = torch.zeros_like(parameter)
            reason = _step(optimizer, method, synthetic, average, context.iteration, group)
            non_finite = non_finite or reason
            updates += 1
            continue
        matching = to_fp32(matching)
        values = {f"loss/{method.name}": matching}
        total = matching
        if active:
            images, labels = _regularized_images(synthetic, label, classes)
            for term in active:
                if replicated and not is_main(group):  # rank 0 adds the term for the whole set
                    values[f"loss/{term.name}"] = torch.zeros((), device=matching.device)
                    continue
                with autocast_context(precision, device):
                    if classes is None or label is not None:
                        value = term.regularizer.loss(images, labels, context.generator)
                    else:
                        value = term.regularizer.class_share(images, labels, context.generator,
                                                             len(synthetic.labels), synthetic.num_classes)
                value = to_fp32(value)
                values[f"loss/{term.name}"] = value
                total = total + term.weight * value
        values["loss/total"] = total
        _add_update(sums, values, context.iteration, group)
        optimizer.zero_grad(set_to_none=True)
        total.backward(inputs=learned)  # only the set and the method's tensors learn; networks stay untouched
        if replicated:
            _sum_gradients_over_processes(learned, group)
        reason = _step(optimizer, method, synthetic, average, context.iteration, group)
        non_finite = non_finite or reason
        updates += 1
    if group.distributed:  # one exchange per iteration, so that no process waits for another at every update
        exchanged = {name: torch.tensor(value, dtype=torch.float64) for name, value in sums.items()}
        exchanged[_NON_FINITE_PROCESSES] = torch.tensor(float(non_finite is not None), dtype=torch.float64)
        sums = _summed_over_processes(exchanged, group)
        _check_finite(sums["loss/total"], context.iteration)
        if sums.pop(_NON_FINITE_PROCESSES) > 0:  # every process stops here together, none writes the state
            raise LossDiverged(non_finite or f"an update of iteration {context.iteration} made the tensors of "
                               "another process non-finite")
    return {name: value / max(updates, 1) for name, value in sums.items()}


def _add_update(sums: dict[str, float], values: dict[str, torch.Tensor], iteration: int, group: ProcessGroup) -> None:
    """Add one update's loss terms to ``sums``. In one process a NaN or infinite total stops the run at once;
    in several, each process holds only its part, and the total is checked once their sums are exchanged at
    the end of the iteration (every process then stops together; the last good checkpoint is kept either way)."""
    for name, value in values.items():
        sums[name] = sums.get(name, 0.0) + float(value.detach())
    if not group.distributed:
        _check_finite(sums["loss/total"], iteration)


def _check_finite(total: float, iteration: int) -> None:
    if not math.isfinite(total):
        raise LossDiverged(f"the loss became {total} at iteration {iteration}")


def _skipped_update(method: Method, active: list[RegularizerTerm], context: DistillContext) -> dict[str, torch.Tensor]:
    """For a class update another process computes: make the active regularizers' random draws, and give
    zero for every loss term (the owner's terms make up the sums over the processes)."""
    for term in active:
        term.regularizer.skip_draws(context.generator)
    zero = torch.zeros((), device=getattr(context, "device", torch.device("cpu")))
    return {f"loss/{method.name}": zero, **{f"loss/{term.name}": zero for term in active}, "loss/total": zero}


_NON_FINITE_PROCESSES = "processes/non_finite"
"""The entry of a split run's end-of-iteration exchange that counts the processes whose tensors became non-finite."""


def _step(optimizer: torch.optim.Optimizer, method: Method, synthetic: SyntheticSet, average: ImageAverage | None,
          iteration: int = 0, group: ProcessGroup = SINGLE_PROCESS) -> str | None:
    """The optimiser step, the method's projection and the image average's update, after every image update.

    Then every stepped tensor (the set's, a learned lr, soft-label logits, projection heads) must be finite:
    in one process a non-finite one stops the run at once (:class:`LossDiverged`), before anything of this
    state can reach a checkpoint or the artefact. In a split run the process returns the reason instead, and
    :func:`run_iteration` stops every process together after the iteration's one exchange. Returns None when
    all is finite. The check only reads the tensors, so a finite run computes exactly as without it."""
    optimizer.step()
    with torch.no_grad():
        method.project(synthetic)
    if average is not None:
        average.update(synthetic)
    bad = _non_finite_tensor(optimizer)
    if bad is None:
        return None
    reason = f"the update at iteration {iteration} made '{bad}' non-finite"
    if not group.distributed:
        raise LossDiverged(reason)
    return reason


def _non_finite_tensor(optimizer: torch.optim.Optimizer) -> str | None:
    """The checkpoint name (``<group name>.<position>``) of the first tensor the optimiser steps that holds a NaN
    or an infinity, else None (one device synchronisation for all of them). A group without a name (an optimiser
    built outside the loop) is named by its index."""
    named = [(f"{group.get('name', index)}.{position}", parameter)
             for index, group in enumerate(optimizer.param_groups)
             for position, parameter in enumerate(group["params"])]
    with torch.no_grad():
        finite = torch.stack([torch.isfinite(tensor).all() for _, tensor in named]).cpu()
    if bool(finite.all()):
        return None
    return next(name for (name, _), ok in zip(named, finite.tolist()) if not ok)


def _learned_groups(optimizer: torch.optim.Optimizer) -> Iterator[tuple[str, torch.Tensor]]:
    """(checkpoint name, tensor) of everything the optimiser steps: ``<group name>.<position>``."""
    for group in optimizer.param_groups:
        for position, parameter in enumerate(group["params"]):
            yield f"{group['name']}.{position}", parameter


def _checkpoint_tensors(synthetic: SyntheticSet, optimizer: torch.optim.Optimizer,
                        average: ImageAverage | None, split: ProcessSplit | None = None) -> dict[str, torch.Tensor]:
    """Everything a checkpoint holds; in a split run the set's tensors (and their optimiser state and
    average) are gathered whole from the processes that step each class (every process calls this)."""
    parameters = dict(synthetic.named_parameters())

    def whole(tensor: torch.Tensor) -> torch.Tensor:
        return tensor if split is None else split.gather(synthetic, tensor)

    tensors = {f"synthetic.{name}": (whole(value) if name in parameters else value).detach().cpu().contiguous()
               for name, value in synthetic.state_dict().items()}
    for name, parameter in _learned_groups(optimizer):
        in_set = name.startswith("synthetic.")
        if not in_set:
            tensors[f"learned.{name}"] = parameter.detach().cpu().contiguous()
        for key, value in optimizer.state.get(parameter, {}).items():
            if torch.is_tensor(value):
                value = whole(value) if in_set and value.shape == parameter.shape else value
                tensors[f"{_STATE_PREFIXES.get(key, 'optimizer.' + key)}.{name}"] = value.detach().cpu().contiguous()
    if average is not None:
        tensors.update({f"average.{name}": whole(value).cpu().contiguous() for name, value in average.shadow.items()})
    return tensors


def _stateful(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer`` keeps state between steps that a checkpoint must carry (SGD with momentum, Adam)."""
    if isinstance(optimizer, torch.optim.SGD):
        return any(group.get("momentum", 0) for group in optimizer.param_groups)
    return isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW))


_STATE_PREFIXES = {"momentum_buffer": "momentum"}
"""Checkpoint prefix of an optimiser state entry (SGD's momentum; Adam's moments go under ``optimizer.<key>``)."""


def save_checkpoint(files: RunFiles, synthetic: SyntheticSet, optimizer: torch.optim.Optimizer,
                    iteration: int, config: DistillConfig, weights: dict[str, float],
                    average: ImageAverage | None = None, split: ProcessSplit | None = None,
                    calibration: dict[str, float] | None = None) -> None:
    """Write the state after ``iteration`` completed iterations, atomically. In a split run every process
    calls this (the state is gathered) and rank 0 alone writes the file. ``calibration``: how 'auto' chose
    the CMI weight (:class:`CMICalibration`), kept so the artefact of a resumed run records it too."""
    tensors = _checkpoint_tensors(synthetic, optimizer, average, split)
    if split is not None and not is_main(split.group):
        return
    metadata = {"iteration": str(iteration), "config": json.dumps(dataclasses.asdict(config)),
                "regularizer_weights": json.dumps(weights), "version": __version__,
                "average_count": str(average.count if average is not None else 0),
                "processes": str(split.group.world_size if split is not None else 1)}
    if calibration is not None:
        metadata["cmi_calibration"] = json.dumps(calibration)
    with atomic_path(files.checkpoint) as temporary:
        save_file(tensors, str(temporary), metadata=metadata)


def load_checkpoint(files: RunFiles, synthetic: SyntheticSet, optimizer: torch.optim.Optimizer,
                    config: DistillConfig, average: ImageAverage | None = None,
                    processes: int = 1) -> tuple[int, dict[str, float], dict[str, float] | None]:
    """Restore a checkpoint into ``synthetic``, the optimiser's tensors and momentum, and the image
    average; return (iteration, regularizer weights, the CMI weight's calibration or None). A checkpoint
    holds the whole set, so a run may resume with another number of ``processes``, unless its method says otherwise
    (``Method.resumable_with_other_process_count``)."""
    path = files.checkpoint
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        iteration = int(metadata["iteration"])
        stored = json.loads(metadata["config"])
        weights = json.loads(metadata["regularizer_weights"])
        average_count = int(metadata.get("average_count", "0"))
        written_by = int(metadata.get("processes", "1"))
        calibration = json.loads(metadata["cmi_calibration"]) if "cmi_calibration" in metadata else None
    except (SafetensorError, OSError, ValueError, KeyError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise UserInputError(
            f"checkpoint '{path}' cannot be read ({reason}); it is corrupt or not a checkpoint"
        ) from None
    current = dataclasses.asdict(config)
    current["precision"] = run_precision(config, resolve_device(config.device))
    stored = {**{key: value for key, value in SETTINGS_OF_OLDER_RUNS.items() if key in current}, **stored}
    for key, value in stored.items():
        if key not in RESUMABLE_CHANGES and current.get(key) != value:
            raise UserInputError(
                f"cannot resume '{files.root}': {key} was {value!r} in the run but is {current.get(key)!r} now"
            )
    if written_by != processes and not method_class(config.method).resumable_with_other_process_count:
        raise UserInputError(f"cannot resume '{files.root}' in {processes} process(es): method '{config.method}' "
                             f"must resume with the {written_by} process(es) that wrote the checkpoint")
    if iteration > 0 and _stateful(optimizer) and not any(
            name.startswith(("momentum.", "optimizer.")) for name in tensors):
        raise UserInputError(f"checkpoint '{path}' holds no optimiser state (momentum or moments) after {iteration} "
                             "iterations; resuming from it would not continue the run exactly: run afresh")
    state = {name[len("synthetic."):]: value for name, value in tensors.items() if name.startswith("synthetic.")}
    try:
        synthetic.load_state_dict(state, strict=True)
        with torch.no_grad():
            for name, parameter in _learned_groups(optimizer):
                if not name.startswith("synthetic."):
                    parameter.copy_(tensors[f"learned.{name}"])
                for key in ("momentum_buffer", "exp_avg", "exp_avg_sq", "step"):
                    stored = tensors.get(f"{_STATE_PREFIXES.get(key, 'optimizer.' + key)}.{name}")
                    if stored is not None:
                        optimizer.state[parameter][key] = stored.to(parameter.device if key != "step" else "cpu")
            if average is not None:
                for name, shadow in average.shadow.items():
                    shadow.copy_(tensors[f"average.{name}"])
                average.count = average_count
    except (RuntimeError, KeyError) as error:
        raise UserInputError(f"checkpoint '{path}' does not fit this run: {str(error).splitlines()[0]}") from None
    if iteration > (config.iterations or 0):
        raise UserInputError(f"checkpoint '{path}' is at iteration {iteration}, past the requested {config.iterations}")
    return iteration, weights, calibration


class MetricsLog:
    """Per-iteration loss terms to ``metrics.jsonl`` (truncated to the checkpoint on resume) and TensorBoard."""

    def __init__(self, files: RunFiles, start_iteration: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.path = files.metrics
        if start_iteration > 0 and self.path.exists():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("iteration", 0) < start_iteration]
            with atomic_path(self.path) as temporary:
                temporary.write_text("".join(line + "\n" for line in kept))
        elif start_iteration == 0:
            self.path.write_text("")
        self.handle = self.path.open("a")
        self.writer = SummaryWriter(str(files.tensorboard), purge_step=start_iteration if start_iteration else None)

    def write(self, iteration: int, values: dict[str, Any]) -> None:
        """One line of ``metrics.jsonl``; the scalar values also to TensorBoard (lists, e.g. the accuracy of
        every evaluation run, only to the JSON lines)."""
        self.handle.write(json.dumps({"iteration": iteration, **values}) + "\n")
        self.handle.flush()
        for name, value in values.items():
            if isinstance(value, (int, float)):
                self.writer.add_scalar(name, value, iteration)

    def close(self) -> None:
        self.handle.close()
        self.writer.close()


def _set_metadata(config: DistillConfig, real: RealData, weights: dict[str, float], iterations: int,
                  synthetic: SyntheticSet, method: Method) -> SetMetadata:
    extra = {"model": config.model, "augment": str(config.augment), "init": str(config.init),
             "storage_floats": str(synthetic.storage_floats()), "budget_floats": str(synthetic.budget_floats()),
             **method.artefact_metadata()}
    if config.param == "multi":
        extra.update({"factor": str(config.factor), "upsample": config.upsample})
    if config.param == "lowrank":
        extra["rank"] = str(config.rank)
    if config.zca > 0:
        extra["zca"] = repr(config.zca)
    if config.experts is not None:
        extra["experts"] = str(config.experts)
    if config.ema_decay:
        extra["ema_decay"] = repr(config.ema_decay)
    if config.precision != "fp32":  # fp32 artefacts stay as they were before the setting existed
        extra["precision"] = config.precision
    for name in weights:  # each regularizer that was on records its own settings
        extra.update(REGULARIZER_REGISTRY[name].artefact_metadata(config))
    return SetMetadata(dataset=real.info.name, mean=tuple(real.info.mean), std=tuple(real.info.std),
                       classes=tuple(real.info.class_names), method=config.method, ipc=config.ipc, seed=config.seed,
                       parameterisation=str(config.param), regularizers=weights, iterations=iterations, extra=extra)


def _whole_stored(
    synthetic: SyntheticSet, average: ImageAverage | None, split: ProcessSplit
) -> dict[str, torch.Tensor]:
    """The set's (averaged) stored tensors gathered whole from the processes of a split run (a collective)."""
    source = average.shadow if average is not None else dict(synthetic.named_parameters())
    return {name: split.gather(synthetic, value) for name, value in source.items()}


def _current_images(synthetic: SyntheticSet, average: ImageAverage | None, split: ProcessSplit | None) -> torch.Tensor:
    """The decoded (averaged) images of the whole set; gathered in a split run (every process calls this)."""
    with torch.no_grad():
        if split is not None:
            return torch.func.functional_call(synthetic, _whole_stored(synthetic, average, split), ())
        return average.images(synthetic) if average is not None else synthetic.images()


def _distilled_set(synthetic: SyntheticSet, method: Method, average: ImageAverage | None, config: DistillConfig,
                   real: RealData, weights: dict[str, float], iterations: int,
                   split: ProcessSplit | None = None) -> DistilledSet:
    """The current state as an artefact: decoded (averaged) images, labels, the method's tensors. In a
    split run every process calls this (the set is gathered)."""
    with torch.no_grad():
        if split is None:
            images = average.images(synthetic) if average is not None else synthetic.images()
            stored = average.shadow if average is not None else synthetic.stored_tensors()
        else:
            split.refresh(synthetic)  # the method's tensors (SRe2L's soft labels) read the whole current set
            stored = _whole_stored(synthetic, average, split) if average is not None else \
                dict(synthetic.named_parameters())
            images = torch.func.functional_call(synthetic, stored, ())
        stored = {name: stored[name].detach().cpu().float().clone() for name in synthetic.stored_tensors()}
    extras = {name: value.detach().cpu().float().clone() for name, value in method.artefact_tensors().items()}
    return DistilledSet(images=images.detach().cpu().float().contiguous(), labels=synthetic.labels.cpu().clone(),
                        soft_labels=extras.get("soft_labels"), lr=extras.get("lr"), stored=stored,
                        metadata=_set_metadata(config, real, weights, iterations, synthetic, method))


@dataclass
class RunParts:
    """What a run steps: the synthetic set, the method, one optimiser over the set and the method's learned
    tensors, the image average (or None), and the augmentation (or None)."""

    synthetic: SyntheticSet
    method: Method
    optimizer: torch.optim.Optimizer
    average: ImageAverage | None
    augment: DSA | None


def build_run_parts(config: DistillConfig, real: RealData, sampler: ClassSampler, device: torch.device,
                    fresh: bool = True, cache: LoadCache | None = None,
                    image_positions: tuple[int, ...] | None = None) -> RunParts:
    """Initialise the synthetic set, build and prepare the method, and the optimiser over both, from
    ``config`` with its method defaults filled (the loop and the benchmarks share this).
    ``image_positions``: this process's share in a run split by image (what the method prepares)."""
    assert config.param is not None and config.init is not None and config.lr_images is not None  # defaults filled
    init_generator = torch.Generator().manual_seed(stream_seed(config.seed, INIT_STREAM))
    synthetic = build_synthetic(config.param, sampler, config.ipc, config.init, init_generator,
                                factor=config.factor, upsample=config.upsample, rank=config.rank).to(device)
    method = build_method(config)
    setup_generator = torch.Generator().manual_seed(stream_seed(config.seed, SETUP_STREAM))
    method.prepare(MethodSetup(synthetic=synthetic, sampler=sampler, info=real.info, device=device,
                               model_name=config.model, generator=setup_generator, fresh=fresh, init=config.init,
                               cache=cache, image_positions=image_positions))
    groups = [{"params": list(synthetic.parameters()), "name": "synthetic"}, *method.parameter_groups()]
    if config.optimizer == "adam":
        betas = method_class(config.method).defaults(config.ipc).betas
        optimizer: torch.optim.Optimizer = torch.optim.Adam(groups, lr=config.lr_images, betas=betas)
    else:
        assert config.momentum_images is not None  # with_method_defaults() fills it
        optimizer = torch.optim.SGD(groups, lr=config.lr_images, momentum=config.momentum_images)
    for group in optimizer.param_groups:
        group["base_lr"] = group["lr"]
    average = ImageAverage(synthetic, config.ema_decay) if config.ema_decay else None
    return RunParts(synthetic, method, optimizer, average, DSA() if config.augment else None)


def run_precision(config: DistillConfig, device: torch.device | str) -> str:
    """The precision a run of ``config`` computes in on ``device``: 'auto' resolved for its method."""
    return resolve_precision(config.precision, device, method_class(config.method).bf16_measured)


RUN_FILE_ATTRIBUTES = ("config", "metrics", "checkpoint", "artefact")
"""The files of a run directory that a fresh run writes, overwriting what is there."""


def check_out_dir(files: RunFiles, resume: bool, config: DistillConfig | None = None,
                  locked_by_me: bool = False) -> None:
    """Refuse, in one line, a run directory this run cannot use (reads only): one that is a file, one another
    run holds (its lock; skipped with ``locked_by_me``), one to resume that has no checkpoint, and for a fresh run
    one holding a run (checkpoint or artefact) or other files it would overwrite (``config.yaml``,
    ``metrics.jsonl``). The exception: the ``config.yaml`` and ``metrics.jsonl`` of this same ``config`` with no
    checkpoint yet, which a run interrupted before its first checkpoint left (a sweep or continual run restarts
    such a cell afresh)."""
    if files.root.exists() and not files.root.is_dir():
        raise UserInputError(f"--out '{files.root}' exists and is not a directory; choose another --out")
    in_use = None if locked_by_me else directory_in_use(files.root)
    if in_use is not None:
        raise UserInputError(in_use)
    if resume:
        if not files.checkpoint.exists():
            raise UserInputError(f"cannot resume: '{files.checkpoint}' does not exist (run without --resume first)")
        return
    present = [getattr(files, name) for name in RUN_FILE_ATTRIBUTES if getattr(files, name).exists()]
    names = ", ".join(path.name for path in present)
    if files.checkpoint.exists() or files.artefact.exists():
        raise UserInputError(f"'{files.root}' already holds a run ({names}); pass --resume to continue it, or choose "
                             "another --out")
    if present and not _interrupted_run_of(files, config):
        raise UserInputError(f"'{files.root}' already holds {names}, which a new run would overwrite; choose another "
                             "--out, or move them away")


def _interrupted_run_of(files: RunFiles, config: DistillConfig | None) -> bool:
    """Whether ``files.config`` is the config.yaml of ``config`` (up to the settings a resumed run may change
    and the resolved precision): the leftovers of this run, interrupted before its first checkpoint."""
    if config is None or not files.config.is_file():
        return False
    try:
        stored = yaml.safe_load(files.config.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return False
    if not isinstance(stored, dict):
        return False
    ignored = {*RESUMABLE_CHANGES, "precision", "resolved_weights", "cmi_calibration"}
    current = dataclasses.asdict(config.with_method_defaults())
    return ({key: value for key, value in stored.items() if key not in ignored} ==
            {key: value for key, value in current.items() if key not in ignored})


@contextlib.contextmanager
def _held_run_directory(files: RunFiles, resume: bool, config: DistillConfig,
                        group: ProcessGroup) -> Iterator[None]:
    """Hold the run directory for the block: rank 0 checks it (:func:`check_out_dir`), takes its lock
    (:func:`~infodistill.files.directory_lock`) and checks it again under the lock; in a split run every process
    learns the outcome (one exchange), so all start, or all refuse with rank 0's line."""
    with contextlib.ExitStack() as stack:
        refusal = None
        if is_main(group):
            try:
                check_out_dir(files, resume, config)  # before the lock creates the directory
                stack.enter_context(directory_lock(files.root))
                check_out_dir(files, resume, config, locked_by_me=True)
            except UserInputError as error:
                stack.close()
                refusal = str(error)
            except OSError as error:  # e.g. a folder that cannot be created
                stack.close()
                refusal = f"cannot use --out '{files.root}': {error.strerror or error}"
        if group.distributed:
            refusal = next((line for line in all_gather_objects(group, refusal) if line is not None), None)
        if refusal is not None:
            raise UserInputError(refusal)
        yield


def distill(config: DistillConfig, out_dir: str | Path, resume: bool = False, progress: bool = True,
            real: RealData | None = None, cache: LoadCache | None = None,
            group: ProcessGroup = SINGLE_PROCESS) -> DistillResult:
    """Run (or resume) a distillation and write its artefact, config and metrics into ``out_dir``.

    ``real`` (the loaded dataset) and ``cache`` (pools and trajectories already read) let several runs
    in one process share what they read; the result is the same as reading it afresh.

    ``group``: this process's place in a run over several processes (every process calls ``distill``
    with the same arguments). The work is then divided between the processes as the method says
    (:class:`ProcessSplit`, ``docs/distributed.md``): by class, by image position or by trajectory;
    rank 0 gathers the whole set and alone writes files. The artefact is the one a single process writes
    (for trajectories: up to the order of the gradient sum)."""
    started = time.perf_counter()
    config.validate()
    config = config.with_method_defaults()
    files = RunFiles(out_dir)
    with _held_run_directory(files, resume, config, group):
        return _distill_in(config, files, resume, progress, real, cache, group, started)


def _distill_in(config: DistillConfig, files: RunFiles, resume: bool, progress: bool, real: RealData | None,
                cache: LoadCache | None, group: ProcessGroup, started: float) -> DistillResult:
    """:func:`distill` in its run directory, which this run holds (rank 0 has its lock)."""
    device = rank_device(group, resolve_device(config.device))
    # 'auto' is fixed here, so config.yaml and the checkpoint record what the run computes in.
    config = dataclasses.replace(config, precision=run_precision(config, device))
    writer = is_main(group)
    real = real if real is not None else load_dataset(config.dataset, data_root=config.data_root)
    if config.zca > 0:
        real = whiten(real, config.zca)  # every tensor the run sees, and the artefact, are in whitened space
    split = None
    if group.distributed:
        kind, per_rank = plan_split(config, group.world_size, real.info.num_classes)
        split = ProcessSplit(group, kind, tuple(tuple(share) for share in per_rank))
    train_images, train_labels = real.train_tensors()
    sampler = ClassSampler(train_images.to(device), train_labels.to(device), real.info.num_classes)
    if config.ipc > sampler.smallest_class_size():
        raise UserInputError(
            f"ipc {config.ipc} is above the smallest class size {sampler.smallest_class_size()} of '{real.info.name}'"
        )

    parts = build_run_parts(config, real, sampler, device, fresh=not resume, cache=cache,
                            image_positions=split.mine if split is not None and split.kind == "images" else None)
    synthetic, method, optimizer, average, augment = (parts.synthetic, parts.method, parts.optimizer, parts.average,
                                                      parts.augment)
    if split is not None and not split.replicated and len(optimizer.param_groups) > 1:
        # plan_split has checked the parameterisation; tensors learned beside the set are not split by row
        raise UserInputError(f"method '{config.method}' learns tensors beside the set, which a run split by "
                             f"{split.kind} cannot divide; run it in one process")

    terms: list[RegularizerTerm] = []
    pool_regularizer = None
    pool = None
    if config.proxies is not None:
        pool = load_proxy_pool(config.proxies, real.info, device=str(device), cache=cache)
    if config.uses_cmi:
        assert pool is not None  # validate() refuses a CMI weight without --proxies
        pool_regularizer = CMIRegularizer(pool, proxies_per_step=config.cmi_proxies_per_step)
        if config.ipc == 1 and config.param == "pixels" and writer:
            log.warning("CMI is identically 0 at ipc 1 with pixel images: each class has one image, so its "
                        "centroid equals that image's output; the term will do nothing")

    if config.mim_weight > 0:
        terms.append(build_mim_term(config, sampler, real, device, optimizer, pool))

    held_out = None
    if config.held_out_proxies is not None:
        held_out = load_proxy_pool(config.held_out_proxies, real.info, device=str(device), cache=cache)
        check_held_out(pool, held_out)

    start, calibrated = 0, None
    weights: dict[str, float] = {}
    if writer:
        files.root.mkdir(parents=True, exist_ok=True)
    if resume:
        start, weights, calibrated = load_checkpoint(files, synthetic, optimizer, config, average,
                                                     processes=group.world_size)
    elif pool_regularizer is not None:
        if config.cmi_weight == "auto":
            # The first losses over every class, computed whole by every process (no split): the same
            # numbers, bit for bit, as in a one-process run.
            contexts = [make_context(config, draw, synthetic, sampler, real, augment, device, CALIBRATION_STREAM)
                        for draw in range(CALIBRATION_DRAWS)]
            calibration = calibrate_cmi_weight(method, pool_regularizer, contexts,
                                               cmi_target_ratio(config.method, config.ipc),
                                               config.cmi_auto_scale, config.precision)
            weights = {"cmi": calibration.weight}
            calibrated = calibration.to_dict()
            if writer:
                log.info("cmi_weight auto: lambda = %.6g (gradient ratio %.3g on the initial set)",
                         calibration.weight, calibration.ratio)
        else:
            assert config.cmi_weight is not None  # uses_cmi: a number here
            weights = {"cmi": float(config.cmi_weight)}
    if pool_regularizer is not None:
        terms.append(RegularizerTerm("cmi", pool_regularizer, weights["cmi"], config.cmi_every))
    weights.update({term.name: term.weight for term in terms if term.name != "cmi"})
    if writer:
        with atomic_path(files.config) as temporary:
            temporary.write_text(yaml.safe_dump({**dataclasses.asdict(config), "resolved_weights": weights,
                                                 **({"cmi_calibration": calibrated} if calibrated else {})},
                                                sort_keys=False))

    assert config.iterations is not None and config.lr_schedule is not None  # with_method_defaults() fills them
    metrics = MetricsLog(files, start) if writer else None
    bar = tqdm(range(start, config.iterations), initial=start, total=config.iterations,
               disable=not (progress and writer),
               desc=f"distill {config.method}" + (" + cmi" if terms else "")
               + (f" x{group.world_size} processes" if split is not None else ""), unit="it")
    last_good = start
    try:
        for iteration in bar:
            context = make_context(config, iteration, synthetic, sampler, real, augment, device, split=split)
            factor = schedule_factor(config.lr_schedule, iteration, config.iterations)
            for param_group in optimizer.param_groups:
                param_group["lr"] = param_group["base_lr"] * factor
            try:
                logged: dict[str, Any] = run_iteration(method, terms, context, optimizer, average, split,
                                                       config.precision)
            except LossDiverged as diverged:
                kept = (f"the last good checkpoint (iteration {last_good}) is kept in '{files.checkpoint}'"
                        if files.checkpoint.exists() else "no checkpoint was written yet")
                raise LossDiverged(f"{diverged}; stopped; {kept}") from None
            done = iteration + 1
            if config.eval_every and done % config.eval_every == 0:
                snapshot = _distilled_set(synthetic, method, average, config, real, weights, done, split)
                if writer:  # rank 0 evaluates; the others wait for it at their next collective
                    evaluated = _evaluate_now(snapshot, real, config, device)
                    logged["eval/accuracy"] = evaluated.mean
                    logged["eval/accuracies"] = evaluated.accuracies
            if pool is not None and config.monitor_every and (done % config.monitor_every == 0 or
                                                              done == config.iterations):
                for key, monitor_pool in (("monitor/cmi", pool), ("monitor/cmi_heldout", held_out)):
                    if monitor_pool is None or not monitor_pool.pooled:
                        continue
                    monitored = _monitored_cmi(monitor_pool, synthetic, average, real.info.num_classes, split)
                    if monitored is not None:
                        logged[key] = monitored
            if metrics is not None:
                metrics.write(iteration, logged)
            bar.set_postfix({name.split("/")[-1]: f"{value:.4g}" for name, value in logged.items()
                             if isinstance(value, float)})
            if done % config.checkpoint_every == 0 or done == config.iterations:
                save_checkpoint(files, synthetic, optimizer, done, config, weights, average, split, calibrated)
                last_good = done
    finally:
        if metrics is not None:
            metrics.close()
        bar.close()

    distilled = _distilled_set(synthetic, method, average, config, real, weights, config.iterations, split)
    if calibrated is not None:
        extra = {**distilled.metadata.extra, "cmi_calibration": json.dumps(calibrated)}
        distilled = dataclasses.replace(distilled, metadata=dataclasses.replace(distilled.metadata, extra=extra))
    _check_finite_set(distilled, files)
    if writer:
        save_set(distilled, files.artefact)
    return DistillResult(out_dir=files.root, artefact=files.artefact, config=config, regularizer_weights=weights,
                         iterations=config.iterations, seconds=time.perf_counter() - started)


def _check_finite_set(distilled: DistilledSet, files: RunFiles) -> None:
    """Stop (:class:`LossDiverged`) rather than write an artefact holding a NaN or an infinity: every stepped
    tensor was finite, but decoding them (a low-rank product, an average) can still overflow."""
    for name in ("images", "soft_labels", "lr"):
        tensor = getattr(distilled, name)
        if tensor is not None and not bool(torch.isfinite(tensor).all()):
            kept = f"'{files.checkpoint}' is kept" if files.checkpoint.exists() else "no checkpoint was written"
            raise LossDiverged(f"the set's {name} are not finite after {distilled.metadata.iterations} iterations; "
                               f"the artefact was not written; {kept}")


def build_mim_term(config: DistillConfig, sampler: ClassSampler, real: RealData, device: torch.device,
              optimizer: torch.optim.Optimizer, pool: Any) -> RegularizerTerm:
    """The MIM4DD term, its projection heads added to the optimiser. Features come from a proxy of the pool
    when the run has one (trained, fixed features), else from a fresh network of the run's architecture."""
    from infodistill.models import build_model
    from infodistill.regularizers.mim import MIMRegularizer

    if pool is not None:

        def network_factory(generator: torch.Generator) -> torch.nn.Module:
            return pool.sample(generator)
    else:
        info = real.info

        def network_factory(generator: torch.Generator) -> torch.nn.Module:
            seed = int(torch.randint(0, 2**62, (1,), generator=generator))
            return build_model(config.model, channels=info.channels, num_classes=info.num_classes,
                               image_size=info.image_size, seed=seed).to(device)

    init_generator = torch.Generator().manual_seed(stream_seed(config.seed, MIM_STREAM))
    mim = MIMRegularizer(sampler, network_factory, real_per_class=config.mim_real_per_class,
                         temperature=config.mim_temperature, layers=config.mim_layers, init_generator=init_generator)
    for parameter in mim.parameters():
        parameter.data = parameter.data.to(device)
    optimizer.add_param_group({"params": list(mim.parameters()), "name": "mim", "lr": config.mim_lr,
                               "base_lr": config.mim_lr})
    return RegularizerTerm("mim", mim, config.mim_weight)


def _monitored_cmi(pool: ProxyPool, synthetic: SyntheticSet, average: ImageAverage | None, num_classes: int,
                   split: ProcessSplit | None = None) -> float | None:
    """The set's CMI under the whole pool (mean over proxies): logged for runs with and without the term.
    In a split run every process calls this; rank 0 computes it, the others get None."""
    images = _current_images(synthetic, average, split)
    if split is not None and not is_main(split.group):
        return None
    with torch.no_grad():
        return float(pool_cmi(pool, images.detach(), synthetic.labels, num_classes).mean())


def _evaluate_now(snapshot: DistilledSet, real: RealData, config: DistillConfig,
                  device: torch.device | None = None) -> EvalResult:
    """The current set under the evaluation protocol (periodic evaluation), each run's accuracy. The runs'
    seeds derive from the run seed alone, so two runs of one seed (with and without a term) are scored
    with the same evaluation seeds: a paired comparison."""
    eval_config = EvalConfig(model=config.eval_model, epochs=config.eval_epochs, runs=config.eval_runs,
                             seed=config.seed, device=str(device) if device is not None else config.device)
    return evaluate_set(snapshot, real, eval_config, progress=False)


def check_held_out(pool: ProxyPool | None, held_out: ProxyPool) -> None:
    """Refuse a held-out pool that is not disjoint from the optimised one (a proxy file with the same
    content, or the same training seed and architecture), or that cannot measure the CMI (unpooled)."""
    held_out.require_pooled("the held-out CMI")
    if pool is None:
        return
    optimised = {_file_digest(record.path): record for record in pool.records if record.path is not None}
    for record in held_out.records:
        if record.path is None:
            continue
        twin, same = optimised.get(_file_digest(record.path)), "file"
        if twin is None and held_out.arch == pool.arch:
            twin, same = next((other for other in pool.records if other.seed == record.seed), None), "training seed"
        if twin is not None:
            raise UserInputError(f"the held-out pool shares a proxy with the optimised pool: {record.path} is the "
                                 f"proxy of {twin.path} (same {same}); build the held-out proxies with another --seed")


def _file_digest(path: Path) -> str:
    import hashlib

    return hashlib.sha256(Path(path).read_bytes()).hexdigest()
