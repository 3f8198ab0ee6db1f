"""Mixed precision: which arithmetic the networks' forward passes use (``docs/precision.md``).

``auto`` (the default) is bf16 where bf16 was measured faster with the accuracy held, fp32 everywhere
else (:func:`resolve_precision`). ``fp32`` computes everything in float32. ``bf16`` runs the forward passes of networks
under :func:`torch.autocast` with bfloat16: convolutions and linear layers compute in bf16, while the
tensors that are learned (synthetic images, network weights), the optimisers and their state, and the
loss values stay float32. Data handling (decoding a parameterised set, augmentation) stays float32.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from infodistill.errors import UserInputError

PRECISIONS = ("auto", "fp32", "bf16")
"""The precisions a run may ask for; ``auto`` resolves to one of :data:`COMPUTE_PRECISIONS`."""
COMPUTE_PRECISIONS = ("fp32", "bf16")
"""The precisions a computation runs in."""
NATIVE_BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")
"""CPU features with native bf16 dot products: where bf16 was measured faster (benchmarks/README.md)."""

LOW_PRECISION_DTYPES = (torch.bfloat16, torch.float16)


def check_precision(precision: object) -> str:
    """``precision`` if it is one of :data:`PRECISIONS`, else a one-line error naming it."""
    if not isinstance(precision, str) or precision not in PRECISIONS:
        raise UserInputError(f"precision {precision!r} is not one of: {', '.join(PRECISIONS)}")
    return precision


def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool:
    """Whether this machine's CPU (or the ``/proc/cpuinfo`` text ``cpuinfo``) reports one of
    :data:`NATIVE_BF16_CPU_FLAGS`; False where it cannot be read."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    words = set(cpuinfo.split())
    return any(flag in words for flag in NATIVE_BF16_CPU_FLAGS)


def resolve_precision(precision: str, device: torch.device | str, measured: bool) -> str:
    """The precision a computation runs in: ``fp32`` and ``bf16`` as given; ``auto`` is bf16 only where bf16
    was measured faster with the accuracy held: on a CPU with native bf16 instructions, for a computation
    whose bf16 accuracy was measured (``measured``: DM distillation, ConvNet evaluation with the protocol
    recipe; docs/precision.md). Everything else, GPUs included (not measured yet), resolves to fp32."""
    check_precision(precision)
    if precision != "auto":
        return precision
    return "bf16" if measured and torch.device(device).type == "cpu" and cpu_has_native_bf16() else "fp32"


def autocast_context(precision: str, device: torch.device | str) -> contextlib.AbstractContextManager:
    """A context in which forward passes compute in ``precision`` on ``device``'s type: autocast to
    bfloat16 for ``bf16``, nothing (plain float32) for ``fp32``. A fresh context each call.

    Autocast's cache of bf16 weight copies is off: methods that train a network inside one region
    (gradient matching) update its weights in place, which would leave cached copies stale."""
    if precision not in COMPUTE_PRECISIONS:
        raise ValueError(f"precision {precision!r} must be resolved to one of {COMPUTE_PRECISIONS} first "
                         "(resolve_precision)")
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16, cache_enabled=False)


def autocast_disabled(device: torch.device | str) -> contextlib.AbstractContextManager:
    """A region computed in the tensors' own dtype even inside an autocast region (data handling)."""
    return torch.autocast(torch.device(device).type, enabled=False)


def to_fp32(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` in float32 if it is bf16 or fp16; any other dtype is returned unchanged (the same object)."""
    return tensor.float() if tensor.dtype in LOW_PRECISION_DTYPES else tensor
