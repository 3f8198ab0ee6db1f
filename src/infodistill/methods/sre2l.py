"""SRe2L (Yin, Xing & Shen, NeurIPS 2023) and DWA (Du et al., NeurIPS 2024): recovery from a trained teacher.

SRe2L has three stages. *Squeeze*: train a teacher with batch-norm layers on the real data (here a proxy
pool written by ``infodistill proxies --arch ConvNet-3-bn``; the first network of the pool is the
teacher). *Recover*: optimise images, starting from noise, so that the teacher classifies them as their
labels and so that, at every batch-norm layer, the statistics of the layer's input over a batch match
the layer's running statistics (which summarise the real data). *Relabel*: the student is trained on
the teacher's soft labels at temperature T. No real image is read during recovery.

Recovery loss of one batch B (the j-th image of every class; SRe2L synthesises batch by batch, and the
batch-norm statistics are per batch), with the teacher in eval mode (running statistics never change)::

    R_l(B)  = || mu_l(B) - running_mean_l ||_2 + variance_weight * || var_l(B) - running_var_l ||_2
    L(B)    = CE(teacher(A(B)), labels) + bn_weight * (first_bn_weight * R_1(B) + sum_{l >= 2} R_l(B))

``mu_l``/``var_l`` are the per-channel mean and biased variance of the INPUT of BN layer l over the
batch and all spatial positions; layers are numbered in module order (as the official hooks are);
CE is the batch mean. ``A`` is the random augmentation of the batch, drawn afresh every iteration and
for every batch from the iteration's generator: an optional horizontal flip (``flip``), then a
circular shift (``torch.roll``) by (dy, dx), each uniform in {0, ..., jitter}. Here all ipc batches
are optimised together in one loop iteration: the method yields ``sum_j L(B_j)``. The batches share
no pixels and Adam is elementwise, so this is the same as optimising every batch on its own with the
same optimiser settings. After every step the loop calls :meth:`SRe2L.project`, which clips the
pixels to the valid range [0, 1] mapped into the normalised space: ``(0 - mean) / std`` to
``(1 - mean) / std`` per channel. Parameterisations other than plain pixels (no ``pixels`` attribute,
e.g. multi-formation) are not clipped. The loop refuses ``--zca`` for these methods
(``clips_to_pixel_range``): whitened images have no pixel range.

For speed, SRe2L runs all batches through the teacher in one forward pass: in eval mode a network
processes every sample on its own, so the outputs are those of one pass per batch; the batch-norm
hooks split each layer's input back into the batches before computing the statistics.

DWA ("Diversity-Driven Synthesis: Enhancing Dataset Distillation through Directed Weight Adjustment")
changes SRe2L in three places. Images start from real samples (init ``real``, required). Before a
batch is synthesised the teacher's weights are moved by ``dwa_steps`` = K normalised gradient-ascent
steps on the cross-entropy of the batch's initial (real) images::

    theta_0 = theta;   theta_{k+1} = theta_k + (rho / K) * g_k / (||g_k||_2 + 1e-12),
    g_k = grad_theta CE(f(theta_k; A_0(B_j^init)), labels)

with ``||.||_2`` the norm of all parameter gradients together (one global norm, as the official
``Perterb.first_step``), no final rescaling; ``A_0`` is one jitter/flip draw shared by the K steps
(the official code computes the perturbation at its first iteration, on the jittered batch). So
``||theta_K - theta|| <= rho`` with equality when all normalised gradients point the same way (always
for K = 1). Only parameters move; the running statistics stay the teacher's, and every pass is in eval
mode. The batch is then recovered against its perturbed teacher ``theta_K^(j)`` (kept for the whole run;
evaluated with ``torch.func.functional_call``), and the variance term is weighted up. Relabelling uses
the unperturbed teacher. Here the ipc perturbed parameter sets are computed once in :meth:`DWA.prepare`
from the set's initial images, which the loop has just drawn from real images; on resume the loop
draws the same real images from its seeded stream before the checkpoint is restored, and ``prepare``
draws the same augmentation from the setup stream, so the perturbations are the same. Memory: one
copy of the teacher's parameters per batch, i.e. ipc copies (ResNet-18 at ipc 50: about 2.2 GB in
float32); the images of every batch go through the teacher in their own forward pass.

Relabelling here: the artefact stores ``soft_labels = softmax(teacher(x) / T)`` of the final images
(unaugmented, unperturbed teacher) and the metadata ``teacher`` and ``relabel_temperature``;
``infodistill evaluate`` then trains with the knowledge-distillation recipe. (The official relabel
queries the teacher online on every augmented, mixed-up minibatch, which a stored set cannot hold.)

Published settings for small images, and where they come from:

- SRe2L, CIFAR recovery (VILA-Lab/SRe2L, ``SRe2L/*small_dataset/recover_cifar.py`` and
  ``recover_cifar.sh``): Adam lr 0.25, betas (0.5, 0.9), eps 1e-8, cosine schedule
  ``lr * 0.5 * (1 + cos(pi * t / T))`` without warm-up, 1000 iterations, noise init (standard normal in
  the normalised space), ``r_bn`` 0.01 (the script's argparse default is 0.05; the published run
  script passes 0.01), first-BN multiplier 10, jitter 4 with shifts drawn from {0, ..., 4}, no flip
  (the Tiny-ImageNet script adds random-resized-crop and flip, and shifts in {-4, ..., 4}; random-resized
  crop is not implemented here), clipping to the pixel range after every step, batch = one image
  of every class (batch size 100 on CIFAR-100), variance and mean terms weighted 1 each.
- SRe2L relabel (``relabel_cifar.py``): temperature 30.
- DWA, CIFAR (AngusDujw/Diversity-Driven-Synthesis, ``scripts/run_cifar.sh``, ``distillation/perterb.py``,
  ``distillation/utils.py``): the same recovery settings (lr 0.25, r_bn 0.01, 1000 iterations, jitter 4,
  first-BN multiplier 10), rho 0.015, K = 12 steps, variance weight (``--r-var``) 11, real init,
  relabel temperature 30 (``validation/validation_cifar.py``). Tiny-ImageNet uses the same rho, K and
  variance weight with lr 0.1 and 2000 iterations (``scripts/run_tiny.sh``).

Not verified: the teachers differ (the official CIFAR teachers are a ResNet-18 with a 3x3 stem trained
200 epochs; here any batch-norm model of a proxy pool), and no published setting exists for
Fashion-MNIST or other grey-scale data; the CIFAR settings are used for every dataset. The official
DWA init images are "randomly sampled" real images saved beforehand; how they were drawn is not in
the code.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from infodistill.errors import UserInputError
from infodistill.methods.base import (
    DistillContext,
    Method,
    MethodDefaults,
    MethodSetup,
    register_method,
)
from infodistill.models.norm import BATCH_NORM_TYPES
from infodistill.settings import AT_LEAST_ONE, NON_NEGATIVE, POSITIVE, setting
from infodistill.synthetic import SyntheticSet

RELABEL_CHUNK = 512
"""Images per no-grad teacher pass when relabelling."""

Augmentation = tuple[bool, int, int]
"""One batch's augmentation: (flip horizontally first, shift down by dy, shift right by dx)."""


