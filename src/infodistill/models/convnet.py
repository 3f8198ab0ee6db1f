"""ConvNet, the standard dataset-distillation backbone (DC/DM/MTT): D blocks of conv-norm-ReLU-avgpool.

``ConvNetGAP`` is the same network with a globally average-pooled embedding (``width`` features, like a
ResNet's), the kind of proxy the CMI regularizer needs: a ConvNet's own ``embed`` is its flattened
spatial map, over which a softmax measures where activations sit rather than what the image shows.
"""

from __future__ import annotations

from torch import nn

from infodistill.models.base import DistillModel, FeatureMapSize
from infodistill.models.norm import make_norm
from infodistill.models.registry import ModelSpec, register_family


class ConvNet(DistillModel):
    """``depth`` blocks of [conv3x3 -> norm -> ReLU -> AvgPool2d(2)], then a linear classifier.

    Following the original DC/DM code, a 1-channel input gets padding 3 in the first convolution,
    so 28x28 digits become 32x32 and end at the same 4x4 map as 32x32 colour images.
    """

    def __init__(
        self,
        channels: int,
        num_classes: int,
        image_size: tuple[int, int],
        depth: int = 3,
        width: int = 128,
        norm: str = "in",
        pooled: bool = False,
    ) -> None:
        super().__init__()
        size = FeatureMapSize(f"ConvNet{'GAP' if pooled else ''}-{depth}-{width}-{norm}", image_size)
        layers: list[nn.Module] = []
        in_channels = channels
        for block in range(depth):
            padding = 3 if channels == 1 and block == 0 else 1
            layers += [
                nn.Conv2d(in_channels, width, kernel_size=3, padding=padding),
                make_norm(norm, width),
                nn.ReLU(),
                nn.AvgPool2d(kernel_size=2, stride=2),
            ]
            size.conv(3, padding=padding)
            size.pool(2)
            in_channels = width
        if pooled:
            layers.append(nn.AdaptiveAvgPool2d(1))
        self.features = nn.Sequential(*layers)
        self.feature_dim = width if pooled else width * size.area
        self.pooled_embedding = pooled
        self.classifier = nn.Linear(self.feature_dim, num_classes)


@register_family("ConvNet", depth_style="token", default_depth=3, default_width=128, default_norm="in")
def build_convnet(spec: ModelSpec, channels: int, num_classes: int, image_size: tuple[int, int]) -> ConvNet:
    """Registry builder for ``ConvNet[-D[-W]][-norm]``."""
    assert spec.depth is not None and spec.width is not None
    return ConvNet(channels, num_classes, image_size, depth=spec.depth, width=spec.width, norm=spec.norm)


@register_family("ConvNetGAP", depth_style="token", default_depth=3, default_width=128, default_norm="in")
def build_pooled_convnet(spec: ModelSpec, channels: int, num_classes: int, image_size: tuple[int, int]) -> ConvNet:
    """Registry builder for ``ConvNetGAP[-D[-W]][-norm]``: a ConvNet whose embedding is globally pooled."""
    assert spec.depth is not None and spec.width is not None
    return ConvNet(channels, num_classes, image_size, depth=spec.depth, width=spec.width, norm=spec.norm, pooled=True)
