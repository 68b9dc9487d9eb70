"""The lr schedule (torch's schedulers) follows its documented formula step by step."""

from __future__ import annotations

import math

import pytest
import torch

from img_lightning.module import build_scheduler


def documented(step: int, schedule: str, warmup: int, total: int, min_ratio: float) -> float:
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


@pytest.mark.parametrize("schedule,warmup,total,min_ratio",
                         [("constant", 0, 50, 0.0), ("constant", 10, 50, 0.0), ("cosine", 0, 40, 0.0),
                          ("cosine", 7, 40, 0.1), ("cosine", 1, 20, 0.0)])
def test_schedule_matches_the_formula(schedule, warmup, total, min_ratio):
    lr = 3e-4
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    sched = build_scheduler(opt, schedule, warmup, total, min_ratio)
    for step in range(total):
        got = opt.param_groups[0]["lr"]
        want = lr * documented(step, schedule, warmup, total, min_ratio)
        assert got == pytest.approx(want, rel=1e-6, abs=1e-12), step
        opt.step()
        sched.step()


def test_unknown_schedule_is_refused():
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    with pytest.raises(ValueError, match="optim.schedule"):
        build_scheduler(opt, "linear", 0, 10)
