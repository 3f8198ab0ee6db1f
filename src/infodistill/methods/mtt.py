"""Matching training trajectories (MTT; Cazenavette et al., CVPR 2022).

Experts are networks trained on the real data with their weights stored after every epoch
(``infodistill experts``). One iteration, as in the paper's algorithm box:

    pick an expert tau* and a start epoch t in [min_start_epoch, max_start_epoch)
    theta_0 <- theta*_t
    for n in 0..syn_steps-1:
        b_n      <- the next minibatch of batch_syn synthetic images (a fresh permutation when used up)
        theta_{n+1} <- theta_n - alpha * grad CE(theta_n; DSA(b_n))       (alpha: the learned step size)
    L = ||theta_N - theta*_{t+M}||^2 / ||theta*_t - theta*_{t+M}||^2        (M = expert_epochs)
    S <- S - lr_images * grad_S L;  alpha <- alpha - lr_lr * grad_alpha L   (the shared loop steps both)

With ``trajectories`` = T > 1 (default 1, as published) L is the mean over T such trajectories, each with
its own expert, start epoch, batches and augmentation, drawn from its own random stream
(``context.trajectory_generator``). A run over several processes splits these T trajectories between them
(``process_split = "trajectories"``; the loop sums the gradients, see ``docs/distributed.md``).

The student is a pure function of a flat weight vector (:class:`FunctionalStudent`); the loss is
differentiated through the unrolled steps. ``memory="checkpoint"`` recomputes each step during the
backward pass instead of keeping the whole unrolled graph (see ``benchmarks/bench_trajectory.py``).
The learned step size is stored in the artefact (``lr``) and used by ``infodistill evaluate``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from infodistill.errors import UserInputError
from infodistill.methods.base import (
    DistillContext,
    Method,
    MethodDefaults,
    MethodSetup,
    register_method,
)
from infodistill.methods.student import (
    MEMORY_MODES,
    FunctionalStudent,
    normalised_distance,
)
from infodistill.settings import AT_LEAST_ONE, NON_NEGATIVE, POSITIVE, setting
from infodistill.synthetic import SyntheticSet


@dataclass(frozen=True)
class TrajectorySettings:
    """Settings of trajectory matching (MTT, and DATM on top of it)."""

    title: ClassVar[str] = "trajectory matching (mtt, datm)"
    experts: str | None = setting(None, "expert trajectories (build with `infodistill experts`)", metavar="DIR",
                                  default_text="none")
    syn_steps: int | None = setting(None, "student steps per iteration", bounds=AT_LEAST_ONE, metavar="N",
                                    default_text="by ipc")
    expert_epochs: int | None = setting(None, "expert epochs to match", bounds=AT_LEAST_ONE, metavar="M",
                                        default_text="2")
    min_start_epoch: int | None = setting(None, "earliest start epoch", bounds=NON_NEGATIVE, metavar="E",
                                          default_text="0")
    max_start_epoch: int | None = setting(None, "start epochs are below this", bounds=NON_NEGATIVE, metavar="E",
                                          default_text="by ipc")
    batch_syn: int | None = setting(None, "synthetic images per student step", bounds=AT_LEAST_ONE, metavar="N",
                                    default_text="all")
    lr_lr: float | None = setting(None, "learning rate of the learned step size", bounds=POSITIVE,
                                  default_text="by ipc")
    trajectories: int | None = setting(None, "student trajectories averaged per iteration; with --nproc N they are "
                                       "split over the N processes (N <= T)", bounds=AT_LEAST_ONE, metavar="T",
                                       default_text="1, as published")
    memory: str | None = setting(None, "keep the unrolled graph (full) or recompute each step in the backward pass",
                                 choices=MEMORY_MODES, default_text="full")


@register_method("mtt")
class TrajectoryMatching(Method):
    """MTT. ``experts`` is a directory written by ``infodistill experts`` (same dataset and model)."""

    process_split = "trajectories"

    # Published CIFAR-10 settings by IPC (MTT's table and README):
    # (syn_steps, expert_epochs, max_start_epoch, lr_images, lr_lr); the initial step size is the experts' lr.
    PUBLISHED: ClassVar[Mapping[int, tuple[int, int, int, float, float]]] = MappingProxyType({
        1: (50, 2, 2, 1000.0, 1e-7),
        10: (30, 2, 20, 1000.0, 1e-5),
        50: (30, 2, 40, 1000.0, 1e-5),
    })
    ITERATIONS: ClassVar[int] = 5000
    MIN_LR: ClassVar[float] = 1e-6
    """The learned step size is projected onto [MIN_LR, inf) before each iteration: a negative step makes
    the student ascend its loss, and the run then diverges (seen with 50 steps on quick experts)."""

    def __init__(
        self,
        experts: str | None = None,
        ipc: int = 10,
        syn_steps: int | None = None,
        expert_epochs: int | None = None,
        min_start_epoch: int | None = None,
        max_start_epoch: int | None = None,
        batch_syn: int | None = None,
        lr_lr: float | None = None,
        memory: str | None = None,
        zca: float = 0.0,
        trajectories: int | None = None,
    ) -> None:
        published = self.published(ipc)
        self.trajectories = 1 if trajectories is None else trajectories
        if isinstance(self.trajectories, bool) or not isinstance(self.trajectories, int) or self.trajectories < 1:
            raise UserInputError(f"trajectories must be an integer >= 1 (per iteration), got {trajectories!r}")
        self.experts_dir = experts
        self.syn_steps = syn_steps if syn_steps is not None else published[0]
        self.expert_epochs = expert_epochs if expert_epochs is not None else published[1]
        self.max_start_epoch = max_start_epoch if max_start_epoch is not None else published[2]
        self.min_start_epoch = min_start_epoch if min_start_epoch is not None else 0
        self.lr_lr = lr_lr if lr_lr is not None else published[4]
        self.batch_syn = batch_syn
        self.memory = memory if memory is not None else "full"
        self.zca = zca
        if self.memory not in MEMORY_MODES:
            raise UserInputError(f"memory '{self.memory}' is not one of: {', '.join(MEMORY_MODES)}")
        if self.min_start_epoch >= self.max_start_epoch:
            raise UserInputError(f"min_start_epoch {self.min_start_epoch} must be below max_start_epoch "
                                 f"{self.max_start_epoch} (start epochs are drawn from [min, max))")
        self.lr: nn.Parameter | None = None

    @classmethod
    def published(cls, ipc: int) -> tuple[int, int, int, float, float]:
        """The published row for the nearest IPC at or below ``ipc`` (IPC 1 below 10, and so on)."""
        return cls.PUBLISHED[max(key for key in cls.PUBLISHED if key <= max(ipc, 1))]

    @classmethod
    def defaults(cls, ipc: int) -> MethodDefaults:
        return MethodDefaults(iterations=cls.ITERATIONS, lr_images=cls.published(ipc)[3], momentum_images=0.5,
                              batch_real=256, augment=True, cmi_weight="auto")

    def prepare(self, setup: MethodSetup) -> None:
        """Load the experts once, check the matching window fits them, create the learned step size."""
        from infodistill.experts import load_experts

        if self.experts_dir is None:
            raise UserInputError(f"method '{self.name}' needs expert trajectories: pass --experts DIR "
                                 f"(build them with 'infodistill experts --dataset {setup.info.name} --out DIR')")
        self.experts = load_experts(self.experts_dir, setup.info, model=setup.model_name, zca=self.zca,
                                    device=str(setup.device), cache=setup.cache)
        last_target = self.max_start_epoch - 1 + self.expert_epochs
        if last_target > self.experts.epochs:
            raise UserInputError(
                f"max_start_epoch {self.max_start_epoch} with expert_epochs {self.expert_epochs} needs targets up to "
                f"epoch {last_target}, but the experts in {self.experts_dir} were trained for {self.experts.epochs} "
                f"epochs; lower max_start_epoch/expert_epochs or train longer experts"
            )
        self.student = FunctionalStudent(self.experts.build_model())
        self.lr = nn.Parameter(torch.tensor(float(self.experts.lr), device=setup.device))

    def parameter_groups(self) -> list[dict[str, Any]]:
        return [{"params": [self.lr], "lr": self.lr_lr, "momentum": 0.5, "name": "lr"}]

    def artefact_tensors(self) -> dict[str, Tensor]:
        assert self.lr is not None  # prepare() creates it
        return {"lr": self.lr.detach().clamp_min(self.MIN_LR).reshape(())}

    def start_epoch_bound(self, iteration: int) -> int:
        """Start epochs are drawn from [min_start_epoch, this bound)."""
        return self.max_start_epoch

    def targets(self, synthetic: SyntheticSet) -> Tensor:
        """What the student is trained to predict on the synthetic images: their labels."""
        return synthetic.labels

    def iteration(self, context: DistillContext) -> Iterator[Tensor]:
        """One loss, the mean over ``trajectories`` matched trajectories (those of this process in a split run,
        still divided by the total), and one update of the images and the step size."""
        assert self.lr is not None  # prepare() creates it
        with torch.no_grad():
            self.lr.clamp_(min=self.MIN_LR)
        total: Tensor | None = None
        for index in context.owned_trajectories(self.trajectories):
            distance = self.trajectory_distance(context, context.trajectory_generator(index))
            total = distance if total is None else total + distance
        if total is None:
            raise RuntimeError("MTT: this process was given no trajectory to compute")
        yield total / self.trajectories

    def trajectory_distance(self, context: DistillContext, generator: torch.Generator) -> Tensor:
        """The normalised distance of one student trajectory, every draw made from ``generator``."""
        expert = self.experts.sample_index(generator)
        start_epoch = int(torch.randint(self.min_start_epoch, self.start_epoch_bound(context.iteration), (1,),
                                        generator=generator))
        start = self.experts.weights(expert, start_epoch)
        target = self.experts.weights(expert, start_epoch + self.expert_epochs)

        images = context.synthetic.images()
        targets = self.targets(context.synthetic)
        batch_size = self.batch_syn or len(images)
        batches: list[tuple[Tensor, Tensor]] = []
        order: list[Tensor] = []
        for _ in range(self.syn_steps):
            if not order:
                order = list(torch.randperm(len(images), generator=generator).split(batch_size))
            index = order.pop(0).to(images.device)
            batch = images[index]
            if context.augment is not None:
                batch = context.augment(batch, generator)
            batches.append((batch, targets[index]))
        assert self.lr is not None  # prepare() creates it
        student = self.student.unroll(start, self.lr, batches, self.memory)
        return normalised_distance(student, start, target)
