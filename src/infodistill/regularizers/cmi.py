"""The class-aware conditional mutual information (CMI) regularizer (Zhong et al., ICLR 2025).

A frozen, pre-trained proxy network f maps every synthetic image s to a point on the simplex,

    P_s = softmax(f.embed(s))             softmax over the proxy's penultimate features (512-d for
                                          ResNet18), temperature 1; NOT over the class logits

and each class y gets its centroid Q_y = mean of P_s over the samples of class y. The empirical CMI
of the labelled set S is how far, on average, a sample lies from its own class centroid:

    CMI(S) = mean over s in S of KL(P_s || Q_{y(s)})                              (KL form)
           = sum_y (|S_y| / |S|) * ( H(Q_y) - mean_{s in S_y} H(P_s) )            (entropy form)

The two forms are equal (the entropy form follows from sum_{s in S_y} P_s = |S_y| Q_y); the tests
check one against the other. Minimising it makes each class compact, which makes the set easier to
learn. Facts that matter when using it (see methods.md, section 1):

- it is computed on the synthetic images as stored: normalised, with no DSA augmentation;
- with one image per class (IPC 1) every Q_y equals its only P_s, so the term is identically 0 and
  does nothing unless the parameterisation yields several images per class;
- KL between near-flat 512-d softmaxes is tiny, hence the large published weights (thousands).

This module computes the term only. Its weight (lambda) and the option to compute it every k steps
are applied by the distillation loop, not here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from infodistill.errors import UserInputError
from infodistill.regularizers.base import Regularizer, RegularizerSetup, register_regularizer
from infodistill.settings import AT_LEAST_ONE, POSITIVE, setting
from infodistill.training import BATCHED_CHOICES

if TYPE_CHECKING:  # imported for type hints only
    from infodistill.models import DistillModel
    from infodistill.proxies import ProxyPool, StackedProxies

COMPUTE_DTYPE = torch.float64
"""The softmax/KL arithmetic runs in float64: it costs N x D elements, nothing beside a forward pass,
and keeps the small KL values free of float32 cancellation noise: a real-image Fashion-MNIST set at IPC 10
measures 4.5e-3 under instance-norm ResNet18 proxies (docs/cmi.md), and single images' KL terms go far lower."""


def vectorise_proxies(batched: str, device: torch.device) -> bool:
    """Whether several proxies run as one vmap pass ("on") or one after another ("off").

    "auto" picks vmap on CUDA only: on CPU a plain loop measured faster (ResNet18, 100 images of
    32x32, 4 proxies: forward+backward 4.2 s looped vs 10.1 s vmapped on 2 cores), as for training in
    :mod:`infodistill.training`. Both give the same values up to rounding (tests/test_cmi.py).
    """
    if batched not in BATCHED_CHOICES:
        raise UserInputError(f"batched '{batched}' is not one of: {', '.join(BATCHED_CHOICES)}")
    return batched == "on" or (batched == "auto" and torch.device(device).type == "cuda")


