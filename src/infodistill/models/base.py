"""The base class shared by all models, and the feature-map size arithmetic used to size classifiers.

Flatten sizes are computed arithmetically at construction instead of by a dummy forward pass, so
building a model consumes random numbers only for weight initialisation and never touches
batch-norm running statistics.
"""

from __future__ import annotations

from torch import Tensor, nn

from infodistill.errors import UserInputError


class DistillModel(nn.Module):
    """A classifier split into a feature extractor and a linear head.

    Subclasses set ``self.features`` (any module mapping images to a feature map or vector),
    ``self.feature_dim`` (the size of ``embed`` output) and ``self.classifier`` (an ``nn.Linear``
    from ``feature_dim`` to the number of classes). Distribution-matching methods use ``embed``;
    everything else uses ``forward``.
    """

    feature_dim: int
    features: nn.Module
    classifier: nn.Linear
    pooled_embedding: bool = False
    """True when ``embed`` is a globally pooled feature vector (ResNet, ConvNetGAP); False when it is a
    flattened spatial map (ConvNet, AlexNet, VGG). The CMI regularizer needs a pooled one."""

    def embed(self, x: Tensor) -> Tensor:
        """Penultimate features, pooled and flattened: shape ``B x feature_dim``."""
        return self.features(x).flatten(1)

    def forward(self, x: Tensor) -> Tensor:
        """Class logits: ``classifier(embed(x))``, shape ``B x num_classes``."""
        return self.classifier(self.embed(x))


class FeatureMapSize:
    """Tracks the spatial size of a feature map through convolutions and poolings.

    Raises ``UserInputError`` naming the model and the input size as soon as the map would become
    smaller than 1x1, because such a model cannot be built for that input.
    """

    def __init__(self, model_name: str, image_size: tuple[int, int]) -> None:
        self.model_name = model_name
        self.image_size = image_size
        self.height, self.width = image_size

    def conv(self, kernel: int, stride: int = 1, padding: int = 0) -> None:
        """Apply the size rule of ``nn.Conv2d``."""
        self._set(
            (self.height + 2 * padding - kernel) // stride + 1,
            (self.width + 2 * padding - kernel) // stride + 1,
        )

    def pool(self, kernel: int = 2, stride: int | None = None) -> None:
        """Apply the size rule of ``nn.AvgPool2d`` / ``nn.MaxPool2d`` without padding."""
        self.conv(kernel, stride if stride is not None else kernel, 0)

    @property
    def area(self) -> int:
        """Number of spatial positions (height x width)."""
        return self.height * self.width

    def _set(self, height: int, width: int) -> None:
        if height < 1 or width < 1:
            image_height, image_width = self.image_size
            raise UserInputError(
                f"model {self.model_name!r} cannot take {image_height}x{image_width} images: its "
                f"layers shrink the feature map below 1x1; use a shallower model or larger images"
            )
        self.height, self.width = height, width
