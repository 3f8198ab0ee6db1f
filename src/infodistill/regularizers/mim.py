"""Mutual-information maximisation between synthetic and real data (MIM4DD; Shang et al., NeurIPS 2023).

MIM4DD raises a contrastive (InfoNCE) lower bound on the mutual information between the synthetic set
and the real data, computed on a network's layer features: a synthetic and a real sample of the same
class form a positive pair, samples of different classes a negative pair. No official code was
released; this module is our own reading, and every choice it makes is stated here and in
docs/mim.md.

Exact loss, for one layer l. A network f (from ``network_factory``) maps each image to a feature
vector h_l(x); a learnable linear head (W_l, b_l) projects it, and the projection is L2-normalised:

    z_i  = normalise(W_l h_l(s_i) + b_l)      for every synthetic image s_i, class y_i (the anchors)
    z'_j = normalise(W_l h_l(r_j) + b_l)      for every real image r_j, class c_j (the candidates)
    s_ij = <z_i, z'_j> / temperature
    L_l  = mean_i [ -(1/|P(i)|) sum_{p in P(i)} ( s_ip - logsumexp_j s_ij ) ],   P(i) = {j : c_j = y_i}

and the regularizer returns the mean of L_l over the chosen layers. Only this synthetic -> real
direction is used: the loop may pass the images of a single class, and then real anchors of every
other class would have no positive among the synthetic samples, so the real -> synthetic direction
is undefined exactly when it is needed most.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from infodistill.data.sampler import ClassSampler
from infodistill.errors import UserInputError
from infodistill.models import build_model
from infodistill.models.resnet import BasicBlock
from infodistill.regularizers.base import Regularizer, RegularizerSetup, register_regularizer
from infodistill.settings import AT_LEAST_ONE, POSITIVE, Bounds, check_int, setting

BLOCK_END_TYPES: tuple[type[nn.Module], ...] = (nn.AvgPool2d, nn.MaxPool2d, BasicBlock)
"""Top-level modules of a network's ``features`` whose output ends a block: the pooling layers of
ConvNet (AvgPool2d), AlexNet and VGG (MaxPool2d), and the residual blocks of ResNet. The last of them
produces the penultimate features (``embed``); the earlier ones are the candidates for ``layers > 1``."""

PROBE_IMAGES = 2
"""Real images fed through the network once at construction to learn the feature sizes."""


def info_nce(
    synthetic_z: Tensor, synthetic_labels: Tensor, real_z: Tensor, real_labels: Tensor, temperature: float
) -> Tensor:
    """Supervised InfoNCE of synthetic anchors (N x D) against real candidates (M x D): a scalar.

    Both sides are L2-normalised here (rows of zeros stay zero), then with
    ``s_ij = <z_i, z'_j> / temperature`` and ``P(i)`` the real samples of the anchor's class:

        loss = mean_i [ -(1/|P(i)|) sum_{p in P(i)} ( s_ip - logsumexp_j s_ij ) ]

    computed as one N x M matrix. Every anchor's class must have at least one real sample; the
    gradient flows into whichever of the two inputs requires it.
    """
    if not (isinstance(temperature, (int, float)) and not isinstance(temperature, bool)
            and math.isfinite(temperature) and temperature > 0):
        raise UserInputError(f"temperature={temperature!r} is not allowed; use a finite number > 0")
    if synthetic_z.dim() != 2 or real_z.dim() != 2 or synthetic_z.shape[1] != real_z.shape[1]:
        raise UserInputError(
            f"features must be N x D and M x D with the same D, got {list(synthetic_z.shape)} and {list(real_z.shape)}"
        )
    if synthetic_labels.shape != (len(synthetic_z),) or real_labels.shape != (len(real_z),):
        raise UserInputError(
            f"labels must be one per sample: got {list(synthetic_labels.shape)} for {len(synthetic_z)} synthetic "
            f"and {list(real_labels.shape)} for {len(real_z)} real samples"
        )
    if len(synthetic_z) == 0:
        raise UserInputError("InfoNCE needs at least one synthetic sample, got none")
    synthetic_labels = synthetic_labels.to(device=synthetic_z.device, dtype=torch.int64)
    real_labels = real_labels.to(device=synthetic_z.device, dtype=torch.int64)
    positives = synthetic_labels.unsqueeze(1) == real_labels.unsqueeze(0)          # N x M
    counts = positives.sum(dim=1)                                                   # N
    if bool((counts == 0).any()):
        missing = sorted(set(synthetic_labels[counts == 0].tolist()))
        raise UserInputError(
            f"synthetic classes {missing} have no real sample to pair with; every anchor's class needs at least one"
        )
    logits = F.normalize(synthetic_z, dim=1) @ F.normalize(real_z, dim=1).transpose(0, 1) / temperature
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)                 # N x M, finite
    per_anchor = -(log_prob * positives.to(log_prob.dtype)).sum(dim=1) / counts.to(log_prob.dtype)
    return per_anchor.mean()


def block_ends(network: nn.Module) -> list[nn.Module]:
    """The modules whose outputs end the blocks of ``network.features``, shallowest first (see BLOCK_END_TYPES)."""
    features = getattr(network, "features", None)
    if not isinstance(features, nn.Sequential):
        return []
    return [module for module in features if isinstance(module, BLOCK_END_TYPES)]


def layer_features(network: nn.Module, images: Tensor, layers: int) -> list[Tensor]:
    """Feature vectors of ``images`` at ``layers`` depths, shallowest first, each ``B x D_l``.

    The last entry is ``network.embed(images)`` (the penultimate features). The ``layers - 1`` before
    it are the outputs of the deepest block ends before the last one (:func:`block_ends`), averaged
    over their spatial positions; they are caught by forward hooks during the same single pass.
    """
    if not hasattr(network, "embed"):
        raise UserInputError(f"the MIM feature network {type(network).__name__} has no embed(x) method")
    if layers == 1:
        return [network.embed(images)]  # type: ignore[operator]  # embed is checked above; nn.Module hides it
    ends = block_ends(network)
    available = max(len(ends) - 1, 0)
    if layers - 1 > available:
        raise UserInputError(
            f"layers={layers} is not allowed for {type(network).__name__}: it has {available} block(s) before its "
            f"embedding, so use 1..{available + 1}"
        )
    chosen = ends[len(ends) - layers : -1]
    captured: dict[int, Tensor] = {}
    handles = [
        module.register_forward_hook(lambda _m, _i, output, k=k: captured.__setitem__(k, output))
        for k, module in enumerate(chosen)
    ]
    try:
        embedding = network.embed(images)  # type: ignore[operator]  # embed is checked above; nn.Module hides it
    finally:
        for handle in handles:
            handle.remove()
    outputs = [captured[k] for k in range(len(chosen))]
    pooled = [output.mean(dim=(2, 3)) if output.dim() == 4 else output.flatten(1) for output in outputs]
    return [*pooled, embedding]


@contextmanager
def _frozen(network: nn.Module) -> Iterator[None]:
    """Record no gradient to ``network``'s weights during the block; their requires_grad flags are restored after."""
    parameters = list(network.parameters())
    flags = [parameter.requires_grad for parameter in parameters]
    try:
        for parameter in parameters:
            parameter.requires_grad_(False)
        yield
    finally:
        for parameter, flag in zip(parameters, flags):
            parameter.requires_grad_(flag)


