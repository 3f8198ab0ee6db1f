"""AlexNet as used in dataset-distillation papers: five convolutions sized for 28-64 px inputs."""

from __future__ import annotations

from torch import nn

from infodistill.models.base import DistillModel, FeatureMapSize
from infodistill.models.norm import make_norm
from infodistill.models.registry import ModelSpec, register_family

# (out_channels, kernel, padding, max-pool after the block); the first padding is widened for 1-channel input.
ALEXNET_LAYERS: tuple[tuple[int, int, int, bool], ...] = (
    (128, 5, 2, True),
    (192, 5, 2, True),
    (256, 3, 1, False),
    (192, 3, 1, False),
    (192, 3, 1, True),
)
FIRST_PADDING_FOR_ONE_CHANNEL = 4


class AlexNet(DistillModel):
    """conv5-pool, conv5-pool, conv3, conv3, conv3-pool with optional norm after each conv."""

    def __init__(self, channels: int, num_classes: int, image_size: tuple[int, int], norm: str = "none") -> None:
        super().__init__()
        size = FeatureMapSize(f"AlexNet-{norm}", image_size)
        layers: list[nn.Module] = []
        in_channels = channels
        for index, (out_channels, kernel, padding, pool_after) in enumerate(ALEXNET_LAYERS):
            if index == 0 and channels == 1:
                padding = FIRST_PADDING_FOR_ONE_CHANNEL
            layers += [
                nn.Conv2d(in_channels, out_channels, kernel_size=kernel, padding=padding),
                make_norm(norm, out_channels),
                nn.ReLU(),
            ]
            size.conv(kernel, padding=padding)
            if pool_after:
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
                size.pool(2)
            in_channels = out_channels
        self.features = nn.Sequential(*layers)
        self.feature_dim = in_channels * size.area
        self.classifier = nn.Linear(self.feature_dim, num_classes)


@register_family("AlexNet", depth_style="none", default_norm="none")
def build_alexnet(spec: ModelSpec, channels: int, num_classes: int, image_size: tuple[int, int]) -> AlexNet:
    """Registry builder for ``AlexNet[-norm]``."""
    return AlexNet(channels, num_classes, image_size, norm=spec.norm)
