"""The same batch reads through torchdata's loaders, next to our reader threads (used by
``benchmarks/loader.py`` and ``benchmarks/finetune_mllm.py``; torchdata is not a dependency:
``pip install torchdata`` to measure it).

Each function takes ``read`` (one :class:`~img_lightning.data.plan.BatchRequest` -> one batch dict,
exactly what our loader's reader threads call) and the requests of one pass, and returns an iterable
of batches in request order:

* :func:`stateful_dataloader` - ``torchdata.stateful_dataloader.StatefulDataLoader`` (a DataLoader
  with ``state_dict``) over a map-style dataset whose item ``i`` is the whole batch of request ``i``
  (``batch_size=None``: no re-collation); ``workers`` worker *processes* (0: inline);
* :func:`nodes_loader` - ``torchdata.nodes``: ``ParallelMapper(method="thread")`` under a ``Loader``,
  ``workers`` threads (0: an inline ``Mapper``) - torchdata's own thread pool.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from torch.utils.data import Dataset


def available() -> bool:
    try:
        import torchdata  # noqa: F401
    except ImportError:
        return False
    return True


class _Batches(Dataset):
    """Item ``i``: the batch of ``requests[i]`` (forked worker processes inherit ``read``)."""

    def __init__(self, read: Callable[[Any], dict], requests: Sequence[Any]) -> None:
        self.read, self.requests = read, list(requests)

    def __len__(self) -> int:
        return len(self.requests)

    def __getitem__(self, i: int) -> dict:
        return self.read(self.requests[i])


def stateful_dataloader(read: Callable[[Any], dict], requests: Sequence[Any], workers: int, prefetch: int = 2):
    from torchdata.stateful_dataloader import StatefulDataLoader

    return StatefulDataLoader(_Batches(read, requests), batch_size=None, shuffle=False, num_workers=workers,
                              prefetch_factor=prefetch if workers else None, persistent_workers=workers > 0)


def nodes_loader(read: Callable[[Any], dict], requests: Sequence[Any], workers: int):
    import torchdata.nodes as tn

    source = tn.IterableWrapper(list(requests))
    if workers == 0:
        return tn.Loader(tn.Mapper(source, read))
    # ParallelMapper keeps 2 x num_workers items in flight: our default (data.prefetch_factor 2)
    return tn.Loader(tn.ParallelMapper(source, read, num_workers=workers, in_order=True, method="thread"))


def rotated(names: list[str], turn: int) -> list[str]:
    """``names`` starting at ``turn``'s entry (turn 0: as given, where StatefulDataLoader must fork its
    workers before any reader thread exists)."""
    k = turn % len(names)
    return names[k:] + names[:k]


def pass_rate(loader: Iterable[dict], count: Callable[[dict], float]) -> float:
    """``sum(count(batch)) / seconds`` of one pass over ``loader``."""
    total, start = 0.0, time.perf_counter()
    for batch in loader:
        total += count(batch)
    return total / (time.perf_counter() - start)
