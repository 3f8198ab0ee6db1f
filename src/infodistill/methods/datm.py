"""Difficulty-aligned trajectory matching (DATM; Guo et al., ICLR 2024).

MTT with three changes, each a small override of :class:`TrajectoryMatching`:

1. The matching window grows: start epochs are drawn from [min_start_epoch, U(it)) with
   U(it) = min(window_start_max + (max_start_epoch - window_start_max) * it / window_growth_iterations,
   max_start_epoch): early (easy) parts of the trajectories first, later (harder) ones as the set
   improves. Larger IPC uses later windows (the presets).
2. Soft labels are learned: each image's label is softmax(z) for learned logits z, initialised with
   the experts' logits (at ``label_epoch``, the experts' last epoch by default) averaged over the
   experts that classify the image correctly (all experts if none does); with a real-image init the
   images themselves are drawn among real images an expert classifies correctly. The student trains
   on these probabilities; the artefact stores them as ``soft_labels`` (rows sum to one by construction).
3. The artefact holds an exponential moving average of the images (the loop's ``ema_decay``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from infodistill.methods.base import MethodDefaults, MethodSetup, register_method
from infodistill.methods.mtt import TrajectoryMatching
from infodistill.settings import AT_LEAST_ONE, NON_NEGATIVE, POSITIVE, setting
from infodistill.synthetic import PixelSet, SyntheticSet


@dataclass(frozen=True)
class DATMSettings:
    """DATM's settings beside trajectory matching's: the growing window of start epochs, the soft labels."""

    title: ClassVar[str] = "DATM"
    window_start_max: int | None = setting(None, "the window's upper bound at the start, growing to "
                                           "--max-start-epoch", bounds=NON_NEGATIVE, metavar="E",
                                           default_text="by ipc")
    window_growth_iterations: int | None = setting(None, "iterations over which the window grows",
                                                   bounds=AT_LEAST_ONE, metavar="N", default_text="3000")
    lr_labels: float | None = setting(None, "learning rate of the soft labels", bounds=POSITIVE, default_text="2")


@register_method("datm")
class DifficultyAlignedMatching(TrajectoryMatching):
    """DATM: MTT with a growing matching window, learned soft labels and averaged images."""

    # CIFAR-10 settings by IPC: (syn_steps, expert_epochs, max_start_epoch, lr_images, lr_lr);
    # window_start_max per IPC in WINDOW_START.
    PUBLISHED: ClassVar[Mapping[int, tuple[int, int, int, float, float]]] = MappingProxyType({
        1: (80, 2, 20, 100.0, 1e-5),
        10: (80, 2, 40, 100.0, 1e-5),
        50: (80, 2, 40, 1000.0, 1e-5),
    })
    WINDOW_START: ClassVar[Mapping[int, int]] = MappingProxyType({1: 10, 10: 20, 50: 20})
    WINDOW_GROWTH_ITERATIONS: ClassVar[int] = 3000
    LR_LABELS: ClassVar[float] = 2.0
    MOMENTUM_LABELS: ClassVar[float] = 0.9
    EMA_DECAY: ClassVar[float] = 0.999
    CANDIDATES_PER_IMAGE: ClassVar[int] = 20

    def __init__(
        self,
        window_start_max: int | None = None,
        window_growth_iterations: int | None = None,
        lr_labels: float | None = None,
        **settings: Any,
    ) -> None:
        super().__init__(**settings)
        ipc = settings.get("ipc", 10)
        published_start = self.WINDOW_START[max(key for key in self.WINDOW_START if key <= max(ipc, 1))]
        start_max = window_start_max if window_start_max is not None else published_start
        self.window_start_max = min(max(start_max, self.min_start_epoch + 1), self.max_start_epoch)
        self.window_growth_iterations = window_growth_iterations or self.WINDOW_GROWTH_ITERATIONS
        self.lr_labels = lr_labels if lr_labels is not None else self.LR_LABELS
        self.label_logits: nn.Parameter | None = None

    @classmethod
    def defaults(cls, ipc: int) -> MethodDefaults:
        base = super().defaults(ipc)
        return MethodDefaults(iterations=base.iterations, lr_images=base.lr_images, momentum_images=0.5,
                              batch_real=base.batch_real, augment=True, ema_decay=cls.EMA_DECAY,
                              cmi_weight=base.cmi_weight)

    def start_epoch_bound(self, iteration: int) -> int:
        grown = self.window_start_max + int((self.max_start_epoch - self.window_start_max) * iteration
                                            / self.window_growth_iterations)
        return min(grown, self.max_start_epoch)

    def prepare(self, setup: MethodSetup) -> None:
        super().prepare(setup)
        synthetic = setup.synthetic
        logits = torch.zeros(len(synthetic.labels), setup.info.num_classes, device=setup.device)
        if setup.fresh:
            label_epoch = self.experts.epochs
            if isinstance(synthetic, PixelSet) and setup.init == "real":
                self._draw_correctly_classified(setup, synthetic, label_epoch)
            logits = self._expert_logits(synthetic.images().detach(), synthetic.labels, label_epoch)
        self.label_logits = nn.Parameter(logits)

    @torch.no_grad()
    def _expert_logits(self, images: Tensor, labels: Tensor, epoch: int) -> Tensor:
        """Per image: the mean logits of the experts (at ``epoch``) that classify it correctly, or of all."""
        all_logits = torch.stack([self.student(self.experts.weights(expert, epoch), images)
                                  for expert in range(len(self.experts))])  # experts x N x C
        correct = (all_logits.argmax(dim=2) == labels).float().unsqueeze(2)
        counts = correct.sum(dim=0)
        correct_mean = (all_logits * correct).sum(dim=0) / counts.clamp_min(1)
        return torch.where(counts > 0, correct_mean, all_logits.mean(dim=0))

    @torch.no_grad()
    def _draw_correctly_classified(self, setup: MethodSetup, synthetic: PixelSet, epoch: int) -> None:
        """Replace each class's initial images (``setup.synthetic``) by real ones that the first expert classifies
        correctly (random candidates in order; the remaining places keep random real images if too few qualify)."""
        weights = self.experts.weights(0, epoch)
        per_class = synthetic.images_per_class
        for label in range(synthetic.num_classes):
            count = min(self.CANDIDATES_PER_IMAGE * per_class, setup.sampler.class_count(label))
            candidates = setup.sampler.sample(label, count, setup.generator).float()
            correct = self.student(weights, candidates).argmax(dim=1) == label
            chosen = torch.cat([candidates[correct], candidates[~correct]])[:per_class]
            synthetic.pixels[label * per_class : (label + 1) * per_class] = chosen

    def targets(self, synthetic: SyntheticSet) -> Tensor:
        assert self.label_logits is not None  # prepare() creates them
        return torch.softmax(self.label_logits, dim=1)

    def parameter_groups(self) -> list[dict[str, Any]]:
        return [*super().parameter_groups(),
                {"params": [self.label_logits], "lr": self.lr_labels, "momentum": self.MOMENTUM_LABELS,
                 "name": "labels"}]

    def artefact_tensors(self) -> dict[str, Tensor]:
        assert self.label_logits is not None  # prepare() creates them
        return {**super().artefact_tensors(), "soft_labels": torch.softmax(self.label_logits.detach(), dim=1)}
