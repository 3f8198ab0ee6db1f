"""Multi-formation (IDC; Kim et al., ICML 2022): each stored image holds ``factor**2`` smaller images.

A stored image (C x H x W) is cut into a ``factor x factor`` grid of ``(H/factor) x (W/factor)`` tiles;
each tile is upsampled back to H x W and is one training image. At the storage of ``ipc`` images per
class the set therefore offers ``ipc * factor**2`` images per class (factor 2: four times as many).

Decoding (:meth:`MultiFormationSet.images`): stored image ``s`` gives its tiles in row-major order
(row 0 left to right, then row 1, ...), so decoded image ``s * factor**2 + i * factor + j`` is tile
``(i, j)`` of stored image ``s``. Stored images are ordered by class, so the decoded images are too.
Upsampling is ``F.interpolate`` with mode ``bilinear`` (``align_corners=False``, as IDC decodes with
``nn.Upsample(mode="bilinear")``) or ``nearest``.

Encoding (:func:`encode`) goes the other way: each group of ``factor**2`` consecutive images is
shrunk by area averaging (the mean of each ``factor x factor`` block) and the results are placed in
the tiles of one stored image, in the same row-major order. With ``nearest`` upsampling a tile is
repeated in ``factor x factor`` blocks and area averaging takes it back, so
``encode(decode(s)) == s`` exactly (the averages are computed in float64, where the block sums are
exact). With ``bilinear`` the round trip is exact only for images that are constant on each tile.

IDC initialises a multi-formation set from ``ipc * factor**2`` real images per class, shrunk with
nearest-neighbour subsampling; here they are shrunk by area averaging, which keeps more of each image.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from infodistill.data import ClassSampler
from infodistill.errors import UserInputError
from infodistill.settings import AT_LEAST_ONE, setting
from infodistill.synthetic.base import SyntheticSet, register_parameterisation
from infodistill.synthetic.pixels import check_init_and_shape

UPSAMPLE_MODES = ("bilinear", "nearest")


@dataclass(frozen=True)
class MultiSettings:
    """Settings of multi-formation images (``--param multi``)."""

    title: ClassVar[str] = "multi-formation images (--param multi)"
    factor: int = setting(2, "each stored image holds FxF images", bounds=AT_LEAST_ONE, metavar="F")
    upsample: str = setting("bilinear", "how a stored image is decoded", choices=UPSAMPLE_MODES)


def check_factor(factor: object, height: int, width: int) -> int:
    """``factor`` as an int, or a one-line error when it is not an integer >= 1 dividing both sides."""
    if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1:
        raise UserInputError(f"factor {factor!r} is invalid; it must be an integer >= 1 (1 stores plain pixels)")
    if height % factor or width % factor:
        raise UserInputError(f"factor {factor} does not divide the image size {height}x{width}; "
                             "choose a factor that divides both sides")
    return factor


def check_upsample(upsample: object) -> str:
    """``upsample`` if it is a known mode, else a one-line error listing the modes."""
    if upsample not in UPSAMPLE_MODES:
        raise UserInputError(f"upsample '{upsample}' is not one of: {', '.join(UPSAMPLE_MODES)}")
    return str(upsample)


def decode(stored: Tensor, factor: int, upsample: str = "bilinear") -> Tensor:
    """Stored images S x C x H x W -> decoded images (S * factor**2) x C x H x W (tiles row-major)."""
    count, channels, height, width = stored.shape
    check_factor(factor, height, width)
    check_upsample(upsample)
    if factor == 1:
        return stored
    tile_h, tile_w = height // factor, width // factor
    tiles = (
        stored.reshape(count, channels, factor, tile_h, factor, tile_w)
        .permute(0, 2, 4, 1, 3, 5)  # S x row x column x C x h x w
        .reshape(count * factor * factor, channels, tile_h, tile_w)
    )
    align = False if upsample == "bilinear" else None
    return F.interpolate(tiles, size=(height, width), mode=upsample, align_corners=align)


def encode(images: Tensor, factor: int) -> Tensor:
    """Images (S * factor**2) x C x H x W -> stored images S x C x H x W; the inverse of :func:`decode`.

    Consecutive groups of ``factor**2`` images fill one stored image; image ``k`` of a group is area
    averaged to the tile size and placed in tile ``(k // factor, k % factor)``. Exact inverse of
    decoding with ``nearest``; for ``bilinear`` see the module docstring.
    """
    total, channels, height, width = images.shape
    check_factor(factor, height, width)
    per_stored = factor * factor
    if total % per_stored:
        raise UserInputError(f"encode needs a multiple of factor^2 = {per_stored} images, got {total}")
    if factor == 1:
        return images
    # float64 block sums are exact, so a block of equal values averages back to that value exactly.
    shrunk = F.avg_pool2d(images.double(), kernel_size=factor, stride=factor).to(images.dtype)
    tile_h, tile_w = height // factor, width // factor
    return (
        shrunk.reshape(total // per_stored, factor, factor, channels, tile_h, tile_w)
        .permute(0, 3, 1, 4, 2, 5)  # S x C x row x h x column x w
        .reshape(total // per_stored, channels, height, width)
    )


@register_parameterisation("multi")
class MultiFormationSet(SyntheticSet):
    """``stored_per_class`` learnable stored images per class, decoded into ``factor**2`` images each.

    ``images_per_class`` (what methods, regularizers and the artefact see) is
    ``stored_per_class * factor**2``; ``labels`` follows the decoded images. The learnable tensor
    ``stored`` has exactly the size of a :class:`~infodistill.synthetic.PixelSet` at the same IPC.
    """

    settings = MultiSettings

    def __init__(self, num_classes: int, stored_per_class: int, image_shape: tuple[int, int, int],
                 factor: int = 2, upsample: str = "bilinear") -> None:
        factor = check_factor(factor, image_shape[1], image_shape[2])
        self.factor = factor
        self.upsample = check_upsample(upsample)
        self.stored_per_class = stored_per_class
        super().__init__(num_classes, stored_per_class * factor * factor)
        self.stored = nn.Parameter(torch.zeros(num_classes * stored_per_class, *image_shape))

    @classmethod
    def initialise(
        cls, sampler: ClassSampler, images_per_class: int, init: str, generator: torch.Generator,
        factor: int = 2, upsample: str = "bilinear",
    ) -> MultiFormationSet:
        """``images_per_class`` stored images per class, from encoded real images or standard-normal noise.

        ``real`` draws ``images_per_class * factor**2`` real images per class and encodes each group
        of ``factor**2`` into one stored image. The random draws follow ``PixelSet`` (real images
        first, then the noise), so factor 1 gives exactly the pixel set of the same generator.
        """
        image_shape = check_init_and_shape(sampler, init, "multi-formation")
        factor = check_factor(factor, image_shape[1], image_shape[2])
        check_upsample(upsample)
        # Noise draws (and discards) ipc real images first, exactly as PixelSet does.
        needed = images_per_class * factor * factor if init == "real" else images_per_class
        smallest = sampler.smallest_class_size()
        if needed > smallest:
            raise UserInputError(
                f"init 'real' with ipc {images_per_class} and factor {factor} draws {needed} real images "
                f"per class, but the smallest class has {smallest}; lower ipc or factor, or use init 'noise'")
        real = sampler.sample_classes(needed, generator)  # classes x needed x C x H x W
        synthetic = cls(sampler.num_classes, images_per_class, image_shape, factor=factor, upsample=upsample)
        with torch.no_grad():
            if init == "real":
                synthetic.stored.copy_(encode(real.flatten(0, 1).float(), factor))
            else:
                synthetic.stored.copy_(torch.randn(synthetic.stored.shape, generator=generator))
        return synthetic

    def images(self) -> Tensor:
        return decode(self.stored, self.factor, self.upsample)

    def class_images(self, label: int) -> Tensor:
        """The decoded images of one class, decoding only that class's stored images."""
        start = label * self.stored_per_class
        return decode(self.stored[start : start + self.stored_per_class], self.factor, self.upsample)
