"""Regularizers: loss terms over the synthetic set that the distillation loop adds, with a weight, to the method's loss."""

from infodistill.regularizers.base import Regularizer
from infodistill.regularizers.cmi import (
    CMIRegularizer,
    cmi_from_features,
    cmi_per_proxy,
    empirical_cmi,
    per_sample_kl,
    vectorise_proxies,
)

__all__ = [
    "CMIRegularizer",
    "Regularizer",
    "cmi_from_features",
    "cmi_per_proxy",
    "empirical_cmi",
    "per_sample_kl",
    "vectorise_proxies",
]
