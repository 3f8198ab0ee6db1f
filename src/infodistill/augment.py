"""Differentiable siamese augmentation (DSA; Zhao & Bilen, ICML 2021).

DSA augments a real and a synthetic batch with *the same* random transformation, and every
transformation is differentiable with respect to the pixels, so gradients reach the synthetic
images through the augmentation. This module keeps the published operations and defaults
(strategy ``color_crop_cutout_flip_scale_rotate``, mode ``single``) but makes randomness explicit:

* every random draw comes from a ``torch.Generator`` handed in (no global RNG, no hidden seed);
* sampling (:meth:`DSA.sample`) is split from application (:meth:`DSA.apply`), so one
  :class:`DSAParams` can be applied to several batches. Parameters with batch size 1 are
  broadcast to any batch: that is the siamese case (:meth:`DSA.siamese`).

Families and their effect on a normalised batch ``x`` of shape ``B x C x H x W``:

* ``color``: brightness ``x + b``; saturation ``(x - mean_c) * s + mean_c`` (mean over channels);
  contrast ``(x - mean) * k + mean`` (mean over C, H, W of each sample), applied in that order.
* ``crop``: integer translation, zero fill where the image moved away.
* ``cutout``: a box set to zero; the box may be partly outside the image (clipped).
* ``flip``: horizontal flip (last dimension) of the flagged samples.
* ``scale`` / ``rotate``: affine resampling with ``F.affine_grid`` + ``F.grid_sample``
  (``align_corners=True``, bilinear, zero padding).

In mode ``single`` one family is chosen uniformly per call (per :meth:`DSA.sample`) and applied to
the whole batch; in mode ``all`` every family of the strategy is applied in strategy order. In mode
``all`` consecutive affine families (``scale`` then ``rotate`` in the default strategy) are composed
into one ``grid_sample``: one interpolation instead of two, and a pixel is zero-filled only when its
final source point is outside the image (the published two-step version also zeroes corners whose
intermediate point left the scaled image). In mode ``single`` only one of them is ever applied, so
that mode is exactly the published computation.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from infodistill.errors import UserInputError
from infodistill.precision import autocast_disabled

__all__ = ["DSA", "DSAConfig", "DSAParams", "FAMILIES", "MODES"]

#: Every augmentation family, in the published default order.
FAMILIES: tuple[str, ...] = ("color", "crop", "cutout", "flip", "scale", "rotate")
#: ``single``: one uniformly chosen family per call (published default); ``all``: every family.
MODES: tuple[str, ...] = ("single", "all")


@dataclass(frozen=True)
class DSAConfig:
    """Settings of DSA; the defaults are the published ones.

    ``strategy`` names the families joined by underscores, e.g. ``"crop_flip"``. The ratios are
    the published hyper-parameters: flip probability, maximal scale factor (factors are drawn in
    ``[1/ratio_scale, ratio_scale]``), maximal rotation in degrees, crop shift as a fraction of the
    side, cutout side as a fraction of the side, and the brightness / saturation / contrast
    strengths.
    """

    strategy: str = "color_crop_cutout_flip_scale_rotate"
    mode: str = "single"
    prob_flip: float = 0.5
    ratio_scale: float = 1.2
    ratio_rotate: float = 15.0
    ratio_crop_pad: float = 0.125
    ratio_cutout: float = 0.5
    brightness: float = 1.0
    saturation: float = 2.0
    contrast: float = 0.5

    def __post_init__(self) -> None:
        _parse_strategy(self.strategy)
        if self.mode not in MODES:
            raise UserInputError(f"DSA mode '{self.mode}' is unknown; allowed modes: {', '.join(MODES)}")
        _require(0.0 <= self.prob_flip <= 1.0, "prob_flip", self.prob_flip, "a probability in [0, 1]")
        _require(self.ratio_scale >= 1.0, "ratio_scale", self.ratio_scale, "a number >= 1")
        _require(self.ratio_rotate >= 0.0, "ratio_rotate", self.ratio_rotate, "a number >= 0 (degrees)")
        _require(0.0 <= self.ratio_crop_pad <= 1.0, "ratio_crop_pad", self.ratio_crop_pad, "a number in [0, 1]")
        _require(0.0 < self.ratio_cutout <= 1.0, "ratio_cutout", self.ratio_cutout, "a number in (0, 1]")
        _require(self.brightness >= 0.0, "brightness", self.brightness, "a number >= 0")
        _require(self.saturation >= 0.0, "saturation", self.saturation, "a number >= 0")
        _require(self.contrast >= 0.0, "contrast", self.contrast, "a number >= 0")

    @property
    def families(self) -> tuple[str, ...]:
        """The families named by ``strategy``, in the order they are written."""
        return _parse_strategy(self.strategy)


def _parse_strategy(strategy: str) -> tuple[str, ...]:
    """Split ``strategy`` on underscores; refuse unknown or repeated family names."""
    names = tuple(strategy.split("_"))
    for name in names:
        if name not in _REGISTRY:
            raise UserInputError(
                f"DSA strategy '{strategy}': unknown family '{name}'; "
                f"allowed families: {', '.join(FAMILIES)} (joined by '_')"
            )
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise UserInputError(f"DSA strategy '{strategy}': family '{repeated[0]}' is named twice; name each once")
    return names


def _require(condition: bool, key: str, value: float, allowed: str) -> None:
    """Refuse a bad DSA setting with one line naming it and what is allowed."""
    if not condition:
        raise UserInputError(f"DSA setting {key}={value!r} is out of range; it must be {allowed}")


@dataclass(frozen=True, eq=False)
class DSAParams:
    """One draw of DSA parameters: which families to apply and their per-sample values.

    Every tensor has a leading dimension ``N``: ``N == 1`` applies one transformation to every
    sample of any batch (siamese), ``N == B`` gives each sample of a batch of ``B`` its own.
    Fields of families that are not applied are ``None``.

    * ``families``: names applied, in order (one name in mode ``single``).
    * ``image_size``: ``(H, W)`` the parameters were drawn for; ``apply`` requires it.
    * ``brightness_shift`` ``(N,)`` float: added to every pixel; ``(u - 0.5) * brightness``.
    * ``saturation_factor`` ``(N,)`` float: ``u * saturation``.
    * ``contrast_factor`` ``(N,)`` float: ``u + contrast``.
    * ``crop_shift`` ``(N, 2)`` int64 ``(dy, dx)``: ``out[..., i, j] = x[..., i + dy, j + dx]``,
      zero where that index is outside the image.
    * ``cutout_box`` ``(N, 4)`` int64 ``(top, left, bottom, right)``, bottom/right exclusive and
      possibly outside the image: the rows ``top <= i < bottom`` and columns ``left <= j < right``
      are set to zero.
    * ``flip_mask`` ``(N,)`` bool: samples flipped horizontally.
    * ``scale_factors`` ``(N, 2)`` float ``(sx, sy)``: sampling grid scaled by ``sx`` along the
      width and ``sy`` along the height (``sx < 1`` zooms in).
    * ``rotate_angle`` ``(N,)`` float, radians: theta ``[[cos, -sin, 0], [sin, cos, 0]]``; a
      positive angle turns the image counter-clockwise as displayed (row 0 at the top), so
      ``pi / 2`` equals ``torch.rot90(x, 1, dims=(-2, -1))``.
    """

    families: tuple[str, ...]
    image_size: tuple[int, int]
    brightness_shift: Tensor | None = None
    saturation_factor: Tensor | None = None
    contrast_factor: Tensor | None = None
    crop_shift: Tensor | None = None
    cutout_box: Tensor | None = None
    flip_mask: Tensor | None = None
    scale_factors: Tensor | None = None
    rotate_angle: Tensor | None = None

    def __post_init__(self) -> None:
        for name in self.families:
            if name not in _REGISTRY:
                raise ValueError(f"DSAParams: unknown family '{name}'; allowed families: {', '.join(FAMILIES)}")
            missing = [field for field in _REGISTRY[name].fields if getattr(self, field) is None]
            if missing:
                raise ValueError(f"DSAParams: family '{name}' needs field '{missing[0]}'")
        sizes = {tensor.shape[0] for tensor in self._tensors().values()}
        if len(sizes) > 1:
            raise ValueError(f"DSAParams: tensors disagree on the batch size: {sorted(sizes)}")

    def _tensors(self) -> dict[str, Tensor]:
        """The tensor fields that are set, by name."""
        return {
            field.name: value
            for field in dataclasses.fields(self)
            if isinstance(value := getattr(self, field.name), Tensor)
        }

    @property
    def batch_size(self) -> int:
        """``N``, the leading size of every tensor (1 when no family needs a tensor)."""
        tensors = self._tensors()
        return next(iter(tensors.values())).shape[0] if tensors else 1

    def to(self, device: torch.device | str) -> DSAParams:
        """The same parameters with every tensor on ``device``."""
        moved: dict[str, Any] = {name: tensor.to(device) for name, tensor in self._tensors().items()}
        return dataclasses.replace(self, **moved)


# --------------------------------------------------------------------------------------------
# Sampling: each function draws from ``generator`` on the generator's device and returns the
# DSAParams fields of its family.


def _uniform(n: int, generator: torch.Generator, *, low: float = 0.0, high: float = 1.0) -> Tensor:
    """``n`` draws from U[low, high) on the generator's device."""
    return torch.rand(n, generator=generator, device=generator.device) * (high - low) + low


