"""The data stack both training stages use: rank/epoch plan, reader threads, exact resume; and the
aligner's DataModule over a feature cache.

* :mod:`.plan` - which rank reads which samples in which order per epoch (the ordering plugged in);
* :mod:`.readers` - the reader-thread pool: bounded, in order, data-wait accounting;
* :mod:`.batch_loader` - plan + readers = one rank's loader (a stage fills in what a batch is);
* :mod:`.position`, :mod:`.resumable` - the checkpointed position and the DataModule base;
* :mod:`.step_counts` - counts summed over ranks at each optimizer step, the bad-share rule;
* :mod:`.loader`, :mod:`.datamodule`, :mod:`.device_check` - the aligner's feature-cache stage.
"""

from .datamodule import CacheMismatchError, ExpectedFeatures, FeatureCacheDataModule, check_cache
from .plan import PAD, BatchRequest, RankPlan, epoch_permutation, rank_batches, shuffled

__all__ = [
    "PAD",
    "BatchRequest",
    "CacheMismatchError",
    "ExpectedFeatures",
    "FeatureCacheDataModule",
    "RankPlan",
    "check_cache",
    "epoch_permutation",
    "rank_batches",
    "shuffled",
]
