"""The shard plan: deterministic, fixed-size, split over array tasks, SLURM-aware."""

import numpy as np
import pytest

from img_lightning.config.loading import ConfigError
from preprocessing.pickapic import PairTable, ReaderStats
from preprocessing.plan import build_plan, task_from_env


def _table(n: int, files: int = 3, rows_per_group: int = 10) -> PairTable:
    fi = np.arange(n) % files
    row = np.arange(n) // files
    return PairTable(
        files=[f"/data/train-{k:05d}.parquet" for k in range(files)],
        file_index=fi.astype(np.int32), row=row.astype(np.int64),
        row_group=(row // rows_per_group).astype(np.int32),
        caption=[f"c{i}" for i in range(n)], winner_uid=[f"w{i}" for i in range(n)],
        loser_uid=[f"l{i}" for i in range(n)], winner_index=np.zeros(n, np.int8),
        ranking_id=[None] * n, pair_id=[f"{i:024x}" for i in range(n)], stats=ReaderStats(kept=n),
    )


@pytest.mark.parametrize("shuffle", ["pairs", "row_groups"])
def test_plan_is_a_deterministic_permutation_in_fixed_size_shards(shuffle):
    table = _table(103)
    a, b = build_plan(table, 10, seed=3, shuffle=shuffle), build_plan(table, 10, seed=3, shuffle=shuffle)
    assert np.array_equal(a.order, b.order) and a.fingerprint(table) == b.fingerprint(table)
    assert sorted(a.order.tolist()) == list(range(103))
    assert not np.array_equal(a.order, np.arange(103))  # actually shuffled
    assert a.num_shards == 11 and [len(a.shard_pairs(k)) for k in range(11)] == [10] * 10 + [3]
    c = build_plan(table, 10, seed=4, shuffle=shuffle)
    assert not np.array_equal(a.order, c.order) and a.fingerprint(table) != c.fingerprint(table)
    with pytest.raises(IndexError):
        a.shard_pairs(11)


def test_pair_plan_depends_only_on_pair_ids():
    table = _table(50)
    plan = build_plan(table, 7, seed=0)
    # the same pairs listed in another order (e.g. files renamed) give the same sequence of pair ids
    perm = np.random.default_rng(0).permutation(50)
    shuffled = _table(50)
    shuffled.pair_id = [table.pair_id[i] for i in perm]
    other = build_plan(shuffled, 7, seed=0)
    assert [table.pair_id[i] for i in plan.order] == [shuffled.pair_id[i] for i in other.order]


def test_row_group_plan_reads_each_group_contiguously():
    table = _table(120, files=2, rows_per_group=10)  # 12 groups of 10 pairs
    plan = build_plan(table, 10, seed=1, shuffle="row_groups")
    groups = [(int(table.file_index[i]), int(table.row_group[i])) for i in plan.order]
    runs = [g for k, g in enumerate(groups) if k == 0 or g != groups[k - 1]]
    assert len(runs) == len(set(groups)) == 12  # every group appears as one contiguous run


def test_tasks_cover_every_shard_once():
    plan = build_plan(_table(95), 10)
    owned = [plan.owned(i, 3) for i in range(3)]
    assert owned[1] == [1, 4, 7]
    assert sorted(sum(owned, [])) == list(range(plan.num_shards))
    with pytest.raises(ValueError):
        plan.owned(3, 3)


def test_task_from_env(monkeypatch):
    for var in ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT", "SLURM_ARRAY_TASK_MIN"):
        monkeypatch.delenv(var, raising=False)
    assert task_from_env(None, None) == (0, 1)
    assert task_from_env(2, 4) == (2, 4)
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "5")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "8")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "1")  # --array=1-8
    assert task_from_env(None, None) == (4, 8)
    assert task_from_env(0, 2) == (0, 2)  # explicit flags win
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "0")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "8")
    with pytest.raises(ConfigError, match="contiguous"):
        task_from_env(None, None)
