"""Distillation methods. Importing this package registers every method by name (``--method NAME``)."""

from infodistill.methods.base import (
    METHOD_REGISTRY,
    DistillContext,
    Method,
    MethodDefaults,
    method_class,
    register_method,
)

# Method modules register themselves on import.
from infodistill.methods.dm import DistributionMatching  # noqa: E402  isort: skip
from infodistill.methods.gradient_matching import (  # noqa: E402  isort: skip
    DatasetCondensation,
    GradientMatching,
    SiameseAugmentedCondensation,
    gradient_distance,
)

__all__ = [
    "METHOD_REGISTRY",
    "DatasetCondensation",
    "DistillContext",
    "DistributionMatching",
    "GradientMatching",
    "Method",
    "MethodDefaults",
    "SiameseAugmentedCondensation",
    "gradient_distance",
    "method_class",
    "register_method",
]
