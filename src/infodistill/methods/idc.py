"""IDC: Dataset Condensation via Efficient Synthetic-Data Parameterization (Kim et al., ICML 2022).

The synthetic set is a multi-formation set (``param: multi``, :mod:`infodistill.synthetic.multi`):
every stored image decodes into ``factor**2`` images. One iteration, as in the paper's algorithm box:

    theta <- a freshly initialised network;  SGD(theta; lr_net, momentum 0.9, weight decay 5e-4)
    for outer in 1..outer_loop:
        for each class c:
            B_c^T <- batch_real random real images of class c
            B_c^S <- the decoded synthetic images of class c (at most batch_syn of them, drawn at random)
            A_c   <- one DSA draw applied to both batches (siamese)                 [augment on]
            L_c   = D(grad_theta CE(theta; A_c(B_c^T), c), grad_theta CE(theta; A_c(B_c^S), c))
            S     <- S - lr_images * grad_S L_c    (one image update per class: ``yield ClassUpdate(L_c, c)``)
        if outer is the last one: stop
        train theta ONLINE ON REAL DATA: net_steps SGD steps on minibatches of batch_net random real
        images of all classes (per-sample DSA when augment is on)

``D`` (:func:`match_distance`) sums over the matched layers, which are the convolution weights only
(the official ``--bias False --fc False``: biases, norm parameters and the linear classifier are not
matched), of ``mse`` = sum (g^T - g^S)^2 (default, the official reproduction setting for CIFAR and
SVHN), ``l1`` = sum |g^T - g^S| (the official argument default, used for (Fashion-)MNIST), or ``cos``
= DC's per-output-channel ``1 - cos`` (:func:`~infodistill.methods.gradient_matching.gradient_distance`).

Published settings, from the official code (github.com/snu-mllab/Efficient-Dataset-Condensation):

* ``argument.py``: ``--inner_loop 100`` (the number of image updates per network, our ``outer_loop``),
  ``--batch_real 64``, ``--batch_syn_max 128`` (our ``batch_syn``), ``--mom_img 0.5``, network
  ``--lr 0.01 --momentum 0.9 --weight-decay 5e-4``, ``--bias False --fc False``, ``--metric l1``,
  ``--aug_type color_crop_cutout``; a new network every iteration (``--fix_iter -1``); ``tune_lr_img``
  scales the image learning rate by ``ipc / 10`` (32x32 images).
* ``misc/reproduce.py`` (``--reproduce``): ConvNet-3, ``niter 2000`` (``condense.py`` runs
  ``niter * 100 // inner_loop`` = 2000 iterations); CIFAR-10/100 and SVHN: ``metric mse``,
  ``lr_img 5e-3``, ``n_data`` 2000 (CIFAR) or 500 (others) real images of network training after each
  outer step, in batches of ``batch_real`` (``train.py: train_epoch(n_data=...)``), so
  ``ceil(n_data / 64)`` = 32 (CIFAR) or 8 steps (:meth:`IDC.published_net_steps`).
  (Fashion-)MNIST used ``metric l1`` and ``lr_img 1e-4`` instead: set ``match_metric`` and ``lr_images``
  for them (the defaults here are the CIFAR/SVHN ones).
* README: factor 2 for every dataset but ImageNet (factor 3); decoding is ``nn.Upsample(mode="bilinear")``.

Deliberate differences from the official code:

* Pixel space: the official set is stored in [0, 1] and normalised inside the augmentation; here the
  set is stored normalised. SGD with rate ``lr`` on [0, 1] pixels is SGD with ``lr / std_c**2`` on
  normalised pixels of channel ``c`` (the loss is the same function of the images), so the image
  learning rate is converted: :meth:`IDC.normalised_lr` takes the mean of ``1 / std_c**2`` over the
  channels. :meth:`IDC.defaults` does not know the dataset and uses ``NOMINAL_STD`` 0.2 (CIFAR-10 and
  SVHN are within 2%); the presets give each dataset's exact value. The official code also clamps
  the stored images to [0, 1] at every iteration; this one does not.
* Augmentation: the official matching augmentation applies color, crop and cutout together, one draw
  per class batch (siamese); here the loop's DSA (``context.augment``) is used. The official network
  training adds per-sample color+crop and CutMix (probability 0.5 on CIFAR/SVHN); here it uses
  per-sample DSA and no CutMix.
* Initialisation: the official ``mix`` init shrinks real images into the tiles by nearest-neighbour
  subsampling; the multi-formation set here uses area averaging.
* Batch norm (the official runs use instance norm): as DC/DSA here, before each outer step a
  batch-norm network sees 16 real images per class in training mode and then matches with its
  batch-norm layers in evaluation mode; the real-data training runs in training mode.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from infodistill.errors import UserInputError
from infodistill.methods.base import (
    ClassUpdate,
    DistillContext,
    Method,
    MethodDefaults,
    register_method,
)
from infodistill.methods.gradient_matching import gradient_distance
from infodistill.models.norm import has_batch_norm
from infodistill.settings import AT_LEAST_ONE, check_int, setting


# sum() starts from the int 0, which it returns only for no gradients; a network always has some
def _squared_distance(real_grads: Sequence[Tensor], synthetic_grads: Sequence[Tensor]) -> Tensor:
    return sum((real - synthetic).pow(2).sum() for real, synthetic in zip(real_grads, synthetic_grads))  # type: ignore[return-value]


def _absolute_distance(real_grads: Sequence[Tensor], synthetic_grads: Sequence[Tensor]) -> Tensor:
    return sum((real - synthetic).abs().sum() for real, synthetic in zip(real_grads, synthetic_grads))  # type: ignore[return-value]


MATCH_METRICS: Mapping[str, Callable[[Sequence[Tensor], Sequence[Tensor]], Tensor]] = {
    "mse": _squared_distance,
    "l1": _absolute_distance,
    "cos": gradient_distance,
}
"""``match_metric`` -> distance between the lists of matched real and synthetic gradients."""


def match_distance(real_grads: Sequence[Tensor], synthetic_grads: Sequence[Tensor], metric: str = "mse") -> Tensor:
    """Sum over layers of the ``metric`` distance between real and synthetic gradients (see module docstring).

    Every tensor given is matched: callers pass the matched layers only (IDC: convolution weights).
    """
    if metric not in MATCH_METRICS:
        raise UserInputError(f"IDC match_metric '{metric}' is not one of: {', '.join(MATCH_METRICS)}")
    if len(real_grads) != len(synthetic_grads) or not real_grads:
        raise ValueError(f"match_distance: {len(real_grads)} real and {len(synthetic_grads)} synthetic gradients")
    for real, synthetic in zip(real_grads, synthetic_grads):
        if real.shape != synthetic.shape:
            raise ValueError(f"match_distance: shapes differ: {tuple(real.shape)} vs {tuple(synthetic.shape)}")
    return MATCH_METRICS[metric](real_grads, synthetic_grads)


@dataclass(frozen=True)
class IDCSettings:
    """Settings of IDC's network training and gradient distance."""

    title: ClassVar[str] = "IDC"
    net_steps: int | None = setting(None, "real-data training steps of the network per outer step",
                                    bounds=AT_LEAST_ONE, metavar="N", default_text="IDC's")
    batch_net: int | None = setting(None, "real images per network training step", bounds=AT_LEAST_ONE, metavar="N",
                                    default_text="IDC's")
    match_metric: str | None = setting(None, "gradient distance", choices=MATCH_METRICS, default_text="IDC's")


