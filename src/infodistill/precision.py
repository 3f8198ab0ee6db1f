"""Mixed precision: which arithmetic the networks' forward passes use (``docs/precision.md``).

``fp32`` computes everything in float32 (the default). ``bf16`` runs the forward passes of networks
under :func:`torch.autocast` with bfloat16: convolutions and linear layers compute in bf16, while the
tensors that are learned (synthetic images, network weights), the optimisers and their state, and the
loss values stay float32. Data handling (decoding a parameterised set, augmentation) stays float32.
"""

from __future__ import annotations

import contextlib

import torch

from infodistill.errors import UserInputError

PRECISIONS = ("fp32", "bf16")
"""The precisions a run may compute in."""

LOW_PRECISION_DTYPES = (torch.bfloat16, torch.float16)


def check_precision(precision: object) -> str:
    """``precision`` if it is one of :data:`PRECISIONS`, else a one-line error naming it."""
    if not isinstance(precision, str) or precision not in PRECISIONS:
        raise UserInputError(f"precision {precision!r} is not one of: {', '.join(PRECISIONS)}")
    return precision


def autocast_context(precision: str, device: torch.device | str) -> contextlib.AbstractContextManager:
    """A context in which forward passes compute in ``precision`` on ``device``'s type: autocast to
    bfloat16 for ``bf16``, nothing (plain float32) for ``fp32``. A fresh context each call.

    Autocast's cache of bf16 weight copies is off: methods that train a network inside one region
    (gradient matching) update its weights in place, which would leave cached copies stale."""
    check_precision(precision)
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16, cache_enabled=False)


def autocast_disabled(device: torch.device | str) -> contextlib.AbstractContextManager:
    """A region computed in the tensors' own dtype even inside an autocast region (data handling)."""
    return torch.autocast(torch.device(device).type, enabled=False)


def to_fp32(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` in float32 if it is bf16 or fp16; any other dtype is returned unchanged (the same object)."""
    return tensor.float() if tensor.dtype in LOW_PRECISION_DTYPES else tensor
