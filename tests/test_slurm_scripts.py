"""The submitting half of the sbatch scripts and ``img-submit --dry-run``, without a cluster: a
stand-in ``sbatch`` records what it is asked to submit (test_slurm_cluster.py runs them for real)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((REPO / "slurm").glob("*.sbatch"))


@pytest.fixture
def fake_sbatch(tmp_path):
    """``sbatch`` that appends its arguments (one call per line, NUL-separated) to ``calls`` and
    answers job ids 101, 102, ..."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls"
    (bin_dir / "sbatch").write_text(
        f'#!/bin/bash\nprintf "%s\\0" "$@" >> "{calls}"; echo >> "{calls}"\n'
        f'echo $((100 + $(wc -l < "{calls}")))\n')
    (bin_dir / "sbatch").chmod(0o755)
    (bin_dir / "scancel").write_text(f'#!/bin/bash\necho "scancel $*" >> "{tmp_path / "scancel.log"}"\n')
    (bin_dir / "scancel").chmod(0o755)
    cwd = tmp_path / "clone"
    cwd.mkdir()

    def run(script: str, *args: str, **env: str) -> tuple[subprocess.CompletedProcess, list[list[str]]]:
        full_env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "IMG_"))}
        full_env.update(PATH=f"{bin_dir}:{Path(sys.executable).parent}:{os.environ['PATH']}", **env)
        proc = subprocess.run(["bash", str(REPO / "slurm" / script), *args], cwd=cwd, env=full_env,
                              capture_output=True, text=True, timeout=120)
        recorded = calls.read_text().splitlines() if calls.exists() else []
        return proc, [line.split("\0")[:-1] for line in recorded]

    run.cwd = cwd
    return run


def _after(options: list[str], first: str, then: str) -> bool:
    return options.index(first) < options.index(then)


def test_every_script_logs_without_a_directory_that_must_exist():
    """``#SBATCH --output=logs/...`` fails a job at launch, silently, when logs/ does not exist yet:
    the scripts' own lines name no directory (plain ``sbatch`` works in a fresh clone), and the
    submitting half makes the log directory before it passes its own ``--output``."""
    for script in SCRIPTS:
        lines = [line for line in script.read_text().splitlines() if line.startswith("#SBATCH --output")]
        assert lines == ["#SBATCH --output=%x-%j.out"], script.name
        assert "--gpus-per-node" in script.read_text() or script.name == "convert_llava.sbatch"


def test_train_submission_makes_the_log_directory_and_passes_options_and_overrides(fake_sbatch):
    proc, calls = fake_sbatch("train.sbatch", "--nodes=2", "--time=1:00:00", "--", "optim.lr=5e-5",
                              CACHE="/data/cache")
    assert proc.returncode == 0, proc.stderr
    (call,) = calls
    assert call[0] == "--parsable" and call[1] == "--output=logs/%x-%j.out"
    assert call[2:4] == ["--nodes=2", "--time=1:00:00"] and call[4].endswith("slurm/train.sbatch")
    assert call[5:] == ["optim.lr=5e-5"]
    assert (fake_sbatch.cwd / "logs").is_dir()
    assert "submitted img-train job 101" in proc.stdout and "log: logs/img-train-101.out" in proc.stdout
    assert "run directory: runs/img-train-101" in proc.stdout


def test_train_submission_refuses_before_submitting(fake_sbatch):
    proc, calls = fake_sbatch("train.sbatch", "--", "optim.lr=5e-5")
    assert proc.returncode == 2 and "set CACHE=" in proc.stderr and not calls
    proc, calls = fake_sbatch("train.sbatch", "--", "optim.lrr=1", CACHE="/data/cache")
    assert proc.returncode != 0 and "optim.lrr" in proc.stderr and not calls  # a typo fails here, not in the queue
    proc, calls = fake_sbatch("train.sbatch", "nodes=2", "--", "optim.lr=1", CACHE="/data/cache")
    assert proc.returncode == 2 and "not an sbatch option" in proc.stderr and not calls


