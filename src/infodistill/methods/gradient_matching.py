"""Gradient matching: DC (Zhao, Mopuri & Bilen, ICLR 2021) and DSA (Zhao & Bilen, ICML 2021).

One iteration, as in the papers' algorithm box:

    theta <- a freshly initialised network
    for outer in 1..outer_loop:
        for each class c:
            B_c^T <- batch_real random real images of class c;  B_c^S <- the synthetic images of class c
            A_c   <- one DSA transformation applied to both batches (siamese)       [DSA only]
            g_c^T = grad_theta CE(theta; A_c(B_c^T), c)          (a constant)
            g_c^S = grad_theta CE(theta; A_c(B_c^S), c)          (differentiable in S)
        L = sum_c D(g_c^T, g_c^S)
        S <- S - lr_images * grad_S L                            (the shared loop steps the optimiser)
        if outer is the last one: stop
        train theta on the synthetic set for inner_loop epochs   (plain SGD, lr_net, batch_train;
                                                                  per-sample DSA in DSA)

``D`` is :func:`gradient_distance`. DC and DSA share this code and differ only in their defaults:
DSA turns augmentation on.

Batch norm: a one-image-per-class synthetic batch gives useless batch statistics, so, as in the
original code, before each matching step a batch-norm network sees 16 real images per class in
training mode (updating its running statistics) and then matches with its batch-norm layers in
evaluation mode. The inner training runs in training mode again.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from infodistill.errors import UserInputError
from infodistill.methods.base import (
    DistillContext,
    Method,
    MethodDefaults,
    register_method,
)
from infodistill.models.norm import has_batch_norm
from infodistill.settings import AT_LEAST_ONE, POSITIVE, check_int, setting


def gradient_distance(real_grads: Sequence[Tensor], synthetic_grads: Sequence[Tensor]) -> Tensor:
    """Sum over layers and output channels of ``1 - cos(real, synthetic)``.

    Each gradient is read as one row per output channel: a conv gradient ``out x in x kh x kw``
    becomes ``out x (in*kh*kw)``, a linear one stays ``out x in`` (any tensor with 2 or more
    dimensions is flattened after its first). One-dimensional gradients (biases, norm scales and
    shifts) contribute nothing. ``cos = a.b / (|a| |b| + 1e-6)``, so zero rows give 1.
    """
    if len(real_grads) != len(synthetic_grads):
        raise ValueError(f"gradient_distance: {len(real_grads)} real gradients but {len(synthetic_grads)} synthetic")
    total: Tensor | None = None
    for real, synthetic in zip(real_grads, synthetic_grads):
        if real.shape != synthetic.shape:
            raise ValueError(f"gradient_distance: shapes differ: {tuple(real.shape)} vs {tuple(synthetic.shape)}")
        if real.dim() < 2:
            continue
        real_rows = real.reshape(real.shape[0], -1)
        synthetic_rows = synthetic.reshape(synthetic.shape[0], -1)
        dot = (real_rows * synthetic_rows).sum(dim=1)
        norms = real_rows.norm(dim=1) * synthetic_rows.norm(dim=1)
        layer = (1.0 - dot / (norms + 1e-6)).sum()
        total = layer if total is None else total + layer
    if total is None:
        device = real_grads[0].device if len(real_grads) else None
        return torch.zeros((), device=device)
    return total


def _gradient_matching_defaults(augment: bool) -> MethodDefaults:
    """Published DC/DSA settings (they do not depend on IPC; the loops do, see ``GradientMatching.loops``)."""
    return MethodDefaults(iterations=1000, lr_images=0.1, momentum_images=0.5, batch_real=256, augment=augment)


@dataclass(frozen=True)
class GradientMatchingSettings:
    """Settings of gradient matching (DC, DSA; IDC reads ``lr_net``)."""

    title: ClassVar[str] = "gradient matching (dc, dsa, idc)"
    outer_loop: int | None = setting(None, "outer loop: networks per iteration", bounds=AT_LEAST_ONE, metavar="N",
                                     default_text="by ipc")
    inner_loop: int | None = setting(None, "inner loop: network updates per outer step", bounds=AT_LEAST_ONE,
                                     metavar="N", default_text="by ipc")
    lr_net: float = setting(0.01, "network learning rate", bounds=POSITIVE)


class GradientMatching(Method):
    """The bi-level gradient-matching algorithm; augmentation comes from ``context.augment``.

    ``outer_loop`` / ``inner_loop`` default to the published pair for the run's IPC
    (:meth:`published_loops`); set them to override.
    """

    name = "gradient_matching"
    process_split = "classes"
    """Split by class: the matching loss is a sum of per-class distances (each class is matched in its own
    forward pass, so batch norm in evaluation mode does not mix classes). The network training between
    image updates reads the whole set, so every process first fetches the others' rows
    (``context.synchronise_set``) and then trains the same network the same way."""

    PUBLISHED_LOOPS: ClassVar[Mapping[int, tuple[int, int]]] = MappingProxyType(
        {1: (1, 1), 10: (10, 50), 20: (20, 25), 30: (30, 20), 40: (40, 15), 50: (50, 10)}
    )
    """IPC -> (outer_loop, inner_loop) of the original code."""

    BATCH_NORM_IMAGES_PER_CLASS: ClassVar[int] = 16
    """Real images per class used to set batch-norm statistics before matching (original code)."""

    def __init__(
        self,
        batch_real: int = 256,
        outer_loop: int | None = None,
        inner_loop: int | None = None,
        lr_net: float = 0.01,
        batch_train: int = 256,
    ) -> None:
        check_int(batch_real, "batch_real", owner="gradient matching")
        check_int(batch_train, "batch_train", owner="gradient matching")
        if outer_loop is not None:
            check_int(outer_loop, "outer_loop", owner="gradient matching")
        if inner_loop is not None:
            check_int(inner_loop, "inner_loop", minimum=0, owner="gradient matching")
        if isinstance(lr_net, bool) or not isinstance(lr_net, (int, float)) or not lr_net > 0:
            raise UserInputError(f"gradient matching lr_net={lr_net!r} is invalid; it must be a number > 0")
        self.batch_real = batch_real
        self.outer_loop = outer_loop
        self.inner_loop = inner_loop
        self.lr_net = float(lr_net)
        self.batch_train = batch_train

    @staticmethod
    def defaults(ipc: int) -> MethodDefaults:
        """The algorithm's settings without augmentation (DC's); DSA overrides ``augment``."""
        return _gradient_matching_defaults(augment=False)

    @classmethod
    def published_loops(cls, ipc: int) -> tuple[int, int]:
        """(outer_loop, inner_loop) published for ``ipc``.

        The original code defines only IPC 1, 10, 20, 30, 40, 50 (and stops otherwise); any other
        IPC takes the entry of the nearest published IPC, the smaller one on a tie (IPC 15 -> 10,
        IPC 100 -> 50).
        """
        check_int(ipc, "ipc", owner="gradient matching")
        nearest = min(cls.PUBLISHED_LOOPS, key=lambda published: (abs(published - ipc), published))
        return cls.PUBLISHED_LOOPS[nearest]

    def loops(self, ipc: int) -> tuple[int, int]:
        """(outer_loop, inner_loop) used at ``ipc``: the explicit settings, else the published pair."""
        outer, inner = self.published_loops(ipc)
        return (
            self.outer_loop if self.outer_loop is not None else outer,
            self.inner_loop if self.inner_loop is not None else inner,
        )

    def iteration(self, context: DistillContext) -> Iterator[Tensor]:
        """``outer_loop`` image updates on one fresh network, training it in between."""
        outer_loop, inner_loop = self.loops(context.synthetic.images_per_class)
        network = context.fresh_network()
        network.train()
        network.requires_grad_(True)
        network_optimizer = torch.optim.SGD(network.parameters(), lr=self.lr_net)  # no momentum, as published

        for outer in range(outer_loop):
            if has_batch_norm(network):
                context.calibrate_batch_norm(network, self.BATCH_NORM_IMAGES_PER_CLASS)
            real_by_class, synthetic_by_class = context.paired_class_batches(self.batch_real, update=outer)
            yield self.matching_loss(network, real_by_class, synthetic_by_class, context.owned_classes())
            if outer == outer_loop - 1:
                break
            context.synchronise_set()
            self.train_network(network, network_optimizer, context, inner_loop)

    def matching_loss(
        self, network: nn.Module, real_by_class: Sequence[Tensor], synthetic_by_class: Sequence[Tensor],
        labels: Sequence[int] | None = None,
    ) -> Tensor:
        """``sum_c D(grad CE(real_c, c), grad CE(syn_c, c))``; class ``c`` is ``labels[i]`` for the i-th batches
        (the position in the lists when ``labels`` is None).

        The real gradients are constants; the synthetic ones keep their graph (``create_graph``), which
        is the only path from the loss to the synthetic pixels.
        """
        if len(real_by_class) != len(synthetic_by_class):
            raise ValueError(
                f"gradient matching: {len(real_by_class)} real class batches but {len(synthetic_by_class)} synthetic"
            )
        parameters = [parameter for parameter in network.parameters() if parameter.requires_grad]
        loss: Tensor | None = None
        labels = range(len(real_by_class)) if labels is None else labels
        for c, real, syn in zip(labels, real_by_class, synthetic_by_class):
            real_labels = torch.full((len(real),), c, dtype=torch.long, device=real.device)
            synthetic_labels = torch.full((len(syn),), c, dtype=torch.long, device=syn.device)
            real_grads = [grad.detach() for grad in
                          torch.autograd.grad(F.cross_entropy(network(real), real_labels), parameters)]
            synthetic_grads = torch.autograd.grad(
                F.cross_entropy(network(syn), synthetic_labels), parameters, create_graph=True
            )
            distance = gradient_distance(real_grads, synthetic_grads)
            loss = distance if loss is None else loss + distance
        assert loss is not None, "gradient matching needs at least one class"
        return loss

    def train_network(
        self, network: nn.Module, optimizer: torch.optim.Optimizer, context: DistillContext, epochs: int
    ) -> None:
        """``epochs`` passes over the (detached) synthetic set in random minibatches of ``batch_train``.

        With augmentation each image gets its own DSA draw (not siamese), as in the original code.
        """
        network.train()
        images = context.synthetic.images().detach()
        labels = context.synthetic.labels.to(images.device)
        generator = context.generator
        for _ in range(epochs):
            order = torch.randperm(len(images), generator=generator, device=generator.device).to(images.device)
            for batch in order.split(self.batch_train):
                inputs = images[batch]
                if context.augment is not None:
                    inputs = context.augment(inputs, generator)
                loss = F.cross_entropy(network(inputs), labels[batch])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()



@register_method("dc")
class DatasetCondensation(GradientMatching):
    """DC (Zhao, Mopuri & Bilen, ICLR 2021): gradient matching, no augmentation."""

    @staticmethod
    def defaults(ipc: int) -> MethodDefaults:
        """Published DC settings."""
        return _gradient_matching_defaults(augment=False)


@register_method("dsa")
class SiameseAugmentedCondensation(GradientMatching):
    """DSA (Zhao & Bilen, ICML 2021): gradient matching with differentiable siamese augmentation."""

    @staticmethod
    def defaults(ipc: int) -> MethodDefaults:
        """Published DSA settings."""
        return _gradient_matching_defaults(augment=True)
