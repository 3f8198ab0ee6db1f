"""ResNet-10/18/34 (BasicBlock) in the small-input variant used in dataset distillation.

The stem is a stride-1 conv3x3 without max-pool, so 32x32 inputs keep full resolution in the first
stage; a global average pool makes the embedding 512-d for every input size.
"""

from __future__ import annotations

from torch import Tensor, nn

from infodistill.errors import UserInputError
from infodistill.models.base import DistillModel
from infodistill.models.norm import make_norm
from infodistill.models.registry import ModelSpec, register_family

RESNET_BLOCKS: dict[int, tuple[int, int, int, int]] = {
    10: (1, 1, 1, 1),
    18: (2, 2, 2, 2),
    34: (3, 4, 6, 3),
}
"""Depth -> number of BasicBlocks in each of the four stages."""
STAGE_PLANES: tuple[int, ...] = (64, 128, 256, 512)
STAGE_STRIDES: tuple[int, ...] = (1, 2, 2, 2)


class BasicBlock(nn.Module):
    """Two conv3x3-norm layers with a residual connection (projected when the shape changes)."""

    def __init__(self, in_planes: int, planes: int, stride: int, norm: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.norm1 = make_norm(norm, planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.norm2 = make_norm(norm, planes)
        self.relu = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False),
                make_norm(norm, planes),
            )

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNet(DistillModel):
    """Stem conv3x3 (stride 1, no max-pool), four BasicBlock stages, global average pool, linear head."""

    def __init__(
        self,
        channels: int,
        num_classes: int,
        image_size: tuple[int, int],
        depth: int = 18,
        norm: str = "in",
    ) -> None:
        super().__init__()
        if depth not in RESNET_BLOCKS:
            raise UserInputError(f"ResNet depth {depth} is not one of {', '.join(map(str, RESNET_BLOCKS))}")
        # A stride-2 conv3x3 with padding 1 maps n to ceil(n/2) >= 1, so every image size >= 1 works.
        layers: list[nn.Module] = [
            nn.Conv2d(channels, STAGE_PLANES[0], kernel_size=3, stride=1, padding=1, bias=False),
            make_norm(norm, STAGE_PLANES[0]),
            nn.ReLU(),
        ]
        in_planes = STAGE_PLANES[0]
        for planes, stride, num_blocks in zip(STAGE_PLANES, STAGE_STRIDES, RESNET_BLOCKS[depth]):
            for block in range(num_blocks):
                layers.append(BasicBlock(in_planes, planes, stride if block == 0 else 1, norm))
                in_planes = planes
        layers.append(nn.AdaptiveAvgPool2d(1))
        self.features = nn.Sequential(*layers)
        self.feature_dim = in_planes
        self.pooled_embedding = True
        self.classifier = nn.Linear(self.feature_dim, num_classes)


@register_family("ResNet", depth_style="glued", allowed_depths=tuple(RESNET_BLOCKS), default_norm="in")
def build_resnet(spec: ModelSpec, channels: int, num_classes: int, image_size: tuple[int, int]) -> ResNet:
    """Registry builder for ``ResNet<10|18|34>[-norm]``."""
    assert spec.depth is not None
    return ResNet(channels, num_classes, image_size, depth=spec.depth, norm=spec.norm)