def batch_norm_layers(network: nn.Module) -> list[nn.Module]:
    """The network's batch-norm layers in module order (the first one gets ``first_bn_weight``)."""
    return [module for module in network.modules() if isinstance(module, BATCH_NORM_TYPES)]


class _StatisticsProbe:
    """Forward hooks on batch-norm layers that record, for every group of consecutive samples of the
    layer's input, ``||mu - running_mean|| + variance_weight * ||var - running_var||`` (a vector, one
    value per group). Used as a context manager; the hooks are removed on exit."""

    def __init__(self, layers: list[nn.Module], groups: int, variance_weight: float) -> None:
        self.layers = layers
        self.groups = groups
        self.variance_weight = variance_weight
        self.distances: list[Tensor] = []
        self._handles: list[Any] = []

    def __enter__(self) -> _StatisticsProbe:
        self._handles = [layer.register_forward_hook(self._record) for layer in self.layers]
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _record(self, module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        features = inputs[0]
        grouped = features.reshape(self.groups, -1, *features.shape[1:])  # groups x n x channels x ...
        dims = [1, *range(3, grouped.dim())]
        mean = grouped.mean(dim=dims)
        variance = grouped.var(dim=dims, correction=0)
        # a batch-norm layer tracking statistics (batch_norm_layers); nn.Module types its buffers as Tensor | Module
        running_mean = cast(Tensor, module.running_mean).to(features.dtype)
        running_var = cast(Tensor, module.running_var).to(features.dtype)
        distance = (mean - running_mean).norm(dim=1) + self.variance_weight * (variance - running_var).norm(dim=1)
        self.distances.append(distance)


def recovery_terms(
    teacher: nn.Module,
    batches: Tensor,
    labels: Tensor,
    first_bn_weight: float,
    variance_weight: float,
    parameters: dict[str, Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """Per batch: the cross-entropy and the batch-norm statistics term of the SRe2L recovery loss.

    ``batches`` is G x K x C x H x W (G batches of K images; each batch's statistics are computed on
    that batch alone), ``labels`` the K labels shared by every batch. All batches go through the
    teacher in one pass, which must be in eval mode (so samples do not interact); ``parameters``
    replaces the teacher's parameters (DWA's perturbed weights) through ``functional_call``.
    Returns (cross_entropy, batch_norm), two G-vectors; the loss of batch g is
    ``cross_entropy[g] + bn_weight * batch_norm[g]`` with
    ``batch_norm = first_bn_weight * R_1 + sum_{l >= 2} R_l``.
    """
    groups, per_batch = batches.shape[:2]
    layers = batch_norm_layers(teacher)
    if not layers:
        raise UserInputError("the SRe2L batch-norm term needs a teacher with batch-norm layers; this one has none")
    with _StatisticsProbe(layers, groups, variance_weight) as probe:
        flat = batches.reshape(groups * per_batch, *batches.shape[2:])
        logits = teacher(flat) if parameters is None else functional_call(teacher, parameters, (flat,))
    cross_entropy = F.cross_entropy(logits, labels.repeat(groups), reduction="none").view(groups, per_batch).mean(1)
    weights = [first_bn_weight] + [1.0] * (len(probe.distances) - 1)
    batch_norm = sum(weight * distance for weight, distance in zip(weights, probe.distances))
    return cross_entropy, batch_norm  # type: ignore[return-value]


def draw_augmentations(count: int, jitter: int, flip: bool, generator: torch.Generator) -> list[Augmentation]:
    """``count`` independent draws, in order: per batch, a flip coin (only when ``flip``), then dy, dx
    uniform in {0, ..., jitter}."""
    draws = []
    for _ in range(count):
        flipped = bool(torch.rand((), generator=generator) < 0.5) if flip else False
        dy, dx = (int(value) for value in torch.randint(0, jitter + 1, (2,), generator=generator))
        draws.append((flipped, dy, dx))
    return draws


def augment_batches(batches: Tensor, draws: list[Augmentation]) -> Tensor:
    """Apply one draw to each batch of ``batches`` (G x K x C x H x W): flip (width), then circular shift."""
    augmented = []
    for batch, (flipped, dy, dx) in zip(batches, draws):
        if flipped:
            batch = batch.flip(-1)
        if dy or dx:
            batch = torch.roll(batch, shifts=(dy, dx), dims=(-2, -1))
        augmented.append(batch)
    return torch.stack(augmented)


@torch.no_grad()
def teacher_soft_labels(teacher: nn.Module, images: Tensor, temperature: float) -> Tensor:
    """SRe2L's relabelling: ``softmax(teacher(images) / temperature)``, the teacher in eval mode, in chunks."""
    teacher.eval()
    device = next(teacher.parameters()).device
    logits = torch.cat([teacher(chunk.to(device)) for chunk in images.split(RELABEL_CHUNK)])
    return torch.softmax(logits.float() / temperature, dim=1).to(images.device)


@dataclass(frozen=True)
class RecoverSettings:
    """Settings of SRe2L's recovery from a teacher (DWA reads them too)."""

    title: ClassVar[str] = "SRe2L / DWA"
    teacher: str | None = setting(None, "teacher with batch norm: a proxy directory, e.g. `infodistill proxies "
                                  "--arch ConvNet-3-bn`", metavar="DIR", default_text="none")
    relabel_temperature: float | None = setting(None, "temperature of the soft labels", bounds=POSITIVE,
                                                metavar="T", default_text="the method's")
    bn_weight: float | None = setting(None, "weight of the BN-statistics term", bounds=NON_NEGATIVE, metavar="W",
                                      default_text="the method's")
    first_bn_weight: float | None = setting(None, "multiplier of the first BN layer's term", bounds=NON_NEGATIVE,
                                            metavar="W", default_text="the method's")
    variance_weight: float | None = setting(None, "weight of the variance part of the BN term",
                                            bounds=NON_NEGATIVE, metavar="W", default_text="the method's")
    jitter: int | None = setting(None, "random shift of the images per iteration", bounds=NON_NEGATIVE,
                                 metavar="PIXELS", default_text="the method's")


@dataclass(frozen=True)
class DWASettings:
    """DWA's weight perturbation of the teacher."""

    title: ClassVar[str] = "DWA"
    dwa_rho: float | None = setting(None, "size of the weight perturbation", bounds=NON_NEGATIVE, metavar="RHO",
                                    default_text="the method's")
    dwa_steps: int | None = setting(None, "ascent steps of the perturbation", bounds=AT_LEAST_ONE, metavar="K",
                                    default_text="the method's")


@register_method("sre2l")
class SRe2L(Method):
    """SRe2L recovery: cross-entropy of a trained batch-norm teacher plus per-batch BN-statistics matching."""

    reads_real_data = False
    clips_to_pixel_range = True
    reads_from_loop = frozenset()  # its own jitter/flip augmentation, never the loop's DSA
    process_split = "images"
    """Split by image: the loss is a sum over batches, and batch j holds the j-th image of every class
    only, so process r recovers the batches of its positions (``docs/distributed.md``)."""

    def __init__(
        self,
        teacher: str | None = None,
        relabel_temperature: float = 30.0,
        bn_weight: float = 0.01,
        first_bn_weight: float = 10.0,
        variance_weight: float = 1.0,
        jitter: int = 4,
        flip: bool = False,
    ) -> None:
        if teacher is None or str(teacher) == "":
            raise UserInputError(
                f"method '{self.name}' needs a teacher: pass --teacher DIR, a proxy pool of a batch-norm network "
                "(train one with `infodistill proxies --arch ConvNet-3-bn --count 1 --out DIR`)"
            )
        numbers = (("relabel_temperature", relabel_temperature, True), ("bn_weight", bn_weight, False),
                   ("first_bn_weight", first_bn_weight, False), ("variance_weight", variance_weight, False))
        for name, value, positive in numbers:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value < 0 or (positive and value == 0):
                bound = "> 0" if positive else ">= 0"
                raise UserInputError(f"{name} must be a finite number {bound}, got {value!r}")
        if isinstance(jitter, bool) or not isinstance(jitter, int) or jitter < 0:
            raise UserInputError(f"jitter must be an integer >= 0 (pixels), got {jitter!r}")
        self.teacher = str(teacher)
        self.relabel_temperature = float(relabel_temperature)
        self.bn_weight = float(bn_weight)
        self.first_bn_weight = float(first_bn_weight)
        self.variance_weight = float(variance_weight)
        self.jitter = jitter
        self.flip = bool(flip)
        self.network: nn.Module | None = None
        self.synthetic: SyntheticSet | None = None
        self.pixel_range: tuple[Tensor, Tensor] | None = None

    @staticmethod
    def defaults(ipc: int) -> MethodDefaults:
        """SRe2L's CIFAR recovery settings (the same at every IPC); momentum_images is unused by Adam."""
        return MethodDefaults(iterations=1000, lr_images=0.25, momentum_images=0.0, batch_real=256, augment=False,
                              init="noise", optimizer="adam", betas=(0.5, 0.9), lr_schedule="cosine")

    def prepare(self, setup: MethodSetup) -> None:
        """Load the teacher (first network of the pool), refuse one without batch norm, keep the set."""
        from infodistill.models import parse_model_name
        from infodistill.models.registry import ModelSpec
        from infodistill.proxies import load_proxy_pool

        pool = load_proxy_pool(self.teacher, setup.info, device=str(setup.device), cache=setup.cache)
        network = pool[0]
        if not batch_norm_layers(network):
            spec = parse_model_name(pool.arch)
            wanted = ModelSpec(spec.family, spec.depth, spec.width, "bn").canonical_name
            raise UserInputError(
                f"method '{self.name}' needs a teacher with batch-norm layers, but the teacher in '{self.teacher}' "
                f"is a {pool.arch}; train one with `infodistill proxies --arch {wanted} --count 1 --out DIR`"
            )
        self.network = network.eval().requires_grad_(False)
        self.synthetic = setup.synthetic
        mean = torch.tensor(setup.info.mean, dtype=torch.float32, device=setup.device).view(-1, 1, 1)
        std = torch.tensor(setup.info.std, dtype=torch.float32, device=setup.device).view(-1, 1, 1)
        self.pixel_range = ((0.0 - mean) / std, (1.0 - mean) / std)

    def _teacher(self) -> nn.Module:
        if self.network is None:
            raise RuntimeError(f"method '{self.name}': prepare() must run before the teacher is used")
        return self.network

    def batches(self, synthetic: SyntheticSet) -> Tensor:
        """The set's images as SRe2L's batches: batch j holds the j-th image of every class (ipc x K x C x H x W)."""
        return synthetic.images_by_class().transpose(0, 1)

    def iteration(self, context: DistillContext) -> Iterator[Tensor]:
        """One loss, the sum over the ipc batches of each batch's recovery loss, and one image update.
        In a run split by image only the batches of ``context.owned_image_positions()`` are computed; each
        batch's augmentation comes from its position's own stream (``context.position_generator``)."""
        batches = self.batches(context.synthetic)
        positions = context.owned_image_positions()
        draws = [draw_augmentations(1, self.jitter, self.flip, context.position_generator(position))[0]
                 for position in positions]
        if len(positions) < len(batches):
            batches = batches[positions]
        augmented = augment_batches(batches, draws)
        labels = torch.arange(batches.shape[1], device=batches.device)
        yield self.batch_losses(augmented, labels, positions).sum()

    def batch_losses(self, batches: Tensor, labels: Tensor, positions: Sequence[int] | None = None) -> Tensor:
        """Recovery loss of every batch (already augmented), as a G-vector; ``positions``: which batches of
        the set these are (all of them, in order, when None)."""
        cross_entropy, batch_norm = recovery_terms(self._teacher(), batches, labels, self.first_bn_weight,
                                                   self.variance_weight)
        return cross_entropy + self.bn_weight * batch_norm

    @torch.no_grad()
    def project(self, synthetic: SyntheticSet) -> None:
        """Clip pixel images to the valid range (SRe2L's ``clip`` after every step); other sets are left as they are."""
        pixels = getattr(synthetic, "pixels", None)
        if pixels is None or self.pixel_range is None:
            return
        low, high = self.pixel_range
        pixels.copy_(torch.maximum(torch.minimum(pixels, high.to(pixels)), low.to(pixels)))

    def soft_labels(self, images: Tensor) -> Tensor:
        """``softmax(teacher(images) / T)`` with the unperturbed teacher."""
        return teacher_soft_labels(self._teacher(), images, self.relabel_temperature)

    def artefact_tensors(self) -> dict[str, Tensor]:
        if self.synthetic is None:
            return {}
        return {"soft_labels": self.soft_labels(self.synthetic.images().detach())}

    def artefact_metadata(self) -> dict[str, str]:
        return {"teacher": self.teacher, "relabel_temperature": repr(self.relabel_temperature)}


def perturb_parameters(
    network: nn.Module, images: Tensor, labels: Tensor, rho: float, steps: int
) -> dict[str, Tensor]:
    """DWA's directed weight adjustment: ``steps`` gradient-ascent steps of size ``rho / steps`` on the
    cross-entropy of ``images``, each along the gradient normalised by the global norm of all parameter
    gradients (plus 1e-12), with the network in eval mode. Returns new parameter tensors (by name);
    the network's own parameters and buffers are left unchanged."""
    if network.training:
        raise ValueError("perturb_parameters needs the network in eval mode (running statistics must not change)")
    parameters = {name: parameter.detach().clone() for name, parameter in network.named_parameters()}
    step_size = rho / steps
    for _ in range(steps):
        current = {name: tensor.requires_grad_(True) for name, tensor in parameters.items()}
        with torch.enable_grad():
            loss = F.cross_entropy(functional_call(network, current, (images,)), labels)
            gradients = torch.autograd.grad(loss, list(current.values()), allow_unused=True)
        present = [gradient for gradient in gradients if gradient is not None]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in present])) if present \
            else torch.zeros(())
        scale = step_size / (norm + 1e-12)
        parameters = {
            name: (tensor.detach() + gradient * scale) if gradient is not None else tensor.detach()
            for (name, tensor), gradient in zip(current.items(), gradients)
        }
    return parameters