def _integers(n: int, low: int, high: int, generator: torch.Generator) -> Tensor:
    """``n`` integers uniform in ``[low, high)`` on the generator's device."""
    return torch.randint(low, high, (n,), generator=generator, device=generator.device)


def _sample_color(config: DSAConfig, n: int, size: tuple[int, int], generator: torch.Generator) -> dict[str, Tensor]:
    brightness_u = _uniform(n, generator)
    saturation_u = _uniform(n, generator)
    contrast_u = _uniform(n, generator)
    return {
        "brightness_shift": (brightness_u - 0.5) * config.brightness,
        "saturation_factor": saturation_u * config.saturation,
        "contrast_factor": contrast_u + config.contrast,
    }


def _crop_limits(config: DSAConfig, size: tuple[int, int]) -> tuple[int, int]:
    """Maximal shift per axis, ``int(side * ratio + 0.5)`` as published."""
    return int(size[0] * config.ratio_crop_pad + 0.5), int(size[1] * config.ratio_crop_pad + 0.5)


def _sample_crop(config: DSAConfig, n: int, size: tuple[int, int], generator: torch.Generator) -> dict[str, Tensor]:
    limit_y, limit_x = _crop_limits(config, size)
    shift_y = _integers(n, -limit_y, limit_y + 1, generator)
    shift_x = _integers(n, -limit_x, limit_x + 1, generator)
    return {"crop_shift": torch.stack([shift_y, shift_x], dim=1)}