def _eval_args(tmp_path: Path) -> list[str]:
    return ["configs/eval/demo.yaml", f"run_dir={tmp_path / 'eval'}", "prompts.path=/p.txt",
            "img.aligner.checkpoint=/a.pth", "scorers.3.checkpoint=/m.pth", "scorers.4.checkpoint=/r.pt"]


def test_eval_submission_every_resource_of_both_jobs_can_be_overridden(fake_sbatch, tmp_path):
    proc, calls = fake_sbatch("eval.sbatch", "--array=0-3", "--cpus-per-task=2", "--gpus-per-node=0", "--mem=8G", "--",
                              *_eval_args(tmp_path), IMG_FINAL_SBATCH_ARGS="--cpus-per-task=1 --mem=2G",
                              IMG_SBATCH_ARGS="--account=abc", IMG_LOG_DIR="eval-logs")
    assert proc.returncode == 0, proc.stderr
    chunks, report = calls
    assert chunks[1] == "--output=eval-logs/%x-%A_%a.out" and "--account=abc" in chunks
    for option in ("--array=0-3", "--cpus-per-task=2", "--gpus-per-node=0", "--mem=8G"):
        assert _after(chunks, "--array=0-7", option)  # the user's come after the defaults: they win
    assert report[1] == "--output=eval-logs/%x-%j.out" and "--account=abc" in report
    assert "--dependency=afterok:101" in report and "--kill-on-invalid-dep=yes" in report
    assert not any(o.startswith("--array") for o in report)  # not an array: no %a, no 4294967294 in its log name
    assert _after(report, "--cpus-per-task=4", "--cpus-per-task=1") and _after(report, "--mem=32G", "--mem=2G")
    assert "--gpus-per-node=0" in report and "--export=ALL,IMG_STAGE=report" in report
    assert "logs: eval-logs/img-eval-101_<task>.out" in proc.stdout
    assert "log: eval-logs/img-eval-report-102.out" in proc.stdout


def test_preprocess_submission_cancels_the_array_when_its_final_job_cannot_be_submitted(fake_sbatch, tmp_path):
    args = ["configs/preprocess/demo.yaml", "data.input=/in.parquet", f"data.output={tmp_path / 'cache'}"]
    proc, calls = fake_sbatch("preprocess.sbatch", "--array=0-3", "--", *args)
    assert proc.returncode == 0, proc.stderr
    array, final = calls
    assert _after(array, "--array=0-15", "--array=0-3") and array[1] == "--output=logs/%x-%A_%a.out"
    assert f"--export=ALL,IMG_STAGE=finalize,IMG_OUT={tmp_path / 'cache'}" in final
    assert "--dependency=afterok:101" in final

    # an sbatch that refuses the second job: the array is cancelled, nothing is left half-submitted
    failing = fake_sbatch.cwd.parent / "bin" / "sbatch"
    failing.write_text(failing.read_text().replace('echo $((100', '[[ "$*" == *afterok* ]] && exit 1; echo $((100'))
    proc, _ = fake_sbatch("preprocess.sbatch", "--", *args)
    assert proc.returncode == 2 and "cancelled array 103" in proc.stderr
    assert (fake_sbatch.cwd.parent / "scancel.log").read_text().split() == ["scancel", "103"]


# ------------------------------------------------------------------------------------ img-submit
def _recipe(tmp_path: Path, **extra: str) -> list[str]:
    values = {"root": str(tmp_path / "pipe"), "name": "t", "mllm.data": "/data/ip2p.parquet",
              "preprocess.input": "/data/pickapic", **extra}
    return ["configs/pipeline/demo.yaml", *[f"{k}={v}" for k, v in values.items()]]