def _check_inputs(features: Tensor, labels: Tensor, num_classes: int) -> None:
    if features.dim() < 2:
        raise UserInputError(f"features must be N x D (or K x N x D), got shape {list(features.shape)}")
    count = features.shape[-2]
    if labels.dim() != 1 or len(labels) != count:
        raise UserInputError(f"labels must be one per sample ({count}), got shape {list(labels.shape)}")
    if count == 0:
        raise UserInputError("the CMI of an empty set is undefined; pass at least one sample")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise UserInputError(f"num_classes must be a positive integer, got {num_classes!r}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise UserInputError(f"labels must be integer class indices, got dtype {labels.dtype}")
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= num_classes:
        raise UserInputError(f"labels span {low}..{high}; allowed are 0..{num_classes - 1}")


def per_sample_kl(features: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """KL(P_s || Q_{y(s)}) for every sample: shape ``... x N`` for features ``... x N x D``.

    Leading dimensions (e.g. K proxies) are batched. ``log Q_y`` is computed as a log-mean-exp of
    the class's ``log P_s``, shifted per class and dimension by their maximum, so it is always finite
    and needs no clamp: a class with one sample gives exactly ``log Q_y = log P_s`` and a KL of exactly
    0, an empty class is never read, and no NaN or inf can appear in the value or the gradient. The
    shift is detached (``log Q`` does not depend on it), so gradients flow through both P and Q.
    """
    _check_inputs(features, labels, num_classes)
    labels = labels.to(device=features.device, dtype=torch.int64)
    log_p = F.log_softmax(features.to(COMPUTE_DTYPE), dim=-1)                   # ... x N x D
    p = log_p.exp()
    index = labels.reshape(*([1] * (log_p.dim() - 2)), -1, 1).expand_as(log_p)     # ... x N x D
    class_shape = (*log_p.shape[:-2], num_classes, log_p.shape[-1])              # ... x C x D
    shift = torch.full(class_shape, float("-inf"), dtype=log_p.dtype, device=log_p.device)
    shift = shift.scatter_reduce(-2, index, log_p.detach(), reduce="amax", include_self=True)
    sample_shift = shift.gather(-2, index)                                      # ... x N x D, finite
    one_hot = F.one_hot(labels, num_classes).to(log_p.dtype)                    # N x C
    # Per-class sums by one matmul (deterministic, vectorised over classes); >= 1 for every
    # non-empty class because its maximal sample contributes exp(0) = 1.
    class_sums = one_hot.transpose(0, 1) @ (log_p - sample_shift).exp()         # ... x C x D
    counts = one_hot.sum(dim=0)                                                 # C
    log_q = class_sums.gather(-2, index).log() + sample_shift - counts[labels].log().unsqueeze(-1)
    # at least float32: bf16 features (mixed precision) must not round the tiny KL values to bf16
    return (p * (log_p - log_q)).sum(dim=-1).to(torch.promote_types(features.dtype, torch.float32))


def cmi_from_features(features: Tensor, labels: Tensor, num_classes: int, per_class: bool = False) -> Tensor:
    """Empirical class-aware CMI of a labelled set from its proxy features (``N x D`` -> scalar).

    ``features`` may carry leading batch dimensions (``K x N x D`` -> K values, one per proxy).
    ``per_class=False``: the mean over all samples of KL(P_s || Q_{y(s)}) (the paper's rule for DM and
    DC/DSA). ``per_class=True``: the CMI of each class computed on that class alone (the mean KL of its
    own samples), averaged over the non-empty classes (IDC's variant, which applies the term class by
    class); both agree when all classes have the same size. Empty classes contribute nothing.
    """
    kl = per_sample_kl(features, labels, num_classes)                           # ... x N
    if not per_class:
        return kl.mean(dim=-1)
    one_hot = F.one_hot(labels.to(device=kl.device, dtype=torch.int64), num_classes).to(kl.dtype)
    counts = one_hot.sum(dim=0)
    present = counts > 0
    class_means = (kl @ one_hot)[..., present] / counts[present]                # ... x C_present
    return class_means.mean(dim=-1)


def cmi_share_from_features(features: Tensor, labels: Tensor, num_classes: int, total_samples: int,
                            total_classes: int, per_class: bool = False) -> Tensor:
    """The part of a set's CMI carried by the samples of (features, labels), whole classes of a set of
    ``total_samples`` samples in ``total_classes`` (non-empty) classes.

    A sample's KL(P_s || Q_y) depends only on the samples of its own class, so the CMI splits exactly
    over classes: ``per_class=False``: the sum of these samples' KL divided by ``total_samples``;
    ``per_class=True``: the sum of these classes' mean KL divided by ``total_classes``. Over a
    partition of the classes the shares sum to :func:`cmi_from_features` of the whole set.
    """
    kl = per_sample_kl(features, labels, num_classes)                           # ... x N
    if not per_class:
        return kl.sum(dim=-1) / total_samples
    one_hot = F.one_hot(labels.to(device=kl.device, dtype=torch.int64), num_classes).to(kl.dtype)
    counts = one_hot.sum(dim=0)
    present = counts > 0
    return ((kl @ one_hot)[..., present] / counts[present]).sum(dim=-1) / total_classes


def empirical_cmi(
    proxy: DistillModel, images: Tensor, labels: Tensor, num_classes: int, per_class: bool = False
) -> Tensor:
    """CMI of (images, labels) under one proxy: :func:`cmi_from_features` of ``proxy.embed(images)``."""
    return cmi_from_features(proxy.embed(images), labels, num_classes, per_class=per_class)


def cmi_per_proxy(
    proxies: StackedProxies, images: Tensor, labels: Tensor, num_classes: int, per_class: bool = False
) -> Tensor:
    """CMI under each of K stacked proxies, in one vectorised pass: K values.

    The K embeddings come from one ``torch.func.vmap`` over the stacked weights
    (:meth:`infodistill.proxies.StackedProxies.embed`); the K CMIs are then one batched computation.
    """
    return cmi_from_features(proxies.embed(images), labels, num_classes, per_class=per_class)


@dataclass(frozen=True)
class CMISettings:
    """Settings of the class-aware CMI regularizer (on with ``cmi_weight`` 'auto' or above 0)."""

    title: ClassVar[str] = "CMI regularizer"
    cmi_weight: float | str | None = setting(
        None, "weight lambda of the CMI regularizer, or 'auto' (docs/cmi.md)", metavar="FLOAT|auto",
        default_text="off; with --proxies, the method's published weight where it has one")
    cmi_auto_scale: float = setting(1.0, "'auto' sets lambda so that the CMI's gradient is S x the paper's ratio to "
                                    "the matching loss's gradient on the initial set (docs/cmi.md)",
                                    bounds=POSITIVE, metavar="S")
    proxies: str | None = setting(None, "proxy pool for CMI (build with `infodistill proxies`)", metavar="DIR",
                                  default_text="none")
    held_out_proxies: str | None = setting(
        None, "a second pool, disjoint from --proxies, under which the set's CMI is also logged "
        "(monitor/cmi_heldout): the CMI of networks the term never saw", metavar="DIR", default_text="none")
    cmi_every: int = setting(1, "compute the CMI term every K iterations", bounds=AT_LEAST_ONE, metavar="K")
    cmi_proxies_per_step: int = setting(1, "average CMI over K random proxies per step (1 is the paper's rule)",
                                        bounds=AT_LEAST_ONE, metavar="K")


def cmi_weight_active(weight: float | str | None) -> bool:
    """Whether a CMI weight turns the term on: ``'auto'`` or a number above 0."""
    return weight == "auto" or (isinstance(weight, (int, float)) and not isinstance(weight, bool) and weight > 0)


@register_regularizer("cmi")
class CMIRegularizer(Regularizer):
    """The CMI term over the synthetic set, under proxies drawn at random from a pool.

    ``proxies_per_step=1`` is the paper's rule: each call draws ONE proxy uniformly at random with the
    given generator and returns its CMI. ``proxies_per_step=k > 1`` draws k distinct proxies and
    returns the mean of their CMIs (a lower-variance estimate of the pool-averaged term, at k times
    the compute), computed in one vmap pass or proxy by proxy as ``batched`` says (see
    :func:`vectorise_proxies`). ``per_class=True`` selects IDC's per-class variant (see
    :func:`cmi_from_features`). The indices drawn by the last call are kept in ``last_indices`` for
    logging. The weight lambda and the "compute every k steps" switch belong to the distillation loop.
    """

    settings = CMISettings
    config_fields = frozenset({"cmi_every", "cmi_proxies_per_step", "cmi_auto_scale"})
    switch = "cmi_weight > 0 or 'auto'"
    weight_field = "cmi_weight"

    @classmethod
    def enabled(cls, config: Any) -> bool:
        return cmi_weight_active(config.cmi_weight)

    @classmethod
    def build(cls, setup: RegularizerSetup) -> CMIRegularizer:
        """The term under the run's pool (validation refuses a CMI weight without ``--proxies``)."""
        if setup.pool is None:
            raise UserInputError("a CMI weight needs a proxy pool: pass --proxies DIR")
        return cls(setup.pool, proxies_per_step=setup.config.cmi_proxies_per_step)

    @classmethod
    def every(cls, config: Any) -> int:
        return int(config.cmi_every)

    @classmethod
    def artefact_metadata(cls, config: Any) -> dict[str, str]:
        """The pool and how the term drew from it (the weight is in the artefact's regularizer weights)."""
        return {"proxies": str(config.proxies), "cmi_every": str(config.cmi_every),
                "cmi_proxies_per_step": str(config.cmi_proxies_per_step)}

    def __init__(
        self, pool: ProxyPool, proxies_per_step: int = 1, per_class: bool = False, batched: str = "auto"
    ) -> None:
        if (isinstance(proxies_per_step, bool) or not isinstance(proxies_per_step, int)
                or not 1 <= proxies_per_step <= len(pool)):
            raise UserInputError(
                f"proxies_per_step={proxies_per_step!r} is not allowed; use 1..{len(pool)} (the pool's size)"
            )
        pool.require_pooled("the CMI regularizer")
        self.pool = pool
        self.proxies_per_step = proxies_per_step
        self.per_class = per_class
        self.vectorised = vectorise_proxies(batched, pool.device)
        self.last_indices: tuple[int, ...] = ()

    class_decomposable = True

    def loss(self, images: Tensor, labels: Tensor, generator: torch.Generator) -> Tensor:
        """CMI of (images, labels) under the proxy (or the mean over the k proxies) drawn with ``generator``."""
        num_classes = self.pool.num_classes
        return self._over_drawn_proxies(images, generator, lambda features: cmi_from_features(
            features, labels, num_classes, per_class=self.per_class))

    def class_share(self, images: Tensor, labels: Tensor, generator: torch.Generator, total_samples: int,
                    total_classes: int) -> Tensor:
        """The share of these classes in the CMI of the whole set (:func:`cmi_share_from_features`), under
        the same proxy draw as :meth:`loss`."""
        num_classes = self.pool.num_classes
        return self._over_drawn_proxies(images, generator, lambda features: cmi_share_from_features(
            features, labels, num_classes, total_samples, total_classes, per_class=self.per_class))

    def _over_drawn_proxies(self, images: Tensor, generator: torch.Generator,
                            value: Callable[[Tensor], Tensor]) -> Tensor:
        """``value`` of the drawn proxy's features of ``images``, or its mean over the k drawn proxies."""
        if self.proxies_per_step == 1:
            index = self.pool.sample_index(generator)
            self.last_indices = (index,)
            return value(self.pool[index].embed(images))
        indices = self.pool.sample_indices(self.proxies_per_step, generator)
        self.last_indices = tuple(indices)
        if self.vectorised:
            values = value(self.pool.stacked(indices).embed(images))
        else:
            values = torch.stack([value(self.pool[index].embed(images)) for index in indices])
        return values.mean()


@torch.no_grad()
def pool_cmi(
    pool: ProxyPool,
    images: Tensor,
    labels: Tensor,
    num_classes: int,
    chunk: int = 16,
    image_batch: int = 512,
    batched: str = "auto",
) -> Tensor:
    """The empirical CMI of (images, labels) under EVERY proxy of ``pool``: K values, no gradient.

    With vmap (``batched``, see :func:`vectorise_proxies`) the pool is processed ``chunk`` proxies at a
    time; images go through in batches of ``image_batch`` (features do not depend on the batch: the
    proxies are in eval mode). Both bound memory.
    """
    for name, value in (("chunk", chunk), ("image_batch", image_batch)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UserInputError(f"{name} must be a positive integer, got {value!r}")
    pool.require_pooled()
    vectorised = vectorise_proxies(batched, pool.device)
    images = images.to(pool.device)
    labels = labels.to(pool.device)
    batches = images.split(image_batch)
    values = []
    for start in range(0, len(pool), chunk if vectorised else 1):
        if vectorised:
            stacked = pool.stacked(range(start, min(start + chunk, len(pool))))
            features = torch.cat([stacked.embed(batch) for batch in batches], dim=1)
        else:
            features = torch.cat([pool[start].embed(batch) for batch in batches]).unsqueeze(0)
        values.append(cmi_from_features(features, labels, num_classes))
    return torch.cat(values)