@register_method("idc")
class IDC(Method):
    """IDC's condensation: per-class gradient matching on networks trained online on real data.

    Split by class over processes: a process makes every class's draws but computes the losses of its own
    classes only, and yields ``ClassUpdate(None, label)`` for the others (``docs/distributed.md``); the
    network trains on real data, so no process needs the others' images.

    ``outer_loop`` defaults to the published 100 image updates per network; ``net_steps`` to the
    published amount of real-data training for the run's dataset (:meth:`published_net_steps`).
    """

    PUBLISHED_OUTER_LOOP: ClassVar[int] = 100
    """Image updates (per class) per network: the official ``--inner_loop``."""

    PUBLISHED_NET_IMAGES: ClassVar[Mapping[str, int]] = {"cifar10": 2000, "cifar100": 2000}
    """Real images of network training after each outer step (official ``n_data``), by dataset."""

    DEFAULT_NET_IMAGES: ClassVar[int] = 500
    """``n_data`` of every other dataset (official default)."""

    LR_PIXELS_AT_IPC10: ClassVar[float] = 5e-3
    """Official image learning rate (CIFAR/SVHN, mse) for [0, 1] pixels at IPC 10; scales with IPC."""

    NOMINAL_STD: ClassVar[float] = 0.2
    """Pixel std used by :meth:`defaults` to convert the rate to normalised pixels (CIFAR-10, SVHN ~0.2)."""

    NET_MOMENTUM: ClassVar[float] = 0.9
    NET_WEIGHT_DECAY: ClassVar[float] = 5e-4

    BATCH_NORM_IMAGES_PER_CLASS: ClassVar[int] = 16
    """Real images per class used to set batch-norm statistics before matching (as DC/DSA here)."""

    process_split = "classes"

    def __init__(
        self,
        batch_real: int = 64,
        outer_loop: int | None = None,
        lr_net: float = 0.01,
        net_steps: int | None = None,
        batch_net: int | None = None,
        match_metric: str | None = None,
        batch_syn: int | None = None,
    ) -> None:
        self.batch_real = check_int(batch_real, "batch_real", owner="IDC")
        self.outer_loop = None if outer_loop is None else check_int(outer_loop, "outer_loop", owner="IDC")
        if isinstance(lr_net, bool) or not isinstance(lr_net, (int, float)) or not lr_net > 0:
            raise UserInputError(f"IDC lr_net={lr_net!r} is invalid; it must be a number > 0")
        self.lr_net = float(lr_net)
        self.net_steps = None if net_steps is None else check_int(net_steps, "net_steps", owner="IDC")
        self.batch_net = 64 if batch_net is None else check_int(batch_net, "batch_net", owner="IDC")
        metric = "mse" if match_metric is None else match_metric
        if metric not in MATCH_METRICS:
            raise UserInputError(f"IDC match_metric '{metric}' is not one of: {', '.join(MATCH_METRICS)}")
        self.match_metric = metric
        self.batch_syn = 128 if batch_syn is None else check_int(batch_syn, "batch_syn", owner="IDC")

    @classmethod
    def normalised_lr(cls, ipc: int, std: Sequence[float]) -> float:
        """The official image learning rate at ``ipc``, converted to pixels normalised by ``std``."""
        pixels = cls.LR_PIXELS_AT_IPC10 * ipc / 10
        return pixels * sum(1.0 / value**2 for value in std) / len(std)

    @staticmethod
    def defaults(ipc: int) -> MethodDefaults:
        """Published settings (official ``--reproduce`` for CIFAR/SVHN); see the module docstring."""
        return MethodDefaults(
            iterations=2000,
            lr_images=IDC.normalised_lr(ipc, (IDC.NOMINAL_STD,)),
            momentum_images=0.5,
            batch_real=64,
            augment=True,
            param="multi",
        )

    @classmethod
    def published_net_steps(cls, dataset: str, batch_net: int = 64) -> int:
        """Real-data training steps after each outer step: ``ceil(n_data / batch_net)`` (32 CIFAR, 8 others)."""
        return math.ceil(cls.PUBLISHED_NET_IMAGES.get(dataset, cls.DEFAULT_NET_IMAGES) / batch_net)

    def iteration(self, context: DistillContext) -> Iterator[ClassUpdate]:
        """``outer_loop`` rounds of per-class image updates on one fresh network, trained on real data between
        rounds."""
        outer_loop = self.outer_loop if self.outer_loop is not None else self.PUBLISHED_OUTER_LOOP
        net_steps = (self.net_steps if self.net_steps is not None
                     else self.published_net_steps(context.info.name, self.batch_net))
        network = context.fresh_network()
        network.train()
        network.requires_grad_(True)
        matched = self.matched_parameters(network, context.model_name)
        optimizer = torch.optim.SGD(network.parameters(), lr=self.lr_net, momentum=self.NET_MOMENTUM,
                                    weight_decay=self.NET_WEIGHT_DECAY)
        batch_norm = has_batch_norm(network)

        for outer in range(outer_loop):
            if batch_norm:
                context.calibrate_batch_norm(network, self.BATCH_NORM_IMAGES_PER_CLASS)
            owned = set(context.owned_classes())
            for label in range(context.synthetic.num_classes):
                if label not in owned:  # another process's class: its update, with no draws to replay
                    yield ClassUpdate(None, label)
                    continue
                real, synthetic = self.class_batches(context, label, update=outer)
                yield ClassUpdate(self.class_loss(network, matched, real, synthetic, label), label)
            if outer == outer_loop - 1:
                break
            self.train_network(network, optimizer, context, net_steps)

    @staticmethod
    def matched_parameters(network: nn.Module, model_name: str = "the model") -> list[nn.Parameter]:
        """The parameters whose gradients IDC matches: convolution weights (more than two dimensions)."""
        matched = [parameter for parameter in network.parameters() if parameter.requires_grad and parameter.dim() > 2]
        if not matched:
            raise UserInputError(f"IDC matches the gradients of convolution weights, and {model_name} has none; "
                                 "choose a convolutional model such as ConvNet-3")
        return matched

    def class_batches(self, context: DistillContext, label: int, update: int = 0) -> tuple[Tensor, Tensor]:
        """Class ``label``'s real batch and decoded synthetic images, after one shared DSA draw.

        Draws from the class's stream of round ``update`` (``context.class_generator``) in this order: the
        real batch, then (only when the class has more than ``batch_syn`` decoded images) the synthetic
        subset, then the DSA parameters.
        """
        sampler, generator = context.sampler, context.class_generator(label, update)
        real = sampler.sample(label, min(self.batch_real, sampler.class_count(label)), generator)
        synthetic = context.synthetic.class_images(label)
        if len(synthetic) > self.batch_syn:
            chosen = torch.randperm(len(synthetic), generator=generator, device=generator.device)[: self.batch_syn]
            synthetic = synthetic[chosen.to(synthetic.device)]
        if context.augment is not None:
            real, synthetic = context.augment.siamese([real, synthetic], generator)
        return real, synthetic

    def class_loss(self, network: nn.Module, matched: Sequence[nn.Parameter], real: Tensor, synthetic: Tensor,
                   label: int) -> Tensor:
        """``D(grad CE(real, label), grad CE(synthetic, label))`` over ``matched``; real gradients are constants."""
        real_labels = torch.full((len(real),), label, dtype=torch.long, device=real.device)
        synthetic_labels = torch.full((len(synthetic),), label, dtype=torch.long, device=synthetic.device)
        real_grads = [grad.detach() for grad in
                      torch.autograd.grad(F.cross_entropy(network(real), real_labels), matched)]
        synthetic_grads = torch.autograd.grad(F.cross_entropy(network(synthetic), synthetic_labels), matched,
                                              create_graph=True)
        return match_distance(real_grads, synthetic_grads, self.match_metric)

    def train_network(self, network: nn.Module, optimizer: torch.optim.Optimizer, context: DistillContext,
                      steps: int) -> None:
        """``steps`` SGD steps on random real minibatches of ``batch_net`` images (all classes, without
        replacement within a pass over the training set); per-sample DSA when augmenting."""
        network.train()
        sampler, generator = context.sampler, context.generator
        total = len(sampler.labels)
        batch = min(self.batch_net, total)
        order = torch.empty(0, dtype=torch.long)
        position = 0
        for _ in range(steps):
            if position + batch > len(order):
                order = torch.randperm(total, generator=generator, device=generator.device)
                position = 0
            chosen = order[position : position + batch]
            position += batch
            inputs = sampler.images[chosen.to(sampler.images.device)]
            labels = sampler.labels[chosen.to(sampler.labels.device)].to(inputs.device)
            if context.augment is not None:
                with torch.no_grad():
                    inputs = context.augment(inputs, generator)
            loss = F.cross_entropy(network(inputs), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

