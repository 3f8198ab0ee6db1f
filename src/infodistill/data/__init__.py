"""Real datasets in memory (readers for the published formats) and a class-wise sampler."""

from infodistill.data.datasets import (
    DATA_ENV_VAR,
    DATASET_NAMES,
    DATASET_PREFIXES,
    DATASET_REGISTRY,
    DatasetInfo,
    DatasetSpec,
    MissingFiles,
    RealData,
    Splits,
    dataset_info,
    load_dataset,
    resolve_data_root,
)
from infodistill.data.formats import RestrictedUnpickler, load_restricted_pickle, read_idx
from infodistill.data.sampler import ClassSampler
from infodistill.data.zca import WhitenedData, ZCAWhitening, whiten

__all__ = [
    "DATASET_NAMES",
    "DATASET_PREFIXES",
    "DATASET_REGISTRY",
    "DATA_ENV_VAR",
    "ClassSampler",
    "DatasetInfo",
    "DatasetSpec",
    "MissingFiles",
    "RealData",
    "RestrictedUnpickler",
    "Splits",
    "WhitenedData",
    "ZCAWhitening",
    "dataset_info",
    "load_dataset",
    "load_restricted_pickle",
    "read_idx",
    "resolve_data_root",
    "whiten",
]