def _cutout_size(config: DSAConfig, size: tuple[int, int]) -> tuple[int, int]:
    """Box side per axis, ``int(side * ratio + 0.5)`` as published."""
    return int(size[0] * config.ratio_cutout + 0.5), int(size[1] * config.ratio_cutout + 0.5)


def _sample_cutout(config: DSAConfig, n: int, size: tuple[int, int], generator: torch.Generator) -> dict[str, Tensor]:
    cut_h, cut_w = _cutout_size(config, size)
    # Published centre range: [0, side + (1 - cut % 2)), so the box may hang over either edge.
    centre_y = _integers(n, 0, size[0] + (1 - cut_h % 2), generator)
    centre_x = _integers(n, 0, size[1] + (1 - cut_w % 2), generator)
    top, left = centre_y - cut_h // 2, centre_x - cut_w // 2
    return {"cutout_box": torch.stack([top, left, top + cut_h, left + cut_w], dim=1)}


def _sample_flip(config: DSAConfig, n: int, size: tuple[int, int], generator: torch.Generator) -> dict[str, Tensor]:
    return {"flip_mask": _uniform(n, generator) < config.prob_flip}


def _sample_scale(config: DSAConfig, n: int, size: tuple[int, int], generator: torch.Generator) -> dict[str, Tensor]:
    low, high = 1.0 / config.ratio_scale, config.ratio_scale
    scale_x = _uniform(n, generator, low=low, high=high)
    scale_y = _uniform(n, generator, low=low, high=high)
    return {"scale_factors": torch.stack([scale_x, scale_y], dim=1)}


def _sample_rotate(config: DSAConfig, n: int, size: tuple[int, int], generator: torch.Generator) -> dict[str, Tensor]:
    limit = math.radians(config.ratio_rotate)
    return {"rotate_angle": _uniform(n, generator, low=-limit, high=limit)}


# --------------------------------------------------------------------------------------------
# Application: each function is deterministic in ``params`` and differentiable in ``x``. Tensors
# of batch 1 broadcast over the batch of ``x``.


def _drawn(values: Tensor | None) -> Tensor:
    """A parameter field of a family being applied: ``DSAParams.__post_init__`` has checked it is set."""
    assert values is not None
    return values


def _per_sample(values: Tensor | None, x: Tensor) -> Tensor:
    """``(N,)`` values as ``(N, 1, 1, 1)`` in the dtype and device of ``x``, for broadcasting."""
    return _drawn(values).to(device=x.device, dtype=x.dtype).view(-1, 1, 1, 1)


def _apply_color(x: Tensor, params: DSAParams) -> Tensor:
    x = x + _per_sample(params.brightness_shift, x)
    channel_mean = x.mean(dim=1, keepdim=True)
    x = (x - channel_mean) * _per_sample(params.saturation_factor, x) + channel_mean
    sample_mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - sample_mean) * _per_sample(params.contrast_factor, x) + sample_mean


