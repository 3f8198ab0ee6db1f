"""What a distillation method is: an object that yields matching losses for the shared loop.

The loop (``infodistill.loop``) owns the image optimiser, the regularizers, checkpoints and logs.
A method only says how to compute its matching loss. One iteration may update the images several
times (gradient matching has an outer loop, with network training in between), so a method's
:meth:`Method.iteration` is a generator: it yields one loss per image update; the loop adds the
regularizers, steps the image optimiser, and resumes the generator.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from infodistill.augment import DSA
from infodistill.data import ClassSampler, DatasetInfo
from infodistill.models.norm import BATCH_NORM_TYPES
from infodistill.registry import Registry
from infodistill.seeds import stream_generator
from infodistill.settings import AT_LEAST_ONE, setting

if TYPE_CHECKING:
    from infodistill.models import DistillModel
    from infodistill.trained import LoadCache
from infodistill.synthetic import SyntheticSet

CLASS_DRAWS, POSITION_DRAWS, REGULARIZER_DRAWS = 1_000_001, 1_000_002, 1_000_003
"""Kinds of unit streams (:meth:`DistillContext.unit_generator`); trajectory k uses index k alone, far below."""


@dataclass
class DistillContext:
    """Everything a method may read during one iteration.

    ``generator`` is this iteration's own random stream, derived from the run seed and the
    iteration number, so an interrupted run that resumes at iteration k draws exactly what an
    uninterrupted one drew. ``augment`` is the siamese DSA, or None when augmentation is off.
    """

    iteration: int
    generator: torch.Generator
    synthetic: SyntheticSet
    sampler: ClassSampler
    info: DatasetInfo
    augment: DSA | None
    device: torch.device
    model_name: str
    classes: tuple[int, ...] | None = None
    """The classes whose losses this process computes (a run split by class over processes, see
    ``docs/distributed.md``); None: every class. Only methods with ``process_split = "classes"`` see a subset."""
    image_positions: tuple[int, ...] | None = None
    """The positions j (0..ipc-1) whose images this process computes, the j-th image of every class (a run
    split by image); None: every position. Only methods with ``process_split = "images"`` see a subset."""
    trajectories: tuple[int, ...] | None = None
    """Which of the iteration's trajectories this process computes (a run split by trajectory); None: all
    of them. Only methods with ``process_split = "trajectories"`` see a subset."""
    substream: Callable[..., torch.Generator] | None = None
    """Independent random stream of this iteration fixed by integers ``substream(*indices)`` (and the run's seed
    and the iteration): the stream of one unit of work, so that a process draws its own units without
    replaying the draws of the others. None: derived from ``generator``'s seed (a context built by hand)."""
    share_set: Callable[[], None] | None = None
    """Makes the whole current set present in this process (a collective in a run split by class, where
    each process steps only its own rows); None in a one-process run."""

    def owned_classes(self) -> list[int]:
        """The classes this process computes losses for, in order (all of them in a one-process run)."""
        return list(range(self.synthetic.num_classes)) if self.classes is None else list(self.classes)

    def owned_image_positions(self) -> list[int]:
        """The image positions this process computes, in order (all ``ipc`` of them in a one-process run)."""
        every = range(self.synthetic.images_per_class)
        return list(every) if self.image_positions is None else list(self.image_positions)

    def owned_trajectories(self, count: int) -> list[int]:
        """Which of the iteration's ``count`` trajectories this process computes (all in a one-process run)."""
        return list(range(count)) if self.trajectories is None else list(self.trajectories)

    def unit_generator(self, *indices: int) -> torch.Generator:
        """The random stream of one unit of work of this iteration, fixed by ``indices``."""
        if self.substream is None:
            return stream_generator(self.generator.initial_seed(), *indices)
        return self.substream(*indices)

    def trajectory_generator(self, index: int) -> torch.Generator:
        """The random stream of trajectory ``index``: ``generator`` for the first, its own stream after."""
        return self.generator if index == 0 else self.unit_generator(index)

    def class_generator(self, label: int, update: int = 0) -> torch.Generator:
        """The random stream of class ``label``'s draws (real batch, DSA) for the method's ``update``-th round of
        this iteration (an outer-loop step)."""
        return self.unit_generator(CLASS_DRAWS, update, label)

    def position_generator(self, position: int) -> torch.Generator:
        """The random stream of the draws for image position ``position`` (the j-th image of every class)."""
        return self.unit_generator(POSITION_DRAWS, position)

    def regularizer_generator(self, update: int) -> torch.Generator:
        """The random stream of the regularizers' draws (a proxy) at the ``update``-th image update."""
        return self.unit_generator(REGULARIZER_DRAWS, update)

    def synchronise_set(self) -> None:
        """Before reading the whole set (training a network on it) in a run split by class: fetch the rows
        other processes stepped. Every process must call it at the same point; a no-op in one process."""
        if self.share_set is not None:
            self.share_set()

    def fresh_network(self) -> DistillModel:
        """A randomly initialised matching network (seeded from this iteration's generator)."""
        from infodistill.models import build_model

        seed = int(torch.randint(0, 2**62, (1,), generator=self.generator))
        return build_model(self.model_name, channels=self.info.channels, num_classes=self.info.num_classes,
                           image_size=self.info.image_size, seed=seed).to(self.device)


    def paired_class_batches(self, batch_real: int, update: int = 0) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per class of :meth:`owned_classes` (in order): a real batch of up to ``batch_real`` images and the
        class's synthetic images, both transformed by one shared DSA draw when augmenting (siamese). Each class
        draws from its own stream (:meth:`class_generator` of ``update``), so a process computing some classes
        draws exactly what a one-process run draws for them."""
        synthetic = self.synthetic.images_by_class()
        real_by_class: list[torch.Tensor] = []
        synthetic_by_class: list[torch.Tensor] = []
        for label in self.owned_classes():
            generator = self.class_generator(label, update)
            real = self.sampler.sample(label, min(batch_real, self.sampler.class_count(label)), generator)
            syn = synthetic[label]
            if self.augment is not None:
                real, syn = self.augment.siamese([real, syn], generator)
            real_by_class.append(real)
            synthetic_by_class.append(syn)
        return real_by_class, synthetic_by_class

    def calibrate_batch_norm(self, network: torch.nn.Module, images_per_class: int) -> None:
        """Refresh ``network``'s batch-norm running statistics on up to ``images_per_class`` real images of
        every class, then put those layers in eval mode (a few synthetic images per class would give
        useless batch statistics)."""
        sampler = self.sampler
        real = torch.cat([sampler.sample(c, min(images_per_class, sampler.class_count(c)), self.generator)
                          for c in range(self.synthetic.num_classes)])
        network.train()
        with torch.no_grad():
            network(real)
        for module in network.modules():
            if isinstance(module, BATCH_NORM_TYPES):
                module.eval()


@dataclass(frozen=True)
class MatchingSettings:
    """Settings read by several methods: real images per class per step and the siamese augmentation."""

    title: ClassVar[str] = "matching (several methods)"
    batch_real: int | None = setting(None, "real images per class per step", bounds=AT_LEAST_ONE, metavar="N",
                                     default_text="the method's, 256")
    augment: bool | None = setting(None, "siamese DSA augmentation", default_text="on for dm and dsa, off for dc")


@dataclass(frozen=True)
class MethodDefaults:
    """A method's published settings, used where the config leaves a value unset."""

    iterations: int
    lr_images: float
    momentum_images: float
    batch_real: int
    augment: bool
    param: str = "pixels"
    ema_decay: float = 0.0
    cmi_weight: float | str | None = None
    init: str = "real"
    optimizer: str = "sgd"
    betas: tuple[float, float] = (0.9, 0.999)
    lr_schedule: str = "constant"


