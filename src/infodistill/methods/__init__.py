"""Distillation methods. Importing this package registers every method by name (``--method NAME``)."""

from infodistill.methods.base import (
    METHOD_REGISTRY,
    ClassUpdate,
    DistillContext,
    Method,
    MethodDefaults,
    MethodSetup,
    method_class,
    method_fields,
    method_settings,
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
from infodistill.methods.mtt import TrajectoryMatching  # noqa: E402  isort: skip
from infodistill.methods.datm import DifficultyAlignedMatching  # noqa: E402  isort: skip
from infodistill.methods.idc import IDC  # isort: skip
from infodistill.methods.sre2l import DWA, SRe2L  # isort: skip

__all__ = [
    "DWA",
    "IDC",
    "METHOD_REGISTRY",
    "ClassUpdate",
    "DatasetCondensation",
    "DifficultyAlignedMatching",
    "DistillContext",
    "DistributionMatching",
    "GradientMatching",
    "Method",
    "MethodDefaults",
    "MethodSetup",
    "SRe2L",
    "SiameseAugmentedCondensation",
    "TrajectoryMatching",
    "gradient_distance",
    "method_class",
    "method_fields",
    "method_settings",
    "register_method",
]
