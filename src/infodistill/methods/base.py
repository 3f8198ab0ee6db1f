"""What a distillation method is: an object that yields matching losses for the shared loop.

The loop (``infodistill.distill``) owns the image optimiser, the regularizers, checkpoints and logs.
A method only says how to compute its matching loss. One iteration may update the images several
times (gradient matching has an outer loop, with network training in between), so a method's
:meth:`Method.iteration` is a generator: it yields one loss per image update; the loop adds the
regularizers, steps the image optimiser, and resumes the generator.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Iterator

import torch

from infodistill.augment import DSA
from infodistill.data import ClassSampler, DatasetInfo
from infodistill.errors import UserInputError
from infodistill.models.norm import BATCH_NORM_TYPES

if TYPE_CHECKING:
    from infodistill.pools import LoadCache
from infodistill.synthetic import SyntheticSet


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
    """The classes whose losses this process computes (a run split over processes, see
    ``docs/distributed.md``); None: every class. Only methods with ``class_decomposable`` see a subset."""

    def owned_classes(self) -> list[int]:
        """The classes this process computes losses for, in order (all of them in a one-process run)."""
        return list(range(self.synthetic.num_classes)) if self.classes is None else list(self.classes)

    def fresh_network(self) -> torch.nn.Module:
        """A randomly initialised matching network (seeded from this iteration's generator)."""
        from infodistill.models import build_model

        seed = int(torch.randint(0, 2**62, (1,), generator=self.generator))
        return build_model(self.model_name, channels=self.info.channels, num_classes=self.info.num_classes,
                           image_size=self.info.image_size, seed=seed).to(self.device)


    def paired_class_batches(self, batch_real: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per class: a real batch of up to ``batch_real`` images and the class's synthetic images,
        both transformed by one shared DSA draw when augmenting (siamese).

        Only the classes of :meth:`owned_classes` are returned (in order), but the random draws of
        every class are made, so all processes of a split run stay in step with a one-process run."""
        synthetic = self.synthetic.images_by_class()
        real_by_class: list[torch.Tensor] = []
        synthetic_by_class: list[torch.Tensor] = []
        owned = None if self.classes is None else set(self.classes)
        for label in range(self.synthetic.num_classes):
            count = min(batch_real, self.sampler.class_count(label))
            if owned is not None and label not in owned:
                self.sampler.skip(label, count, self.generator)
                if self.augment is not None:  # the draw DSA.siamese makes: one parameter set of batch 1
                    self.augment.sample(1, tuple(synthetic.shape[-2:]), self.generator)
                continue
            real = self.sampler.sample(label, count, self.generator)
            syn = synthetic[label]
            if self.augment is not None:
                real, syn = self.augment.siamese([real, syn], self.generator)
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
    the loop then computes the regularizers on that class's images alone.
    """

    loss: torch.Tensor
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


class Method(ABC):
    """A distillation method: per iteration, a sequence of matching losses over the synthetic set."""

    name: ClassVar[str]
    reads_real_data: ClassVar[bool] = True
    """False for methods that distil from a trained teacher alone (SRe2L): regularizers that compare
    with real data (MIM) do not apply to them."""
    clips_to_pixel_range: ClassVar[bool] = False
    """True for methods that clip images to the pixel range, which whitened (ZCA) images do not have."""
    class_decomposable: ClassVar[bool] = False
    """True when the matching loss is a sum of per-class terms, each depending only on its own class's
    synthetic images, and every random draw is made from the context's generator whatever
    ``context.classes`` is: a run can then split the classes over processes
    (``docs/distributed.md``). Such a method computes only the classes of ``context.owned_classes()``
    and learns no tensors beside the set."""
    resumable_with_other_process_count: ClassVar[bool] = True
    """False when a checkpoint of this method is only valid for the process count that wrote it (a
    decomposition whose state is not the full set); resuming with another count is then refused."""

    @classmethod
    def class_split_problem(cls, model_name: str) -> str | None:
        """Why this method cannot split its classes over processes with network ``model_name``, or None."""
        if not cls.class_decomposable:
            return f"method '{cls.name}' does not split its classes over processes yet"
        return None

    @staticmethod
    @abstractmethod
    def defaults(ipc: int) -> MethodDefaults:
        """Published settings for this method at ``ipc`` images per class."""

    @abstractmethod
    def iteration(self, context: DistillContext) -> Iterator[torch.Tensor | ClassUpdate]:
        """Yield one scalar matching loss (or a :class:`ClassUpdate`) per image update of this iteration."""

    def prepare(self, setup: MethodSetup) -> None:
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

    def project(self, synthetic: SyntheticSet) -> None:
        """Called without gradient after every optimiser step, e.g. to clip images to the pixel range."""


METHOD_REGISTRY: dict[str, Callable[..., Method]] = {}
"""Method name -> factory ``factory(**settings) -> Method``."""


def register_method(name: str) -> Callable[[Any], Any]:
    """Class decorator: make a method available by name (``--method NAME``)."""

    def decorate(cls: Any) -> Any:
        if name in METHOD_REGISTRY:
            raise ValueError(f"method '{name}' is registered twice")
        cls.name = name
        METHOD_REGISTRY[name] = cls
        return cls

    return decorate


def method_class(name: str) -> Any:
    """The registered class for ``name``, or a one-line error listing the known methods."""
    if name not in METHOD_REGISTRY:
        raise UserInputError(f"unknown method '{name}'; choose one of: {', '.join(sorted(METHOD_REGISTRY))}")
    return METHOD_REGISTRY[name]


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
