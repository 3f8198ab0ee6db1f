"""Coreset baselines: real images chosen per class by a stated rule in a stated feature space.

A distilled set is only as good as what it beats at the same storage. Besides the random subset
(:func:`~infodistill.evaluate.random_subset`) the field compares against two classic selections, each
taking ``ipc`` real training images of every class:

- ``herding`` (Welling 2009, as iCaRL uses it): per class, greedily add the not yet selected sample
  that brings the mean of the selected features closest (Euclidean) to the class mean;
- ``kcenter`` (greedy k-center, Sener & Savarese 2018 use it as core-set): per class, start from the
  sample closest to the class mean, then repeatedly add the sample farthest from its nearest
  selected centre.

Ties go to the lowest index, so both rules are deterministic. The rules are pure functions of a
feature tensor and labels; :data:`SELECTION_RULES` maps each name to its function. The feature space
used by ``infodistill baseline --select`` is :func:`pool_features`: the L2-normalised embedding of the
first proxy of a proxy pool (docs/coresets.md).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from infodistill.artefact import DistilledSet, SetMetadata
from infodistill.data import RealData
from infodistill.errors import UserInputError

ClassRule = Callable[[Tensor, int], list[int]]
"""Selection within one class: (features n x d, k) -> k distinct row indices in selection order."""


def herding_class(features: Tensor, k: int) -> list[int]:
    """Herding in one class: step t adds the row x minimising ``|| mean - (sum_selected + x) / t ||``."""
    features = features.double()
    target = features.mean(dim=0)
    chosen: list[int] = []
    running = torch.zeros_like(target)
    available = torch.ones(len(features), dtype=torch.bool)
    for step in range(1, k + 1):
        gaps = ((running + features) / step - target).norm(dim=1)
        gaps[~available] = torch.inf
        index = int(torch.argmin(gaps))  # first minimum on ties
        chosen.append(index)
        available[index] = False
        running += features[index]
    return chosen


def kcenter_class(features: Tensor, k: int) -> list[int]:
    """Greedy k-center in one class: the row closest to the class mean, then repeatedly the row whose
    distance to its nearest selected centre is largest."""
    features = features.double()
    first = int(torch.argmin((features - features.mean(dim=0)).norm(dim=1)))
    chosen = [first]
    nearest = (features - features[first]).norm(dim=1)
    while len(chosen) < k:
        candidates = nearest.clone()
        candidates[chosen] = -torch.inf  # a selected row is at distance 0 already; guard against duplicates
        index = int(torch.argmax(candidates))  # first maximum on ties
        chosen.append(index)
        nearest = torch.minimum(nearest, (features - features[index]).norm(dim=1))
    return chosen


def _per_class(rule: ClassRule) -> Callable[[Tensor, Tensor, int, int], Tensor]:
    """Apply ``rule`` within every class; the result holds class 0's picks first, each in selection order."""

    def select(features: Tensor, labels: Tensor, ipc: int, num_classes: int) -> Tensor:
        check_selection(features, labels, ipc, num_classes)
        picks = []
        for label in range(num_classes):
            members = torch.nonzero(labels == label).flatten()
            local = rule(features[members], ipc)
            picks.append(members[torch.tensor(local, dtype=torch.long)])
        return torch.cat(picks)

    select.__doc__ = rule.__doc__
    return select


SELECTION_RULES: dict[str, Callable[[Tensor, Tensor, int, int], Tensor]] = {
    "herding": _per_class(herding_class),
    "kcenter": _per_class(kcenter_class),
}
"""Name -> ``select(features, labels, ipc, num_classes)``: indices into the rows, ``ipc`` per class,
class 0 first."""
SELECT_CHOICES = ("random", *SELECTION_RULES)
"""What ``infodistill baseline --select`` takes: ``random`` (no features) and the feature-based rules."""


def check_selection(features: Tensor, labels: Tensor, ipc: int, num_classes: int) -> None:
    """Refuse inputs a class-balanced selection cannot serve: shapes, ipc < 1, a class with fewer than ipc rows."""
    if features.dim() != 2 or labels.dim() != 1 or len(features) != len(labels):
        raise UserInputError(f"features must be N x D with N labels, got {list(features.shape)} and "
                             f"{list(labels.shape)}")
    check_class_sizes(labels, ipc, num_classes)


def check_class_sizes(labels: Tensor, ipc: int, num_classes: int) -> None:
    """Refuse ipc < 1 and a class with fewer than ``ipc`` rows (an empty class included), naming the class."""
    if isinstance(ipc, bool) or not isinstance(ipc, int) or ipc < 1:
        raise UserInputError(f"ipc must be a positive integer, got {ipc!r}")
    counts = torch.bincount(labels.long(), minlength=num_classes)
    for label, count in enumerate(counts.tolist()[:num_classes]):
        if count < ipc:
            raise UserInputError(f"class {label} has {count} training image(s), fewer than ipc {ipc}; "
                                 f"use --ipc {int(counts.min())} or less")


def select_indices(rule: str, features: Tensor, labels: Tensor, ipc: int, num_classes: int) -> Tensor:
    """The rows ``rule`` selects (``ipc`` per class, class 0 first); refuse an unknown rule by name."""
    if rule not in SELECTION_RULES:
        raise UserInputError(f"selection rule '{rule}' is not one of: {', '.join(SELECTION_RULES)}")
    return SELECTION_RULES[rule](features, labels, ipc, num_classes)


@torch.no_grad()
def pool_features(pool, images: Tensor, batch_size: int = 512) -> Tensor:
    """The feature space of the coreset rules: ``embed`` of the pool's first proxy (lowest file number),
    each row L2-normalised (as iCaRL normalises its features), float32 on the CPU."""
    network = pool[0]
    rows = [F.normalize(network.embed(batch.to(pool.device)).float(), dim=1).cpu()
            for batch in images.split(batch_size)]
    return torch.cat(rows)


def coreset_subset(real: RealData, rule: str, ipc: int, features: Tensor, seed: int,
                   feature_space: dict[str, str]) -> DistilledSet:
    """The real training images ``rule`` selects in ``features`` (one row per training image), as an
    artefact; ``SetMetadata.method`` is the rule and ``feature_space`` goes into ``extra``."""
    if len(features) != len(real.train_labels):
        raise UserInputError(f"{len(features)} feature rows for {len(real.train_labels)} training images")
    indices = select_indices(rule, features, real.train_labels, ipc, real.info.num_classes)
    metadata = SetMetadata(
        dataset=real.info.name,
        mean=tuple(real.info.mean),
        std=tuple(real.info.std),
        classes=tuple(real.info.class_names),
        method=rule,
        ipc=ipc,
        seed=seed,
        extra={"selection": rule, **feature_space},
    )
    images = real.normalise(real.train_images[indices]).float().contiguous()
    return DistilledSet(images=images, labels=real.train_labels[indices].long(), metadata=metadata)
