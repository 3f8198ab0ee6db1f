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
    RestrictedUnpickler,
    Splits,
    dataset_info,
    load_dataset,
    load_restricted_pickle,
    read_idx,
    resolve_data_root,
)
from infodistill.data.sampler import ClassSampler

__all__ = [
    "DATA_ENV_VAR",
    "DATASET_NAMES",
    "DATASET_PREFIXES",
    "DATASET_REGISTRY",
    "ClassSampler",
    "DatasetInfo",
    "DatasetSpec",
    "MissingFiles",
    "RealData",
    "RestrictedUnpickler",
    "Splits",
    "dataset_info",
    "load_dataset",
    "load_restricted_pickle",
    "read_idx",
    "resolve_data_root",
]