def _apply_crop(x: Tensor, params: DSAParams) -> Tensor:
    batch, channels, height, width = x.shape
    shift = _drawn(params.crop_shift).to(x.device)
    # Pad one zero row/column on each side; every source index outside the image is clamped onto
    # that border, so a single gather performs the shift with zero fill.
    padded = F.pad(x, (1, 1, 1, 1)).flatten(2)
    rows = (torch.arange(height, device=x.device) + shift[:, :1] + 1).clamp(0, height + 1)
    cols = (torch.arange(width, device=x.device) + shift[:, 1:] + 1).clamp(0, width + 1)
    flat_index = (rows[:, :, None] * (width + 2) + cols[:, None, :]).flatten(1)
    flat_index = flat_index[:, None, :].expand(batch, channels, height * width)
    return padded.gather(2, flat_index).view(batch, channels, height, width)


def _apply_cutout(x: Tensor, params: DSAParams) -> Tensor:
    height, width = x.shape[-2:]
    box = _drawn(params.cutout_box).to(x.device)
    rows = torch.arange(height, device=x.device)
    cols = torch.arange(width, device=x.device)
    in_rows = (rows >= box[:, 0:1]) & (rows < box[:, 2:3])  # (N, H)
    in_cols = (cols >= box[:, 1:2]) & (cols < box[:, 3:4])  # (N, W)
    keep = ~(in_rows[:, :, None] & in_cols[:, None, :])
    return x * keep[:, None].to(x.dtype)


def _apply_flip(x: Tensor, params: DSAParams) -> Tensor:
    flagged = _drawn(params.flip_mask).to(x.device).view(-1, 1, 1, 1)
    return torch.where(flagged, x.flip(-1), x)


def _scale_theta(params: DSAParams, dtype: torch.dtype, device: torch.device) -> Tensor:
    factors = _drawn(params.scale_factors).to(device=device, dtype=dtype)
    theta = torch.zeros(factors.shape[0], 2, 3, dtype=dtype, device=device)
    theta[:, 0, 0] = factors[:, 0]
    theta[:, 1, 1] = factors[:, 1]
    return theta


def _rotate_theta(params: DSAParams, dtype: torch.dtype, device: torch.device) -> Tensor:
    angle = _drawn(params.rotate_angle).to(device=device, dtype=dtype)
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.zeros(angle.shape[0], 2, 3, dtype=dtype, device=device)
    theta[:, 0, 0], theta[:, 0, 1] = cos, -sin
    theta[:, 1, 0], theta[:, 1, 1] = sin, cos
    return theta


def _resample(x: Tensor, theta: Tensor) -> Tensor:
    """Bilinear resampling of ``x`` at ``theta @ (u, v, 1)``; a theta of batch 1 is shared."""
    grid = F.affine_grid(theta, [theta.shape[0], *x.shape[1:]], align_corners=True)
    if grid.shape[0] != x.shape[0]:
        grid = grid.expand(x.shape[0], *grid.shape[1:])
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=True)


ThetaFn = Callable[[DSAParams, torch.dtype, torch.device], Tensor]
SampleFn = Callable[[DSAConfig, int, tuple[int, int], torch.Generator], dict[str, Tensor]]
ApplyFn = Callable[[Tensor, DSAParams], Tensor]


class _Family(NamedTuple):
    """How to draw and apply one family; ``theta`` is set for affine families (composable)."""

    sample: SampleFn
    apply: ApplyFn
    fields: tuple[str, ...]
    theta: ThetaFn | None = None


def _affine_apply(theta_fn: ThetaFn) -> ApplyFn:
    return lambda x, params: _resample(x, theta_fn(params, x.dtype, x.device))


_REGISTRY: dict[str, _Family] = {
    "color": _Family(_sample_color, _apply_color, ("brightness_shift", "saturation_factor", "contrast_factor")),
    "crop": _Family(_sample_crop, _apply_crop, ("crop_shift",)),
    "cutout": _Family(_sample_cutout, _apply_cutout, ("cutout_box",)),
    "flip": _Family(_sample_flip, _apply_flip, ("flip_mask",)),
    "scale": _Family(_sample_scale, _affine_apply(_scale_theta), ("scale_factors",), _scale_theta),
    "rotate": _Family(_sample_rotate, _affine_apply(_rotate_theta), ("rotate_angle",), _rotate_theta),
}


