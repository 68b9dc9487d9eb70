"""The shard plan: which pair goes into which fixed-size shard, identical on every run and task.

The permutation is a sort by ``sha256(seed, key)`` rather than a PRNG draw, so it depends on
nothing but the seed and the pair ids: not on NumPy's generator versions, the platform or the
number of array tasks. Shard ``k`` holds positions ``[k * size, (k + 1) * size)`` of the order;
array task ``i`` of ``n`` owns the shards ``k`` with ``k % n == i``.

``shuffle="row_groups"`` permutes parquet row groups first and the pairs inside each group second,
so consecutive shards read disjoint row groups (see ``CacheLayoutConfig.shuffle``).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from img_lightning.cache.format import SHARD_PATTERN
from img_lightning.config.loading import ConfigError

from .pickapic import PairTable

SHUFFLES = ("pairs", "row_groups")
PLAN_NAME = "plan.json"


def _rank(seed: int, keys: list[str]) -> np.ndarray:
    """Sort keys of ``keys`` under ``seed`` (first 8 bytes of sha256, big-endian)."""
    prefix = f"{seed}\x1f".encode()
    return np.array([int.from_bytes(hashlib.sha256(prefix + k.encode("utf-8")).digest()[:8], "big")
                     for k in keys], dtype=np.uint64)


@dataclass
class ShardPlan:
    order: np.ndarray  # [P] int64 pair indices, in shard order
    shard_size: int
    seed: int
    shuffle: str

    @property
    def num_pairs(self) -> int:
        return int(self.order.shape[0])

    @property
    def num_shards(self) -> int:
        return -(-self.num_pairs // self.shard_size)

    def shard_pairs(self, k: int) -> np.ndarray:
        if not 0 <= k < self.num_shards:
            raise IndexError(f"shard {k} out of range (plan has {self.num_shards})")
        return self.order[k * self.shard_size : (k + 1) * self.shard_size]

    @staticmethod
    def shard_name(k: int) -> str:
        return SHARD_PATTERN.format(k)

    @property
    def shard_names(self) -> list[str]:
        return [self.shard_name(k) for k in range(self.num_shards)]

    def owned(self, task_index: int, num_tasks: int) -> list[int]:
        if num_tasks < 1 or not 0 <= task_index < num_tasks:
            raise ValueError(f"task index {task_index} is not in [0, {num_tasks})")
        return list(range(task_index, self.num_shards, num_tasks))

    def fingerprint(self, table: PairTable) -> str:
        """sha256 of the ordered pair ids and the shard size: equal fingerprints = equal plans."""
        h = hashlib.sha256(f"{self.shard_size}\n".encode())
        for i in self.order:
            h.update(table.pair_id[int(i)].encode("ascii"))
            h.update(b"\n")
        return h.hexdigest()


def build_plan(table: PairTable, shard_size: int, seed: int = 0, shuffle: str = "pairs") -> ShardPlan:
    if shard_size < 1:
        raise ConfigError("cache.shard_size must be >= 1")
    if shuffle not in SHUFFLES:
        raise ConfigError(f"cache.shuffle={shuffle!r}; use one of {SHUFFLES}")
    n = len(table)
    pair_rank = _rank(seed, table.pair_id)
    if shuffle == "pairs" or n == 0:
        order = np.argsort(pair_rank, kind="stable")
    else:
        names = [Path(f).name for f in table.files]
        group_key = [f"{names[int(fi)]}#{int(rg)}" for fi, rg in zip(table.file_index, table.row_group, strict=True)]
        unique = sorted(set(group_key))
        group_rank = dict(zip(unique, _rank(seed, unique).tolist(), strict=True))
        ranks = np.array([group_rank[g] for g in group_key], dtype=np.uint64)
        order = np.lexsort((pair_rank, ranks))  # by group rank, then pair rank
    return ShardPlan(order=order.astype(np.int64), shard_size=int(shard_size), seed=int(seed), shuffle=shuffle)


def task_from_env(task_index: int | None, num_tasks: int | None) -> tuple[int, int]:
    """``(index, count)`` from explicit values or SLURM's array variables (default ``(0, 1)``).

    The SLURM index is made zero-based with ``SLURM_ARRAY_TASK_MIN`` so ``--array=1-8`` works.
    """
    if num_tasks is None and "SLURM_ARRAY_TASK_COUNT" in os.environ:
        num_tasks = int(os.environ["SLURM_ARRAY_TASK_COUNT"])
    if task_index is None and "SLURM_ARRAY_TASK_ID" in os.environ:
        task_index = int(os.environ["SLURM_ARRAY_TASK_ID"]) - int(os.environ.get("SLURM_ARRAY_TASK_MIN", "0"))
    num_tasks = 1 if num_tasks is None else int(num_tasks)
    task_index = 0 if task_index is None else int(task_index)
    if num_tasks < 1 or not 0 <= task_index < num_tasks:
        raise ConfigError(f"task index {task_index} is not in [0, {num_tasks}) (from --task-index/--num-tasks "
                         f"or SLURM_ARRAY_TASK_ID/SLURM_ARRAY_TASK_COUNT; use a contiguous --array range)")
    return task_index, num_tasks


def plan_document(plan: ShardPlan, table: PairTable, cache_key: str, recipe: dict) -> dict[str, Any]:
    """What ``plan.json`` records: enough to finalize and verify without re-reading the input."""
    return {
        "cache_key": cache_key,
        "recipe": recipe,
        "fingerprint": plan.fingerprint(table),
        "shuffle": plan.shuffle,
        "seed": plan.seed,
        "shard_size": plan.shard_size,
        "num_pairs": plan.num_pairs,
        "num_shards": plan.num_shards,
        "shards": plan.shard_names,
        "inputs": [{"name": Path(f).name, "bytes": os.path.getsize(f)} for f in table.files],
        "reader": table.stats.to_json(),
    }


def load_plan_document(cache_dir: Path) -> dict[str, Any]:
    path = Path(cache_dir) / PLAN_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {cache_dir} was never planned by `img-preprocess`")
    return json.loads(path.read_text(encoding="utf-8"))
