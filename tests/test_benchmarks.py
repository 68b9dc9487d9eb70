"""The GPU benchmark's CPU smoke version, so the script cannot rot between GPU runs (no timing is
asserted: its figures mean nothing on a CPU)."""

from __future__ import annotations

import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def test_gpu_step_smoke_runs_both_storages_through_the_real_loader(tmp_path, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    sys.modules.pop("gpu_step", None)
    import gpu_step

    assert gpu_step.main(["--smoke", "--pairs", "24", "--steps", "3", "--warmup", "1", "--workers", "1",
                          "--cache-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "smoke run" in out
    rows = [line.split() for line in out.splitlines() if line.split()[:1] in (["fp16"], ["fp8"])]
    assert [r[0] for r in rows] == ["fp16", "fp8"] and all(len(r) == 10 for r in rows)
    assert list(tmp_path.iterdir()) == []  # its caches are cleaned up