@register_method("dwa")
class DWA(SRe2L):
    """SRe2L recovery where every batch is recovered against its own teacher, perturbed towards a
    higher loss on the batch's real initial images (directed weight adjustment)."""

    def __init__(self, dwa_rho: float = 0.015, dwa_steps: int = 12, variance_weight: float = 11.0,
                 **settings: Any) -> None:
        super().__init__(variance_weight=variance_weight, **settings)
        if isinstance(dwa_rho, bool) or not isinstance(dwa_rho, (int, float)) or not math.isfinite(dwa_rho) \
                or dwa_rho < 0:
            raise UserInputError(f"dwa_rho must be a finite number >= 0, got {dwa_rho!r}")
        if isinstance(dwa_steps, bool) or not isinstance(dwa_steps, int) or dwa_steps < 1:
            raise UserInputError(f"dwa_steps must be an integer >= 1, got {dwa_steps!r}")
        self.dwa_rho = float(dwa_rho)
        self.dwa_steps = dwa_steps
        self.perturbed: dict[int, dict[str, Tensor]] = {}

    @staticmethod
    def defaults(ipc: int) -> MethodDefaults:
        """DWA's CIFAR settings: SRe2L's recovery, from real images."""
        return MethodDefaults(iterations=1000, lr_images=0.25, momentum_images=0.0, batch_real=256, augment=False,
                              init="real", optimizer="adam", betas=(0.5, 0.9), lr_schedule="cosine")

    def prepare(self, setup: MethodSetup) -> None:
        """Load the teacher, then one perturbed parameter set per batch from the batch's initial real images."""
        if setup.init != "real":
            raise UserInputError(
                f"method 'dwa' needs init 'real' (its weight adjustment uses each batch's real initial images), "
                f"got init '{setup.init}'"
            )
        super().prepare(setup)
        teacher = self._teacher()
        with torch.no_grad():
            initial = self.batches(setup.synthetic).detach().clone()
        draws = draw_augmentations(len(initial), self.jitter, self.flip, setup.generator)
        initial = augment_batches(initial, draws)
        labels = torch.arange(initial.shape[1], device=initial.device)
        positions = range(len(initial)) if setup.image_positions is None else setup.image_positions
        self.perturbed = {position: perturb_parameters(teacher, initial[position], labels, self.dwa_rho,
                                                       self.dwa_steps) for position in positions}

    def batch_losses(self, batches: Tensor, labels: Tensor, positions: Sequence[int] | None = None) -> Tensor:
        """Recovery loss of every batch against that batch's perturbed teacher (one pass per batch)."""
        positions = list(range(len(batches))) if positions is None else list(positions)
        missing = [position for position in positions if position not in self.perturbed]
        if len(positions) != len(batches) or missing:
            raise RuntimeError(
                f"DWA holds perturbed teachers for batches {sorted(self.perturbed)}, asked for {positions}"
            )
        teacher = self._teacher()
        losses = []
        for batch, position in zip(batches, positions):
            parameters = self.perturbed[position]
            cross_entropy, batch_norm = recovery_terms(teacher, batch.unsqueeze(0), labels, self.first_bn_weight,
                                                       self.variance_weight, parameters)
            losses.append(cross_entropy + self.bn_weight * batch_norm)
        return torch.cat(losses)
