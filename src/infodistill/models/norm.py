"""Normalisation layers selected by the short tokens used in model names (``in``, ``bn``, ``none``).

``in`` is the dataset-distillation convention for instance norm: ``nn.GroupNorm(C, C, affine=True)``,
one group per channel, so every channel of every sample is normalised on its own and the layer
has no running statistics (which keeps the model usable under ``torch.func.vmap``).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from infodistill.errors import UserInputError


def _instance_norm(channels: int) -> nn.Module:
    """Per-sample, per-channel normalisation with a learnable scale and shift."""
    return nn.GroupNorm(channels, channels, affine=True)


def _batch_norm(channels: int) -> nn.Module:
    """Batch normalisation with running statistics (not vmap-friendly in training mode)."""
    return nn.BatchNorm2d(channels)


def _no_norm(channels: int) -> nn.Module:
    """No normalisation at all."""
    return nn.Identity()


NORM_BUILDERS: dict[str, Callable[[int], nn.Module]] = {
    "in": _instance_norm,
    "bn": _batch_norm,
    "none": _no_norm,
}
"""Norm token (lower case) -> builder taking the number of channels."""

BATCH_NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.SyncBatchNorm,
)


def make_norm(kind: str, channels: int) -> nn.Module:
    """Build the normalisation layer named by ``kind`` for a feature map with ``channels`` channels."""
    try:
        builder = NORM_BUILDERS[kind]
    except KeyError:
        allowed = ", ".join(NORM_BUILDERS)
        raise UserInputError(f"unknown norm {kind!r}: allowed norms are {allowed}") from None
    return builder(channels)


def has_batch_norm(model: nn.Module) -> bool:
    """True when any submodule keeps batch statistics (such models need care with vmap and eval mode)."""
    return any(isinstance(module, BATCH_NORM_TYPES) for module in model.modules())
