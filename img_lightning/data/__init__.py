"""Cached-feature data loading: rank/epoch plan, reader threads, exact resume."""

from .datamodule import CacheMismatchError, ExpectedFeatures, FeatureCacheDataModule, check_cache
from .plan import BatchRequest, ResumableBatchSampler, epoch_permutation, rank_batches

__all__ = [
    "BatchRequest",
    "CacheMismatchError",
    "ExpectedFeatures",
    "FeatureCacheDataModule",
    "ResumableBatchSampler",
    "check_cache",
    "epoch_permutation",
    "rank_batches",
]