@dataclass
class ClassUpdate:
    """A matching loss that concerns one class only (IDC's per-class updates).

    A method yields this instead of a bare loss when the image update is about class ``label``;
    the loop then computes the regularizers on that class's images alone. In a run split by class a
    process yields ``loss=None`` for a class another process owns (with no draws: each class has its own
    stream): the loop then takes the optimiser step with a zero gradient, which moves the images only
    through the optimiser's momentum, as the one-process step does for every class but ``label``.
    """

    loss: torch.Tensor | None
    label: int


@dataclass
class MethodSetup:
    """What a method may read once, before the first iteration (see :meth:`Method.prepare`).

    ``fresh`` is False when the run resumes from a checkpoint: the checkpoint then restores the
    synthetic set and the method's learned tensors after ``prepare``, so ``prepare`` must create
    them with their final shapes but need not initialise them well. ``generator`` is a random
    stream of its own, independent of the iterations'.
    """

    synthetic: SyntheticSet
    sampler: ClassSampler
    info: DatasetInfo
    device: torch.device
    model_name: str
    generator: torch.Generator
    fresh: bool
    init: str = "real"
    cache: LoadCache | None = None  # pools and trajectories shared across the runs of one process
    image_positions: tuple[int, ...] | None = None  # this process's positions in a run split by image


