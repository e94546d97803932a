"""Shard writers, resumable loaders for WebDataset and FFCV storage, multi-resolution rescaling."""

from data_pipeline.batch import Batch
from data_pipeline.config import DataConfig
from data_pipeline.device_transforms import normalize, rescale
from data_pipeline.loader import EpochSummary, ResumableLoader, build_loader
from data_pipeline.manifest import DataError

__all__ = [
    "Batch",
    "DataConfig",
    "DataError",
    "EpochSummary",
    "ResumableLoader",
    "build_loader",
    "normalize",
    "rescale",
]
