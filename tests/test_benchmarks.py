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


def test_gpu_suite_smoke_runs_every_part_and_writes_one_json(tmp_path, capsys, monkeypatch, tiny_sdxl_dir,
                                                            tiny_ip_adapter_dir, tiny_llava_dir):
    import json

    monkeypatch.syspath_prepend(str(BENCHMARKS))
    for name in ("gpu_suite", "gpu_step", "loader", "preprocess"):
        sys.modules.pop(name, None)
    import gpu_suite

    world = tmp_path / "world"  # the session's tiny models, in the layout build_tiny_world reuses
    world.mkdir()
    for name, path in (("sdxl", tiny_sdxl_dir), ("ip_adapter", tiny_ip_adapter_dir), ("llava", tiny_llava_dir)):
        (world / name).symlink_to(path)
    out = tmp_path / "suite.json"
    args = ["--smoke", "--json", str(out), "--workdir", str(tmp_path / "work"), "--world", str(world)]
    assert gpu_suite.main(args) == 0
    results = json.loads(out.read_text())
    assert results["device"].startswith("smoke run")
    for part in gpu_suite.PARTS:
        assert results[part]["status"] == "ok", (part, results[part])
    assert set(results["aligner"]) >= {"fp16", "fp8"} and results["aligner"]["fp8"]["ratio"] > 0
    assert results["check"]["fp8"]["ms_per_batch_of_8"] > 0
    assert results["preprocess"]["ratio_end_to_end_over_encoders"] > 0
    assert results["finetune"]["tokens_per_s_per_device"] > 0
    assert results["denoise"]["sdxl"]["ms_with_ip"] > 0 and results["denoise"]["flux"]["ms_with_ip"] > 0
    table = capsys.readouterr().out
    assert "denoise     flux.ms_with_ip" in table and "aligner     fp16.data_wait_share" in table


def test_gpu_suite_time_box_keeps_what_a_part_measured(tmp_path, monkeypatch):
    """A part that overruns its box is killed; the figures it wrote before are kept and marked."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    sys.modules.pop("gpu_suite", None)
    import gpu_suite

    result = tmp_path / "part.json"
    child = ("import json, os, sys, time; p = sys.argv[1]; open(p + '.tmp', 'w').write(json.dumps({'first': 1.5})); "
             "os.replace(p + '.tmp', p); time.sleep(60)")
    got = gpu_suite.run_boxed([sys.executable, "-c", child, str(result)], 3, result)
    assert got["first"] == 1.5 and got["status"].startswith("timed out after 3 s") and got["seconds"] < 30
    failed = gpu_suite.run_boxed([sys.executable, "-c", "raise SystemExit('no GPU here')"], 30, tmp_path / "none.json")
    assert failed["status"].startswith("failed (exit 1)") and "no GPU here" in failed["status"]


def test_real_width_projection_prints_its_arithmetic(tmp_path, capsys, monkeypatch):
    """benchmarks/real_width.py --projection-only: GPU-hours = FLOP / (peak x MFU) / 3600, line by line."""
    import json

    monkeypatch.syspath_prepend(str(BENCHMARKS))
    for name in ("real_width", "flop_model"):
        sys.modules.pop(name, None)
    import real_width

    out = tmp_path / "rw.json"
    assert real_width.main(["--projection-only", "--mfu", "0.5", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    rows = {k: v for k, v in report["projection"].items() if k != "total"}
    for name, row in rows.items():
        assert row["H100_hours"] == row["flop"] / (989e12 * 0.5) / 3600, name
    assert report["projection"]["total"]["A100_hours"] == sum(r["A100_hours"] for r in rows.values())
    p = real_width.PAPER
    assert rows["preprocess"]["flop"] == p["pairs"] * report["full_flops"]["preprocess / pair"]
    per_pair = report["full_flops"]["train / pair (fwd, ref fwd, bwd)"]
    assert rows["train aligner"]["flop"] == p["steps"] * p["global_batch"] * per_pair
    text = capsys.readouterr().out
    assert "851,000 pairs x" in text and "MFU 50%" in text
