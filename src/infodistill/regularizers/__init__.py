"""Regularizers: loss terms over the synthetic set that the distillation loop adds, with a weight, to the
method's loss."""

from infodistill.regularizers.base import Regularizer
from infodistill.regularizers.cmi import (
    CMIRegularizer,
    cmi_from_features,
    cmi_per_proxy,
    cmi_share_from_features,
    empirical_cmi,
    per_sample_kl,
    pool_cmi,
    vectorise_proxies,
)
from infodistill.regularizers.mim import MIMRegularizer, info_nce

__all__ = [
    "CMIRegularizer",
    "MIMRegularizer",
    "Regularizer",
    "cmi_from_features",
    "cmi_per_proxy",
    "cmi_share_from_features",
    "empirical_cmi",
    "info_nce",
    "per_sample_kl",
    "pool_cmi",
    "vectorise_proxies",
]
