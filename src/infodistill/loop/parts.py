"""What a run is built from: its random streams, the synthetic set, the method and the optimiser over both
(:func:`build_run_parts`), the image average, the context of each iteration (:func:`make_context`), the
regularizer terms and the learning-rate schedule."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from infodistill.augment import DSA
from infodistill.data import ClassSampler, RealData
from infodistill.loop.config import DistillConfig
from infodistill.loop.split import ProcessSplit
from infodistill.methods import DistillContext, Method, MethodSetup, method_class, method_settings
from infodistill.precision import resolve_precision
from infodistill.regularizers import Regularizer
from infodistill.seeds import stream_generator
from infodistill.synthetic import SyntheticSet, build_synthetic
from infodistill.trained import LoadCache

# Independent random streams of a run: one per iteration, one for the initial set, one for calibration,
# one for the method's preparation, one for the MIM projection heads.
ITERATION_STREAM, INIT_STREAM, CALIBRATION_STREAM, SETUP_STREAM, REGULARIZER_STREAM = 0, 1, 2, 3, 4


def schedule_factor(schedule: str, iteration: int, iterations: int) -> float:
    """Multiplier of the base learning rates at ``iteration``: 1, or the cosine decay
    ``0.5 * (1 + cos(pi * iteration / iterations))`` (SRe2L's schedule)."""
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * iteration / iterations))
    return 1.0


@dataclass
class RegularizerTerm:
    """A regularizer with its weight and how often it is computed (every ``every`` iterations)."""

    name: str
    regularizer: Regularizer
    weight: float
    every: int = 1

    def active(self, iteration: int) -> bool:
        return self.weight > 0 and iteration % self.every == 0


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


@dataclass
class RunParts:
    """What a run steps: the synthetic set, the method, one optimiser over the set and the method's learned
    tensors, the image average (or None), and the augmentation (or None)."""

    synthetic: SyntheticSet
    method: Method
    optimizer: torch.optim.Optimizer
    average: ImageAverage | None
    augment: DSA | None


def build_method(config: DistillConfig) -> Method:
    """The method object, given those config fields that its constructor takes (same names)."""
    cls = method_class(config.method)
    accepted = method_settings(cls)
    settings = {name: getattr(config, name) for name in accepted if hasattr(config, name)}
    return cls(**{name: value for name, value in settings.items() if value is not None})


def build_run_parts(config: DistillConfig, real: RealData, sampler: ClassSampler, device: torch.device,
                    fresh: bool = True, cache: LoadCache | None = None,
                    image_positions: tuple[int, ...] | None = None) -> RunParts:
    """Initialise the synthetic set, build and prepare the method, and the optimiser over both, from
    ``config`` with its method defaults filled (the loop and the benchmarks share this).
    ``image_positions``: this process's share in a run split by image (what the method prepares)."""
    assert config.param is not None and config.init is not None and config.lr_images is not None  # defaults filled
    init_generator = stream_generator(config.seed, INIT_STREAM)
    synthetic = build_synthetic(config.param, sampler, config.ipc, config.init, init_generator,
                                factor=config.factor, upsample=config.upsample, rank=config.rank).to(device)
    method = build_method(config)
    setup_generator = stream_generator(config.seed, SETUP_STREAM)
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


def make_context(config: DistillConfig, iteration: int, synthetic: SyntheticSet, sampler: ClassSampler,
                  real: RealData, augment: DSA | None, device: torch.device,
                  stream: int = ITERATION_STREAM, classes: tuple[int, ...] | None = None,
                  split: ProcessSplit | None = None) -> DistillContext:
    """The context of one iteration; ``classes``: those this process computes (None: all), or ``split``:
    this process's share of a run split over processes (its classes, image positions or trajectories)."""
    generator = stream_generator(config.seed, stream, iteration)

    def substream(*indices: int) -> torch.Generator:
        return stream_generator(config.seed, stream, iteration, *indices)

    share: dict[str, Any] = {"classes": classes}
    if split is not None:
        share = {split.context_field: split.mine}
        if split.kind == "classes":
            share["share_set"] = lambda: split.refresh(synthetic)
    return DistillContext(iteration=iteration, generator=generator, synthetic=synthetic, sampler=sampler,
                          info=real.info, augment=augment, device=device, model_name=config.model,
                          substream=substream, **share)
