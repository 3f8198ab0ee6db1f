"""Parameterisations: how stored tensors become synthetic images. Importing registers each by name."""

from infodistill.synthetic.base import (
    PARAMETERISATION_REGISTRY,
    SyntheticSet,
    build_synthetic,
    parameterisation_settings,
    register_parameterisation,
)

from infodistill.synthetic.pixels import INITS, PixelSet  # noqa: E402  isort: skip
from infodistill.synthetic.multi import MultiFormationSet  # isort: skip
from infodistill.synthetic.lowrank import LowRankSet  # isort: skip

__all__ = ["INITS", "LowRankSet", "PARAMETERISATION_REGISTRY", "MultiFormationSet", "PixelSet", "SyntheticSet",
           "build_synthetic", "parameterisation_settings", "register_parameterisation"]
