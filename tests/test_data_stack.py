"""The data stack both training stages share (img_lightning/data/{plan,readers,batch_loader,resumable}.py),
on toy requests: what each piece promises whichever stage plugs into it."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from img_lightning.data.batch_loader import BatchLoader
from img_lightning.data.plan import PAD, BatchRequest, RankPlan, rank_batches
from img_lightning.data.readers import ReaderPool
from img_lightning.data.resumable import ResumableDataModule
from img_lightning.errors import UserError

# ---------------------------------------------------------------------------------------------- plan


def reverse(ids, seed, epoch):
    """A plugged-in ordering: the ids backwards, rolled by the epoch (seed ignored)."""
    return np.roll(ids[::-1], epoch)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_a_plugged_in_ordering_is_cut_into_global_steps_the_same_way(world):
    ids = np.arange(10, 33)  # 23 samples
    order = reverse(ids, 0, 2)
    plans = [rank_batches(ids, batch_size=2, rank=r, world_size=world, seed=0, epoch=2, shuffle=True, order=reverse)
             for r in range(world)]
    steps = len(ids) // (2 * world)
    assert [len(p) for p in plans] == [steps] * world  # equal counts: no DDP hang
    for step in range(steps):  # global step j = the contiguous block j of the order, rank r its r-th slice
        block = order[step * 2 * world : (step + 1) * 2 * world]
        assert np.concatenate([plans[r][step] for r in range(world)]).tolist() == block.tolist()


@pytest.mark.parametrize("pad", [False, True])
@pytest.mark.parametrize("n, world, batch", [(11, 3, 2), (12, 3, 2), (1, 2, 4), (23, 2, 5)])
def test_evaluation_plans_cover_every_sample_once_and_pad_to_equal_ranks(n, world, batch, pad):
    ids = np.arange(100, 100 + n)
    plans = [RankPlan(ids, batch_size=batch, rank=r, world_size=world, shuffle=False, pad=pad) for r in range(world)]
    got = [[tuple(req.indices) for req in plan] for plan in plans]
    assert [len(g) for g in got] == [len(p) for p in plans]  # len() says what iteration yields
    real = sorted(i for g in got for b in g for i in b if i != PAD)
    assert real == ids.tolist()
    if pad:  # same batches of the same sizes on every rank (FSDP gathers inside each forward)
        assert len({tuple(len(b) for b in g) for g in got}) == 1
    else:
        assert PAD not in {i for g in got for b in g for i in b}


def test_the_plan_reads_its_start_and_rank_when_iteration_begins():
    starts = iter([(3, 2), (4, 0)])
    plan = RankPlan(np.arange(24), batch_size=2, rank=0, world_size=2, seed=1, start_fn=lambda: next(starts))
    plan.rank = 1  # set after construction, as a test of a two-rank layout does
    first = list(plan)
    assert [(r.epoch, r.position) for r in first] == [(3, p) for p in range(2, 6)]
    assert [r.indices for r in first] == [b.tolist() for b in plan.batches(3)[2:]]
    second = list(plan)  # the next pass asks again
    assert [(r.epoch, r.position) for r in second] == [(4, p) for p in range(6)]
    other_rank = RankPlan(np.arange(24), batch_size=2, rank=0, world_size=2, seed=1).batches(3)
    assert not {i for b in other_rank for i in b.tolist()} & {i for r in first for i in r.indices}


# ---------------------------------------------------------------------------------------------- readers


@pytest.mark.parametrize("workers", [0, 1, 3])
def test_reader_pool_hands_batches_over_in_request_order(workers):
    delays = np.random.default_rng(0).uniform(0, 0.01, 30)

    def read(i):
        time.sleep(delays[i])  # out-of-order completion across threads
        return i * 10

    pool = ReaderPool(workers, prefetch=2, name="test-order")
    assert list(pool.map(read, range(30))) == [i * 10 for i in range(30)]
    pool.close()


def test_reader_pool_reads_ahead_no_further_than_its_queue():
    drawn = []

    def requests():
        for i in range(50):
            drawn.append(i)
            yield i

    pool = ReaderPool(2, prefetch=3, name="test-bound")
    out = pool.map(lambda i: i, requests())
    for consumed in range(1, 20):
        assert next(out) == consumed - 1
        # the consumer has taken `consumed` batches; at most in_flight more are being read
        assert len(drawn) <= consumed + pool.in_flight
    out.close()
    pool.close()


def test_reader_pool_counts_the_wait_inline_and_on_threads():
    for workers in (0, 2):
        pool = ReaderPool(workers, prefetch=1, name="test-wait")
        assert list(pool.map(lambda i: time.sleep(0.05) or i, range(4))) == [0, 1, 2, 3]
        # at least the time the consumer could not have had the first batch (>= one read)
        assert pool.wait_seconds >= 0.05
        pool.close()


def test_leaving_early_cancels_the_reads_not_started_and_close_stops_the_threads():
    started, release = [], threading.Event()

    def read(i):
        started.append(i)
        release.wait(5)
        return i

    pool = ReaderPool(2, prefetch=2, name="test-close")
    out = pool.map(read, range(100))
    threading.Timer(0.05, release.set).start()
    assert next(out) == 0
    out.close()  # the consumer leaves (Lightning at max_steps)
    pool.close()
    assert len(started) <= 1 + pool.in_flight  # nothing beyond what was queued ever ran
    assert not [t for t in threading.enumerate() if t.name.startswith("test-close")]
    assert list(pool.map(lambda i: i, range(3))) == [0, 1, 2]  # a new pass starts the threads again
    pool.close()


def test_a_failed_read_reaches_the_consumer_at_its_place():
    def read(i):
        if i == 3:
            raise ValueError("bad record 3")
        return i

    got = []
    with pytest.raises(ValueError, match="bad record 3"):
        for batch in ReaderPool(2, prefetch=2, name="test-error").map(read, range(10)):
            got.append(batch)
    assert got == [0, 1, 2]


# ---------------------------------------------------------------------------------------------- loader


class ToyLoader(BatchLoader):
    """A stage whose sample ``i`` is the number ``i``."""

    def read_batch(self, request: BatchRequest) -> dict:
        return {"ids": torch.tensor(request.indices)}


def test_batch_loader_stamps_each_batch_with_its_place_in_the_run():
    plan = RankPlan(np.arange(12), batch_size=3, rank=0, world_size=1, seed=0, start_fn=lambda: (2, 1))
    loader = ToyLoader(plan, num_workers=2, prefetch=1)
    batches = list(loader)
    assert len(loader) == 4 and len(batches) == 3 and loader.batch_sampler is plan
    assert [(int(b["epoch"]), int(b["position"])) for b in batches] == [(2, 1), (2, 2), (2, 3)]
    assert [b["ids"].tolist() for b in batches] == [b.tolist() for b in plan.batches(2)[1:]]
    assert loader.wait_seconds >= 0.0
    loader.close()


# ---------------------------------------------------------------------------------------------- DataModule


class ToyDataModule(ResumableDataModule):
    def __init__(self, cfg, n: int = 20) -> None:
        super().__init__(cfg)
        self.n = n
        self.seen_eval = 0

    def setup(self, stage=None) -> None:
        self.train_ids = np.arange(self.n)

    def train_dataloader(self) -> ToyLoader:
        self.train_loader = ToyLoader(self.train_plan(), num_workers=0)
        return self.train_loader

    def on_batch(self, batch, training):
        if not training:
            self.seen_eval += 1
        return batch

    def extra_state(self):
        return {"n": self.n}

    def restore_extra(self, state):
        self.restored_n = state["n"]

    def resume_problems(self, state):
        return [] if state.get("n") in (None, self.n) else [f"n is {self.n}, the checkpoint's {state['n']}"]

    def resume_refused(self, problems):
        return UserError("toy: " + "; ".join(problems))


def _toy(world=1, training=True, n=20):
    dm = ToyDataModule(SimpleNamespace(batch_size=2, val_batch_size=None, seed=3), n)
    dm.trainer = SimpleNamespace(world_size=world, global_rank=0, training=training)
    dm.setup()
    return dm


def test_the_position_is_that_of_the_last_batch_handed_to_training():
    dm = _toy()
    batches = list(dm.train_dataloader())
    assert dm.steps_per_epoch == 10 == len(batches)
    for b in batches[:4]:
        assert dm.on_before_batch_transfer(b, 0) is b
    assert (dm.position.epoch, dm.position.batches_done) == (0, 4)
    dm.trainer.training = False  # a validation batch is not a trained one
    dm.on_before_batch_transfer(batches[7], 0)
    assert (dm.position.epoch, dm.position.batches_done, dm.seen_eval) == (0, 4, 1)
    state = dm.state_dict()
    assert state == {"epoch": 0, "batches_done": 4, "world_size": 1, "batch_size": 2, "n": 20}

    resumed = _toy()
    resumed.load_state_dict(state)
    rest = list(resumed.train_dataloader())
    assert resumed.restored_n == 20
    assert [b["ids"].tolist() for b in rest] == [b["ids"].tolist() for b in batches[4:]]  # exactly the rest
    # then the next epoch, from its start; asked twice (Lightning may), the same answer
    for _ in range(2):
        first = next(iter(resumed.train_dataloader()))
        assert (int(first["epoch"]), int(first["position"])) == (1, 0)


def test_a_checkpoint_of_another_layout_or_other_data_is_refused():
    state = _toy().state_dict()
    with pytest.raises(UserError, match="toy: world_size is 2, the checkpoint's run had 1"):
        _toy(world=2).load_state_dict(state)
    with pytest.raises(UserError, match="n is 30, the checkpoint's 20"):
        _toy(n=30).load_state_dict(state)


def test_teardown_stops_the_reader_threads():
    dm = _toy()
    dm.cfg.batch_size = 1
    dm.train_loader = ToyLoader(dm.train_plan(), num_workers=2, prefetch=1, thread_name="test-teardown")
    next(iter(dm.train_loader))
    assert [t for t in threading.enumerate() if t.name.startswith("test-teardown")]
    dm.teardown("fit")
    assert not [t for t in threading.enumerate() if t.name.startswith("test-teardown")]