def _dry_run(tmp_path: Path, capsys, **extra: str) -> dict[str, str]:
    from img_lightning.cli.submit import main

    assert main([*_recipe(tmp_path, **extra), "--dry-run", "--scripts", str(REPO / "slurm")]) == 0
    out = capsys.readouterr().out
    return {m.group(1): m.group(2) for m in re.finditer(r"^(\w+): (.*)$", out, re.MULTILINE)}


def test_img_submit_chains_every_stage_on_the_one_before(tmp_path, capsys):
    stages = _dry_run(tmp_path, capsys)
    assert list(stages) == ["mllm", "preprocess", "train", "eval"]
    assert "--dependency" not in stages["mllm"] and "finetune_mllm.sbatch" in stages["mllm"]
    root = tmp_path / "pipe"
    for stage, before in (("preprocess", "mllm"), ("train", "preprocess"), ("eval", "train")):
        assert f"--dependency=afterok:<{before}>" in stages[stage], stage
    # what a stage takes from the ones before it
    assert f"encoders.mllm.path={root}/runs/finetune/export" in stages["preprocess"]
    assert f"CACHE={root}/cache" in stages["train"] and "data.recipe=configs/preprocess/demo.yaml" in stages["train"]
    assert f"img.aligner.checkpoint={root}/runs/train/export/aligner.pth" in stages["eval"]
    assert f"IMG_LOG_DIR={root}/logs" in stages["train"]


def test_img_submit_skips_a_finished_stage_and_reruns_every_one_after_a_stage_that_runs(tmp_path, capsys):
    mllm = tmp_path / "llava-hf"
    mllm.mkdir()
    (mllm / "config.json").write_text("{}")
    cache = tmp_path / "pipe" / "cache"
    cache.mkdir(parents=True)
    (cache / "manifest.json").write_text(json.dumps({"cache_key": "k", "shards": [{}, {}]}))
    (cache / "verify.json").write_text(json.dumps({"ok": True, "cache_key": "k", "shards": 2, "samples": 9}))
    stages = _dry_run(tmp_path, capsys, **{"mllm.source": "path", "mllm.path": str(mllm)})
    assert list(stages) == ["preprocess", "train", "eval"]
    assert stages["preprocess"].startswith("skipped") and "verified" in stages["preprocess"]
    assert "--dependency" not in stages["train"] and "--dependency=afterok:<train>" in stages["eval"]
    assert f"encoders.mllm.path={mllm}" in stages["train"]

    (cache / "verify.json").write_text(json.dumps({"ok": False, "cache_key": "k", "shards": 2}))
    assert _dry_run(tmp_path, capsys, **{"mllm.source": "path", "mllm.path": str(mllm)})["preprocess"].startswith(
        "would run")


def test_img_submit_refuses_a_recipe_it_cannot_run(tmp_path, capsys):
    from img_lightning.cli.submit import main

    assert main([*_recipe(tmp_path, **{"mllm.source": "path", "mllm.path": str(tmp_path / "none")}), "--dry-run",
                 "--scripts", str(REPO / "slurm")]) == 2
    assert "no config.json" in capsys.readouterr().err
    assert main([*_recipe(tmp_path), "--dry-run", "--scripts", str(tmp_path)]) == 2
    assert "run img-submit from the repository root" in capsys.readouterr().err


def test_the_older_ways_to_size_an_array_still_work_or_say_what_replaced_them(fake_sbatch, tmp_path):
    args = ["configs/preprocess/demo.yaml", "data.input=/in.parquet", f"data.output={tmp_path / 'cache'}"]
    proc, calls = fake_sbatch("preprocess.sbatch", *args, IMG_ARRAY="0-31")
    assert proc.returncode == 0 and "--array=0-31" in calls[0] and "(0-31)" in proc.stdout
    proc, calls = fake_sbatch("eval.sbatch", "16", *_eval_args(tmp_path))
    assert proc.returncode == 2 and "--array=0-15 --" in proc.stderr and len(calls) == 2  # nothing new submitted
