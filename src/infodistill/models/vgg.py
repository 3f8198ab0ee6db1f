"""VGG-11/13/16/19 without the large fully connected head, as used for cross-architecture evaluation."""

from __future__ import annotations

from torch import nn

from infodistill.errors import UserInputError
from infodistill.models.base import DistillModel, FeatureMapSize
from infodistill.models.norm import make_norm
from infodistill.models.registry import ModelSpec, register_family

POOL = "M"
VGG_CONFIGS: dict[int, tuple[int | str, ...]] = {
    11: (64, POOL, 128, POOL, 256, 256, POOL, 512, 512, POOL, 512, 512, POOL),
    13: (64, 64, POOL, 128, 128, POOL, 256, 256, POOL, 512, 512, POOL, 512, 512, POOL),
    16: (64, 64, POOL, 128, 128, POOL, 256, 256, 256, POOL, 512, 512, 512, POOL, 512, 512, 512, POOL),
    19: (
        64, 64, POOL, 128, 128, POOL, 256, 256, 256, 256, POOL,
        512, 512, 512, 512, POOL, 512, 512, 512, 512, POOL,
    ),
}  # fmt: skip
"""Depth -> sequence of conv output channels and max-pools (the standard VGG configurations)."""


class VGG(DistillModel):
    """Stacked conv3x3-norm-ReLU with max-pools per ``VGG_CONFIGS[depth]``, then one linear classifier.

    A 1-channel input gets padding 3 in the first convolution (28x28 -> 32x32), as in the DC code.
    """

    def __init__(
        self,
        channels: int,
        num_classes: int,
        image_size: tuple[int, int],
        depth: int = 11,
        norm: str = "in",
    ) -> None:
        super().__init__()
        if depth not in VGG_CONFIGS:
            raise UserInputError(f"VGG depth {depth} is not one of {', '.join(map(str, VGG_CONFIGS))}")
        size = FeatureMapSize(f"VGG{depth}-{norm}", image_size)
        layers: list[nn.Module] = []
        in_channels = channels
        for item in VGG_CONFIGS[depth]:
            if item == POOL:
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
                size.pool(2)
                continue
            assert isinstance(item, int)
            padding = 3 if channels == 1 and not layers else 1
            layers += [
                nn.Conv2d(in_channels, item, kernel_size=3, padding=padding),
                make_norm(norm, item),
                nn.ReLU(),
            ]
            size.conv(3, padding=padding)
            in_channels = item
        self.features = nn.Sequential(*layers)
        self.feature_dim = in_channels * size.area
        self.classifier = nn.Linear(self.feature_dim, num_classes)


@register_family("VGG", depth_style="glued", allowed_depths=tuple(VGG_CONFIGS), default_norm="in")
def build_vgg(spec: ModelSpec, channels: int, num_classes: int, image_size: tuple[int, int]) -> VGG:
    """Registry builder for ``VGG<11|13|16|19>[-norm]``."""
    assert spec.depth is not None
    return VGG(channels, num_classes, image_size, depth=spec.depth, norm=spec.norm)
