"""Distribution matching (DM; Zhao & Bilen, WACV 2023).

One iteration, as in the paper's algorithm box:

    psi <- a freshly initialised network (random, never trained; weights frozen)
    for each class c:
        B_c^T <- batch_real random real images of class c;  B_c^S <- the synthetic images of class c
        A_c   <- one DSA transformation, applied to both batches (siamese), when augmentation is on
    L = sum_c || mean_{x in B_c^T} psi(A_c(x)) - mean_{s in B_c^S} psi(A_c(s)) ||^2
    S <- S - lr * grad_S L          (the shared loop steps the image optimiser)

``psi`` is the network's ``embed`` (penultimate features). Real embeddings carry no gradient.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

from infodistill.errors import UserInputError
from infodistill.methods.base import (
    DistillContext,
    Method,
    MethodDefaults,
    register_method,
)
from infodistill.models import DistillModel, parse_model_name
from infodistill.precision import to_fp32
from infodistill.settings import check_int

ClassBatches = Sequence[Tensor] | Tensor
"""Per-class image batches: a list (class c at position c; sizes may differ) or a K x n x C x H x W tensor."""


FORWARD_IMAGES_BY_DEVICE = {"cpu": 256, "cuda": 4096}
"""Real images per no-grad forward pass under ``max_forward_images="auto"`` (benchmarks/bench_distill.py)."""


@register_method("dm")
class DistributionMatching(Method):
    """Match the mean embedding of real and synthetic images per class under random networks.

    Speed: every class is augmented on its own (each needs its own DSA draw), but all real images
    are embedded in one forward pass and all synthetic images in another; the class means come
    from a reshape. With instance norm (the default ``ConvNet``) or no norm, a sample's embedding
    does not depend on the rest of its batch, so this is exactly the per-class computation. With
    batch-norm networks the batch statistics change with the batch: the original DM code embeds
    per class for instance-norm networks and all classes at once for batch-norm ones (which is
    what the default here does); ``per_class_forward=True`` embeds each class on its own.

    ``max_forward_images`` bounds the real images embedded in one forward pass (whole classes are
    never split), so that many classes (CIFAR-100, Tiny-ImageNet: 25,600 / 51,200 real images per
    iteration) do not exhaust device memory; ``None`` embeds every class at once; ``"auto"`` (default)
    takes the size measured fastest on the device (``FORWARD_IMAGES_BY_DEVICE``: on CPU one 256-image
    class at a time beat one 2,560-image pass by 1.5x, as large activations leave the cache; on GPUs
    large passes keep the device busy). It does not change the result for instance-norm networks. Synthetic
    images are always embedded together: their activations are kept for the backward pass either way.
    """

    process_split = "classes"
    bf16_measured = True  # 0.55x the time per iteration, accuracy within 0.1 points (docs/precision.md)

    @classmethod
    def split_problem(cls, model_name: str) -> str | None:
        """DM splits its classes over processes unless the network has batch norm, whose batch statistics
        mix the classes embedded in one forward pass."""
        problem = super().split_problem(model_name)
        if problem is not None:
            return problem
        if parse_model_name(model_name).norm == "bn":
            return (f"DM with batch-norm network '{model_name}' does not split its classes over processes: batch "
                    "statistics mix the classes of one forward pass; use an instance-norm or norm-free network")
        return None

    def __init__(
        self,
        batch_real: int = 256,
        per_class_forward: bool = False,
        max_forward_images: int | None | str = "auto",
    ) -> None:
        check_int(batch_real, "batch_real", owner="DM")
        if max_forward_images not in (None, "auto") and (
            isinstance(max_forward_images, bool) or not isinstance(max_forward_images, int) or max_forward_images < 1
        ):
            raise UserInputError(
                f"DM max_forward_images={max_forward_images!r} is invalid; it must be an integer >= 1, None or 'auto'"
            )
        self.batch_real = batch_real
        self.per_class_forward = bool(per_class_forward)
        self.max_forward_images = max_forward_images

    @staticmethod
    def defaults(ipc: int) -> MethodDefaults:
        """Published DM settings (the same at every IPC)."""
        return MethodDefaults(iterations=20000, lr_images=1.0, momentum_images=0.5, batch_real=256, augment=True)

    def iteration(self, context: DistillContext) -> Iterator[Tensor]:
        """One random network, one loss over all classes (those of ``context.owned_classes()``), one image update."""
        network = context.fresh_network()
        network.train()
        network.requires_grad_(False)

        real_by_class, synthetic_by_class = context.paired_class_batches(self.batch_real)
        yield self.matching_loss(network, real_by_class, synthetic_by_class)

    def matching_loss(
        self, network: DistillModel, real_by_class: ClassBatches, synthetic_by_class: ClassBatches
    ) -> Tensor:
        """``sum_c || mean embed(real_c) - mean embed(syn_c) ||^2``; gradients flow only to the synthetic side.

        Batches must already be augmented. ``network`` needs an ``embed(x) -> B x D`` method.
        """
        if len(real_by_class) != len(synthetic_by_class):
            raise ValueError(
                f"DM: {len(real_by_class)} real class batches but {len(synthetic_by_class)} synthetic ones"
            )
        with torch.no_grad():
            limit = self.max_forward_images
            if isinstance(limit, str):  # "auto", the one string the constructor accepts
                limit = FORWARD_IMAGES_BY_DEVICE.get(real_by_class[0].device.type, 4096)
            real_means = self._class_means(network, real_by_class, limit)
        synthetic_means = self._class_means(network, synthetic_by_class, None)
        return (real_means - synthetic_means).pow(2).sum()

    def _class_means(self, network: DistillModel, batches: ClassBatches, max_images: int | None) -> Tensor:
        """Mean embedding per class, ``K x D``, from as few forward passes as the settings allow."""
        if self.per_class_forward:
            return torch.stack([to_fp32(network.embed(batch)).flatten(1).mean(0) for batch in batches])
        means = [_embed_means(network, group) for group in _class_groups(batches, max_images)]
        return means[0] if len(means) == 1 else torch.cat(means)


def _class_groups(batches: ClassBatches, max_images: int | None) -> list[ClassBatches]:
    """Consecutive runs of whole classes holding at most ``max_images`` images (at least one class each)."""
    if max_images is None:
        return [batches]
    groups: list[ClassBatches] = []
    start, count = 0, 0
    for index in range(len(batches)):
        size = len(batches[index])
        if index > start and count + size > max_images:
            groups.append(batches[start:index])
            start, count = index, 0
        count += size
    groups.append(batches[start:])
    return groups


def _embed_means(network: DistillModel, batches: ClassBatches) -> Tensor:
    """Embed all classes of ``batches`` in one forward pass; return the per-class means (``K x D``).
    Embeddings computed in bf16 (mixed precision) are averaged in float32."""
    if isinstance(batches, Tensor):
        classes, per_class = batches.shape[:2]
        return to_fp32(network.embed(batches.flatten(0, 1))).reshape(classes, per_class, -1).mean(1)
    sizes = [len(batch) for batch in batches]
    embeddings = to_fp32(network.embed(torch.cat(list(batches)))).flatten(1)
    if len(set(sizes)) == 1:
        return embeddings.view(len(sizes), sizes[0], -1).mean(1)
    return torch.stack([chunk.mean(0) for chunk in embeddings.split(sizes)])
