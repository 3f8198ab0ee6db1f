"""Model zoo for dataset distillation: ConvNet, AlexNet, VGG and ResNet, built from parsed names.

Use ``build_model("ConvNet-3", channels, num_classes, (H, W), seed=...)``. Importing this package
imports the family modules, whose ``register_family`` decorators fill the name registry.
"""

from infodistill.models.base import DistillModel
from infodistill.models.norm import has_batch_norm, make_norm
from infodistill.models.registry import (
    ModelSpec,
    build_model,
    model_names_help,
    parse_model_name,
    pooled_variant,
    register_family,
    registered_families,
)

# Family modules register themselves on import (order = order in the help text).
from infodistill.models.convnet import ConvNet  # noqa: E402  isort: skip
from infodistill.models.alexnet import AlexNet  # noqa: E402  isort: skip
from infodistill.models.vgg import VGG  # noqa: E402  isort: skip
from infodistill.models.resnet import ResNet  # noqa: E402  isort: skip

__all__ = [
    "AlexNet",
    "ConvNet",
    "DistillModel",
    "ModelSpec",
    "ResNet",
    "VGG",
    "build_model",
    "has_batch_norm",
    "make_norm",
    "model_names_help",
    "parse_model_name",
    "pooled_variant",
    "register_family",
    "registered_families",
]