class DSA:
    """Differentiable siamese augmentation with explicit generators; see the module docstring."""

    def __init__(self, config: DSAConfig = DSAConfig()) -> None:
        self.config = config
        self.families = config.families

    def sample(
        self,
        batch_size: int,
        image_size: tuple[int, int],
        generator: torch.Generator,
        device: torch.device | str | None = None,
    ) -> DSAParams:
        """Draw the family choice (mode ``single``) and per-sample parameters for ``batch_size``.

        ``batch_size == 1`` gives one parameter set that :meth:`apply` broadcasts to any batch.
        Draws happen on the generator's device; the tensors are then moved to ``device``
        (default: the generator's device).
        """
        if batch_size < 1:
            raise ValueError(f"DSA.sample: batch_size must be >= 1, got {batch_size}")
        height, width = (int(side) for side in image_size)
        if height < 1 or width < 1:
            raise ValueError(f"DSA.sample: image_size must be positive, got {tuple(image_size)}")
        if self.config.mode == "single":
            choice = int(torch.randint(len(self.families), (1,), generator=generator, device=generator.device))
            chosen: tuple[str, ...] = (self.families[choice],)
        else:
            chosen = self.families
        values: dict[str, Tensor] = {}
        for name in chosen:
            values.update(_REGISTRY[name].sample(self.config, batch_size, (height, width), generator))
        params = DSAParams(families=chosen, image_size=(height, width), **values)
        return params.to(device) if device is not None else params

    def apply(self, x: Tensor, params: DSAParams) -> Tensor:
        """Apply ``params.families`` to ``x`` (``B x C x H x W``); deterministic, differentiable in ``x``.

        Parameters of batch 1 transform every sample identically; parameters of batch ``B``
        need ``x`` of batch ``B``. Consecutive affine families are composed into one resampling.
        """
        if x.dim() != 4 or not x.is_floating_point():
            raise ValueError(f"DSA.apply: expected a float tensor B x C x H x W, got {x.dtype} {tuple(x.shape)}")
        if tuple(x.shape[-2:]) != tuple(params.image_size):
            raise ValueError(
                f"DSA.apply: image size {tuple(x.shape[-2:])} differs from the sampled {tuple(params.image_size)}"
            )
        if params.batch_size not in (1, x.shape[0]):
            raise ValueError(
                f"DSA.apply: parameters for batch {params.batch_size} cannot apply to batch {x.shape[0]}; "
                "use batch 1 (shared) or the same batch size"
            )
        with autocast_disabled(x.device):  # augmentation is data handling: float32 also under mixed precision
            return self._apply(x, params)

    def _apply(self, x: Tensor, params: DSAParams) -> Tensor:
        pending_theta: Tensor | None = None  # composed affine map of consecutive affine families
        for name in params.families:
            family = _REGISTRY[name]
            if family.theta is not None:
                theta = family.theta(params, x.dtype, x.device)
                # Sequential resampling with A1 then A2 reads x at A1 @ A2 @ p.
                pending_theta = theta if pending_theta is None else _compose(pending_theta, theta)
                continue
            if pending_theta is not None:
                x, pending_theta = _resample(x, pending_theta), None
            x = family.apply(x, params)
        if pending_theta is not None:
            x = _resample(x, pending_theta)
        return x

    def __call__(self, x: Tensor, generator: torch.Generator) -> Tensor:
        """Augment ``x`` with its own random parameters per sample (one family per call in ``single``)."""
        if x.dim() != 4:
            raise ValueError(f"DSA: expected a tensor B x C x H x W, got shape {tuple(x.shape)}")
        params = self.sample(x.shape[0], (x.shape[-2], x.shape[-1]), generator, device=x.device)
        return self.apply(x, params)

    def siamese(self, batches: Sequence[Tensor], generator: torch.Generator) -> list[Tensor]:
        """Apply one shared transformation (parameters of batch 1) to every batch.

        This is DSA's siamese augmentation: e.g. a real and a synthetic batch of one class see the
        same crop, flip, rotation, so matching their gradients or features compares like with like.
        """
        if not batches:
            return []
        first = batches[0]
        params = self.sample(1, (first.shape[-2], first.shape[-1]), generator, device=first.device)
        return [self.apply(batch, params) for batch in batches]


def _compose(first: Tensor, second: Tensor) -> Tensor:
    """The affine theta of resampling with ``first`` then ``second``: ``first @ second`` (2 x 3 each)."""
    linear = first[:, :, :2] @ second[:, :, :2]
    offset = first[:, :, :2] @ second[:, :, 2:] + first[:, :, 2:]
    return torch.cat([linear, offset], dim=2)
