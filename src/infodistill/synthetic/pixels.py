"""The plain parameterisation: every pixel of every synthetic image is a learnable value."""

from __future__ import annotations

import torch
from torch import nn

from infodistill.data import ClassSampler
from infodistill.errors import UserInputError
from infodistill.synthetic.base import SyntheticSet, register_parameterisation

INITS = ("real", "noise")


def check_init_and_shape(sampler: ClassSampler, init: str, what: str) -> tuple[int, int, int]:
    """The sampler's image shape C x H x W, after refusing an unknown ``init`` or images that are not C x H x W."""
    if init not in INITS:
        raise UserInputError(f"init '{init}' is not one of: {', '.join(INITS)}")
    image_shape = tuple(sampler.images.shape[1:])
    if len(image_shape) != 3:
        raise UserInputError(f"{what} needs C x H x W images, got {list(image_shape)}")
    return image_shape


@register_parameterisation("pixels")
class PixelSet(SyntheticSet):
    """``images_per_class`` learnable images per class, stored as one N x C x H x W tensor."""

    def __init__(self, num_classes: int, images_per_class: int, image_shape: tuple[int, int, int]) -> None:
        super().__init__(num_classes, images_per_class)
        self.pixels = nn.Parameter(torch.zeros(num_classes * images_per_class, *image_shape))

    @classmethod
    def initialise(
        cls, sampler: ClassSampler, images_per_class: int, init: str, generator: torch.Generator
    ) -> PixelSet:
        """Start from randomly drawn real images of each class, or from standard-normal noise."""
        if init not in INITS:
            raise UserInputError(f"init '{init}' is not one of: {', '.join(INITS)}")
        real = sampler.sample_classes(images_per_class, generator)  # classes x ipc x C x H x W
        channels, height, width = real.shape[2:]
        synthetic = cls(sampler.num_classes, images_per_class, (channels, height, width))
        with torch.no_grad():
            if init == "real":
                synthetic.pixels.copy_(real.flatten(0, 1).float())
            else:
                synthetic.pixels.copy_(torch.randn(synthetic.pixels.shape, generator=generator))
        return synthetic

    def images(self) -> torch.Tensor:
        return self.pixels

    def stored_tensors(self) -> dict[str, torch.Tensor]:
        """Nothing beyond the images: the stored tensor is the image tensor."""
        return {}
