"""Parameterisations: how stored tensors become synthetic images."""

from infodistill.synthetic.base import SyntheticSet
from infodistill.synthetic.pixels import PixelSet

__all__ = ["PixelSet", "SyntheticSet"]