class Method(ABC):
    """A distillation method: per iteration, a sequence of matching losses over the synthetic set."""

    name: ClassVar[str]
    reads_real_data: ClassVar[bool] = True
    """False for methods that distil from a trained teacher alone (SRe2L): regularizers that compare
    with real data (MIM) do not apply to them."""
    clips_to_pixel_range: ClassVar[bool] = False
    """True for methods that clip images to the pixel range, which whitened (ZCA) images do not have."""
    process_split: ClassVar[str | None] = None
    """How a run of this method divides over processes (``docs/distributed.md``), or None (one process only):

    * ``"classes"``: the matching loss is a sum of per-class terms, each depending only on its own class's
      images; the method computes the classes of ``context.owned_classes()``, drawing each class's random
      numbers from ``context.class_generator(label, update)``. It learns no tensors beside the set, and calls
      ``context.synchronise_set()`` before it reads the whole set (network training).
    * ``"images"``: the loss is a sum of terms over image positions j (the j-th image of every class), each
      depending only on its own images; the method computes ``context.owned_image_positions()``.
    * ``"trajectories"``: the loss is a mean over independent trajectories; the method computes those of
      ``context.owned_trajectories(count)``, each from ``context.trajectory_generator(k)``, and divides by
      the total count. Every process holds and steps the whole set; the loop sums the gradients."""
    bf16_measured: ClassVar[bool] = False
    """True when distilling with this method in bf16 was measured as fast or faster with the accuracy held
    (benchmarks/bench_precision.py): ``precision: auto`` then computes it in bf16 on CPUs with native bf16."""
    reads_from_loop: ClassVar[frozenset[str]] = frozenset({"augment"})
    """``DistillConfig`` fields the method reads through the loop rather than its constructor: ``augment``
    (the DSA in ``context.augment``). A method that never reads ``context.augment`` sets ``frozenset()``, so
    that ``--augment`` given to it is refused instead of ignored (:func:`method_fields`)."""
    resumable_with_other_process_count: ClassVar[bool] = True
    """False when a checkpoint of this method is only valid for the process count that wrote it (a
    decomposition whose state is not the full set); resuming with another count is then refused."""

    @classmethod
    def split_problem(cls, model_name: str) -> str | None:
        """Why this method cannot divide a run over processes with network ``model_name``, or None."""
        if cls.process_split is None:
            return f"method '{cls.name}' does not split over processes yet"
        return None

    @staticmethod
    @abstractmethod
    def defaults(ipc: int) -> MethodDefaults:
        """Published settings for this method at ``ipc`` images per class."""

    @abstractmethod
    def iteration(self, context: DistillContext) -> Iterator[torch.Tensor | ClassUpdate]:
        """Yield one scalar matching loss (or a :class:`ClassUpdate`) per image update of this iteration."""

    def prepare(self, setup: MethodSetup) -> None:  # noqa: B027  an optional hook: the default does nothing
        """Called once before the first iteration: load what the method needs (experts), create its
        learned tensors, adjust the initial set. Most methods need nothing."""

    def parameter_groups(self) -> list[dict[str, Any]]:
        """Tensors the method learns beside the synthetic set (a step size, soft labels), as
        ``torch.optim.SGD`` parameter groups with their own ``lr``/``momentum``; each group also
        carries a ``"name"`` used in checkpoints. The loop steps them with the images."""
        return []

    def artefact_tensors(self) -> dict[str, torch.Tensor]:
        """What the method adds to the artefact: ``soft_labels`` (N x C probabilities) and/or ``lr``."""
        return {}

    def artefact_metadata(self) -> dict[str, str]:
        """String metadata the method adds to the artefact (e.g. SRe2L's relabelling temperature)."""
        return {}

    def project(self, synthetic: SyntheticSet) -> None:  # noqa: B027  an optional hook: the default does nothing
        """Called without gradient after every optimiser step, e.g. to clip images to the pixel range."""


METHOD_REGISTRY = Registry("method")
"""Method name -> class; a method's constructor takes its settings by name (``build_method``)."""

register_method = METHOD_REGISTRY.register
"""Class decorator: make a method available by name (``--method NAME``)."""

method_class = METHOD_REGISTRY.lookup
"""The registered class for a name, or a one-line error listing the known methods."""


def method_settings(cls: Any) -> set[str]:
    """Names of the settings a method's constructor takes, following ``**settings`` to its bases
    (a subclass such as DATM adds a few settings and passes the rest on to MTT)."""
    names: set[str] = set()
    for klass in cls.__mro__:
        if "__init__" not in vars(klass):
            continue
        parameters = inspect.signature(klass.__init__).parameters
        names |= {name for name, parameter in parameters.items() if name != "self"
                  and parameter.kind not in (parameter.VAR_KEYWORD, parameter.VAR_POSITIONAL)}
        if not any(parameter.kind == parameter.VAR_KEYWORD for parameter in parameters.values()):
            break
    return names


def method_fields(cls: Any) -> frozenset[str]:
    """Every setting a method reads: its constructor's settings (:func:`method_settings`) and the fields it
    reads through the loop (``reads_from_loop``). Validation refuses a method-specific setting outside it."""
    return frozenset(method_settings(cls)) | cls.reads_from_loop