@dataclass(frozen=True)
class MIMSettings:
    """Settings of the MIM4DD contrastive regularizer (on with ``mim_weight`` above 0)."""

    title: ClassVar[str] = "MIM4DD regularizer"
    mim_weight: float = setting(0.0, "weight of the MIM4DD contrastive regularizer; features from a proxy when "
                                "--proxies is given, else a fresh --model network per step",
                                bounds=Bounds(low=0, note="0 turns MIM off"), metavar="W", default_text="0, off")
    mim_temperature: float = setting(0.1, "InfoNCE temperature", bounds=POSITIVE, metavar="T")
    mim_layers: int = setting(1, "feature layers, deepest first", bounds=AT_LEAST_ONE, metavar="N")
    mim_real_per_class: int = setting(16, "real images per class per step", bounds=AT_LEAST_ONE, metavar="N")
    mim_lr: float = setting(0.01, "SGD learning rate of the projection heads", bounds=POSITIVE)


@register_regularizer("mim")
class MIMRegularizer(Regularizer):
    """The MIM4DD contrastive term: supervised InfoNCE between synthetic and real layer features.

    Per call (``loss``), with the ``generator`` passed in and in this order:

    1. ``network = network_factory(generator)``: the feature network (a proxy or a fresh network; the
       loop decides). It is used in the mode it comes in and never updated: no gradient is recorded
       to its weights (their requires_grad flags are switched off for the call and restored).
    2. for every class c = 0..C-1 with real images, ``min(real_per_class, class_count(c))`` real
       images drawn with ``sampler.sample(c, n, generator)``: the candidates (so a synthetic batch of
       one class still has negatives). Their features are computed without gradient.
    3. for each layer l (see :func:`layer_features`; ``layers=1`` is ``network.embed`` alone), the
       projections of both sides by head l, and L_l = ``info_nce(...)`` with anchors = synthetic:

           s_ij = <z_i, z'_j> / temperature,   z = normalise(W_l h_l + b_l)
           L_l  = mean_i [ -(1/|P(i)|) sum_{p in P(i)} ( s_ip - logsumexp_j s_ij ) ]

    4. the result is the mean of L_l over the layers.

    The heads are linear maps with bias and no hidden layer (feature dim -> ``projection_dim``),
    one per layer, created here: a network from ``network_factory(init_generator)`` is run once on
    the sampler's first real images to learn the feature sizes, then each head's weight and bias are
    drawn uniformly from +-1/sqrt(feature dim) with ``init_generator`` (default seed 0); the global
    RNG is never used. :meth:`parameters` returns them; the loop's optimiser steps them, together with
    the images, to minimise the same loss. They receive gradient from both the synthetic and the
    real side. The real images never receive gradient.
    """

    settings = MIMSettings
    config_fields = frozenset({"mim_temperature", "mim_layers", "mim_real_per_class", "mim_lr"})
    switch = "mim_weight > 0"
    weight_field = "mim_weight"

    @classmethod
    def enabled(cls, config: Any) -> bool:
        return bool(config.mim_weight > 0)

    @classmethod
    def build(cls, setup: RegularizerSetup) -> MIMRegularizer:
        """MIM4DD with its projection heads added to the run's optimiser. Features come from a proxy of the
        run's pool when it has one (trained, fixed features), else from a fresh network of the run's matching
        architecture per step."""
        config, info, device, pool = setup.config, setup.info, setup.device, setup.pool

        def network_factory(generator: torch.Generator) -> nn.Module:
            if pool is not None:
                return pool.sample(generator)
            seed = int(torch.randint(0, 2**62, (1,), generator=generator))
            return build_model(config.model, channels=info.channels, num_classes=info.num_classes,
                               image_size=info.image_size, seed=seed).to(device)

        mim = cls(setup.sampler, network_factory, real_per_class=config.mim_real_per_class,
                  temperature=config.mim_temperature, layers=config.mim_layers, init_generator=setup.generator)
        for parameter in mim.parameters():
            parameter.data = parameter.data.to(device)
        setup.optimizer.add_param_group({"params": list(mim.parameters()), "name": "mim", "lr": config.mim_lr,
                                         "base_lr": config.mim_lr})
        return mim

    @classmethod
    def artefact_metadata(cls, config: Any) -> dict[str, str]:
        return {"mim_temperature": repr(config.mim_temperature), "mim_layers": str(config.mim_layers)}

    def __init__(
        self,
        sampler: ClassSampler,
        network_factory: Callable[[torch.Generator], nn.Module],
        real_per_class: int = 16,
        projection_dim: int = 128,
        temperature: float = 0.1,
        layers: int = 1,
        init_generator: torch.Generator | None = None,
    ) -> None:
        self.real_per_class = check_int(real_per_class, "real_per_class")
        self.projection_dim = check_int(projection_dim, "projection_dim")
        self.layers = check_int(layers, "layers")
        if (isinstance(temperature, bool) or not isinstance(temperature, (int, float))
                or not math.isfinite(temperature) or temperature <= 0):
            raise UserInputError(f"temperature={temperature!r} is not allowed; use a finite number > 0")
        self.temperature = float(temperature)
        self.sampler = sampler
        self.network_factory = network_factory
        if len(sampler.images) == 0:
            raise UserInputError("the MIM regularizer needs real images, but the sampler holds none")
        if init_generator is None:
            init_generator = torch.Generator().manual_seed(0)

        network = network_factory(init_generator)
        probe = sampler.images[:PROBE_IMAGES]
        with torch.no_grad(), _frozen(network):
            dims = [feature.shape[1] for feature in layer_features(network, probe, self.layers)]
        self.feature_dims: tuple[int, ...] = tuple(int(dim) for dim in dims)
        dtype = probe.dtype if probe.dtype.is_floating_point else torch.get_default_dtype()
        self.heads: list[tuple[Tensor, Tensor]] = []
        for dim in self.feature_dims:
            bound = 1.0 / math.sqrt(dim)
            weight = (torch.rand(self.projection_dim, dim, generator=init_generator, device=init_generator.device,
                                 dtype=dtype) * 2 - 1) * bound
            bias = (torch.rand(self.projection_dim, generator=init_generator, device=init_generator.device,
                               dtype=dtype) * 2 - 1) * bound
            self.heads.append((weight.to(probe.device).requires_grad_(True),
                               bias.to(probe.device).requires_grad_(True)))

    def parameters(self) -> list[Tensor]:
        """The heads' tensors, layer by layer (shallowest first): weight, bias, weight, bias, ..."""
        return [tensor for head in self.heads for tensor in head]

    def state_dict(self) -> dict[str, Tensor]:
        """The heads' values (detached copies) under ``head<l>.weight`` / ``head<l>.bias``, for checkpoints."""
        state = {}
        for index, (weight, bias) in enumerate(self.heads):
            state[f"head{index}.weight"] = weight.detach().clone()
            state[f"head{index}.bias"] = bias.detach().clone()
        return state

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Copy head values saved by :meth:`state_dict` into the heads, in place (optimisers keep their references)."""
        expected = self.state_dict()
        if set(state) != set(expected):
            raise UserInputError(
                f"MIM head state has keys {sorted(state)}; expected {sorted(expected)}"
            )
        for key, value in state.items():
            if tuple(value.shape) != tuple(expected[key].shape):
                raise UserInputError(
                    f"MIM head state {key} has shape {list(value.shape)}; expected {list(expected[key].shape)}"
                )
        with torch.no_grad():
            for index, (weight, bias) in enumerate(self.heads):
                weight.copy_(state[f"head{index}.weight"])
                bias.copy_(state[f"head{index}.bias"])

    def real_batch(self, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """``min(real_per_class, class_count(c))`` real images of every non-empty class c, in class order, and
        labels."""
        images, labels = [], []
        for c in range(self.sampler.num_classes):
            count = min(self.real_per_class, self.sampler.class_count(c))
            if count == 0:
                continue
            images.append(self.sampler.sample(c, count, generator))
            labels.append(torch.full((count,), c, dtype=torch.int64))
        return torch.cat(images), torch.cat(labels)

    def loss(self, images: Tensor, labels: Tensor, generator: torch.Generator) -> Tensor:
        """Mean over layers of the supervised InfoNCE of (images, labels) against a fresh real batch."""
        network = self.network_factory(generator)
        real_images, real_labels = self.real_batch(generator)
        real_images = real_images.detach().to(images.device)
        with _frozen(network):
            with torch.no_grad():
                real_features = layer_features(network, real_images, self.layers)
            synthetic_features = layer_features(network, images, self.layers)
        if len(synthetic_features) != len(self.heads) or any(
            feature.shape[1] != weight.shape[1] for feature, (weight, _) in zip(synthetic_features, self.heads)
        ):
            raise UserInputError(
                f"the MIM feature network gives feature sizes {[f.shape[1] for f in synthetic_features]}, "
                f"but the heads "
                f"were built for {list(self.feature_dims)}; network_factory must always return the same architecture"
            )
        terms = [
            info_nce(F.linear(syn, weight, bias), labels, F.linear(real, weight, bias), real_labels, self.temperature)
            for syn, real, (weight, bias) in zip(synthetic_features, real_features, self.heads)
        ]
        return torch.stack(terms).mean()
