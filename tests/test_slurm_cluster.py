"""The sbatch scripts, unedited, on a real one-node SLURM (slurm/local_cluster.sh), from a fresh copy
of the checkout, CPU only: what a stand-in ``srun`` cannot show.

One cluster and one pipeline run per session: ``img-submit`` of the demo recipe (finetune -> preprocess
array -> manifest/verify -> train -> eval array -> report) gives the uninterrupted reference runs that
the requeued ones are compared with, bit for bit. Only what a CPU node needs is overridden, on the
command line (sbatch options before ``--``, key=value overrides after it) or in the scripts'
documented variables. A requeued job waits about two minutes before it may start again (SLURM's
``BeginTime``); the tests let it start at once (``scontrol update StartTime=now``), as an operator can.
"""

from __future__ import annotations

import itertools
import json
import re
import subprocess
import time
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from slurm_utils import (
    CLUSTER,
    assert_completed,
    cluster_running,
    fresh_checkout,
    job_environment,
    log_tails,
    run_ok,
    show_jobs,
    submitted_ids,
    wait_for,
    why_no_slurm,
)

pytestmark = pytest.mark.slurm

SLURM_CONF = Path("/etc/slurm/slurm.conf")
CPU_TRAINING = ["--ntasks-per-node=2", "--cpus-per-task=1", "--gpus-per-node=0", "--mem=4G"]


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A cluster for the session: one already running (started by the user) is used and left
    running; otherwise one is started here and stopped at the end."""
    reason = why_no_slurm()
    if reason:
        pytest.skip(f"no SLURM cluster: {reason}")
    if cluster_running():
        yield
        return
    if SLURM_CONF.exists() and "written by img-lightning slurm/local_cluster.sh" not in SLURM_CONF.read_text():
        pytest.skip(f"no SLURM cluster: {SLURM_CONF} belongs to this machine's own SLURM, which these tests "
                    f"leave alone")
    state = tmp_path_factory.mktemp("slurm-state")
    started = subprocess.run(["bash", str(CLUSTER), "start"], env={**job_environment(), "IMG_SLURM_DIR": str(state)},
                             capture_output=True, text=True, timeout=600)
    assert started.returncode == 0, f"local cluster did not start:\n{started.stdout}\n{started.stderr}"
    daemons = {p.stem: p.read_text().strip() for p in (state / "run").glob("*.pid")}
    assert set(daemons) == {"munged", "slurmctld", "slurmd"}
    try:
        yield
    finally:
        subprocess.run(["bash", str(CLUSTER), "stop"], capture_output=True, text=True, timeout=300)
        # the machine as it was: no daemon of ours, no config of ours
        assert not [name for name, pid in daemons.items() if Path(f"/proc/{pid}").exists()]
        assert not SLURM_CONF.exists() and not state.exists()


@pytest.fixture(scope="session")
def demo_pipeline(slurm_cluster, tmp_path_factory):
    """The demo recipe (img-demo writes it with the tiny models' paths), submitted with img-submit."""
    checkout = fresh_checkout(tmp_path_factory.mktemp("clone") / "img-lightning")
    out = tmp_path_factory.mktemp("demo")
    env = job_environment()
    run_ok(["img-demo", "--slurm", "--dry-run", "--out", str(out), "--pairs", "96", "--val-pairs", "16",
            "--triplets", "320", "--mllm-steps", "30", "--steps", "400", "--eval-prompts", "4"], checkout, env, 600)
    from omegaconf import OmegaConf

    recipe = out / "pipeline.yaml"
    cfg = OmegaConf.load(recipe)
    cfg.mllm.overrides += ["trainer.val_check_interval=10", "trainer.checkpoint_every_n_steps=10"]
    recipe.write_text(OmegaConf.to_yaml(cfg))
    stdout = run_ok(["img-submit", str(recipe)], checkout, env)
    ids = submitted_ids(stdout)
    root = out / "pipeline"
    jobs = wait_for(ids, timeout=900, logs=root / "logs")
    assert_completed(jobs, root / "logs")
    return SimpleNamespace(checkout=checkout, out=out, root=root, recipe=recipe, env=env, stdout=stdout, ids=ids,
                           jobs=jobs)


def _job_times(job_id: str) -> tuple[str, str]:
    """When the job (all its array tasks) started and ended (ISO times compare as strings)."""
    jobs = show_jobs(job_id)
    return min(j.start for j in jobs), max(j.end for j in jobs)


def test_pipeline_submission_runs_the_demo_end_to_end_and_a_resubmission_skips_what_is_done(demo_pipeline):
    p = demo_pipeline
    # mllm, preprocess array + manifest/verify, train, eval array + report; each after the one before
    assert len(p.ids) == 6, p.stdout
    for before, after in itertools.pairwise(p.ids):
        assert _job_times(after)[0] >= _job_times(before)[1], (before, after)
    assert len([j for j in p.jobs if j.startswith(p.ids[1] + "_")]) == 2  # a 2-task array
    assert len([j for j in p.jobs if j.startswith(p.ids[4] + "_")]) == 2
    for place in ("runs/finetune/export", "cache", "runs/train/export/aligner.pth", "eval/report/index.html"):
        assert f"-> {p.root / place}" in p.stdout, place
    verify = json.loads((p.root / "cache" / "verify.json").read_text())
    assert verify["ok"] and verify["samples"] == 96
    report = json.loads((p.root / "eval" / "report" / "report.json").read_text())
    aligner = str(p.root / "runs/train/export/aligner.pth")
    assert report["num_prompts"] == 4 and report["img_settings"]["aligner"] == aligner
    # log names: array tasks JOB_TASK, single jobs JOB (never 4294967294, SLURM's "no task" id)
    logs = sorted(f.name for f in (p.root / "logs").iterdir())
    assert f"img-demo-eval-{p.ids[4]}_0.out" in logs and f"img-demo-eval-report-{p.ids[5]}.out" in logs, logs
    assert f"img-demo-preprocess-{p.ids[1]}_1.out" in logs and f"img-demo-mllm-{p.ids[0]}.out" in logs, logs
    assert not any("4294967294" in name for name in logs)

    again = run_ok(["img-submit", str(p.recipe)], p.checkout, p.env)
    assert not submitted_ids(again)
    assert again.count(": skipped, ") == 4, again


def test_resubmitting_after_a_lost_stage_runs_it_and_every_stage_after_it(demo_pipeline, tmp_path):
    """A copy of the pipeline's outputs without the training export: mllm and cache are skipped,
    training and evaluation are submitted, training first and without a dependency (dry run)."""
    import shutil

    from omegaconf import OmegaConf

    root = tmp_path / "pipeline"
    shutil.copytree(demo_pipeline.root, root, ignore=shutil.ignore_patterns("logs"))
    shutil.rmtree(root / "runs" / "train" / "export")
    cfg = OmegaConf.load(demo_pipeline.recipe)
    cfg.root = str(root)
    recipe = tmp_path / "pipeline.yaml"
    recipe.write_text(OmegaConf.to_yaml(cfg))
    out = run_ok(["img-submit", str(recipe), "--dry-run"], demo_pipeline.checkout, demo_pipeline.env)
    assert "mllm: skipped" in out and "preprocess: skipped" in out, out
    train = next(line for line in out.splitlines() if line.startswith("train: would run"))
    assert "--dependency" not in train and "train.sbatch" in train
    evaluation = next(line for line in out.splitlines() if line.startswith("eval: would run"))
    assert "--dependency=afterok:<train>" in evaluation  # the old report is stale once the aligner changes


def test_preprocess_array_and_its_manifest_job_make_the_cache_one_process_makes(demo_pipeline, tmp_path):
    from omegaconf import OmegaConf

    from preprocessing.cli import main as preprocess_main

    cfg = OmegaConf.load(demo_pipeline.recipe).preprocess
    single = tmp_path / "cache"
    args = ["run", cfg.config, *cfg.overrides, f"data.input={cfg.input}", f"data.output={single}",
            f"encoders.mllm.path={demo_pipeline.root / 'runs' / 'finetune' / 'export'}", "--no-progress"]
    assert preprocess_main(args) == 0
    arrayed = demo_pipeline.root / "cache"
    files = {p.relative_to(single) for p in single.rglob("*") if p.is_file()}
    assert files == {p.relative_to(arrayed) for p in arrayed.rglob("*") if p.is_file()} - {Path("verify.json")}
    assert any(f.suffix == ".tar" for f in files)
    for name in sorted(files):
        assert (single / name).read_bytes() == (arrayed / name).read_bytes(), name


def _wait(predicate, timeout: float, what: str, logs: Path):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}\n{log_tails(logs, 40)}")
        time.sleep(0.2)


def _requeued(job_id: str, restarts: int) -> bool:
    (job,) = show_jobs(job_id)
    if job.state in ("FAILED", "CANCELLED", "TIMEOUT", "COMPLETED") and job.restarts < restarts:
        pytest.fail(f"job {job_id} ended without being requeued: {job}")
    return job.restarts == restarts and job.state == "PENDING"


def _started_training(run_dir: Path, segments: int):
    """True once the ``segments``-th run of the job has started training: rank 0 of each opens its
    TensorBoard files (``events.out.tfevents.TIME.HOST.PID.N``) as fit starts."""
    events = run_dir / "tensorboard"
    return lambda: len({f.name.split(".")[-2] for f in events.glob("events.out.tfevents.*")}) >= segments


def _signal_quickly(job_id: str, name: str) -> None:
    """``scancel --signal=NAME``, given 3 s: SLURM refuses signals while a job is being requeued (the
    warning came just before) and scancel would retry for a minute and a half; the requeue ends the
    job's processes anyway (SIGKILL after KillWait, stopped or not)."""
    try:
        subprocess.run(["scancel", f"--signal={name}", job_id], capture_output=True, timeout=3)
    except subprocess.TimeoutExpired:
        pass


def _restart_when_requeued(job_id: str, restarts: int, logs: Path, *updates: str) -> None:
    """Wait for the job's ``restarts``-th requeue, then let it start at once (not in two minutes)."""
    _wait(lambda: _requeued(job_id, restarts), 120, f"requeue {restarts}", logs)
    subprocess.run(["scontrol", "update", f"JobId={job_id}", *updates, "StartTime=now"], check=True)


def _signal_and_restart(job_id: str, restarts: int, run_dir: Path, logs: Path) -> None:
    """``scancel --signal=USR1`` once the job's ``restarts``-th run trains, then restart it."""
    _wait(_started_training(run_dir, restarts), 120, f"run {restarts} to train", logs)
    time.sleep(0.5)
    subprocess.run(["scancel", "--signal=USR1", job_id], check=True)
    _restart_when_requeued(job_id, restarts, logs)


def _bitwise_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_training_requeued_by_its_time_limit_and_by_a_signal_exports_the_uninterrupted_weights(demo_pipeline, tmp_path):
    """2 DDP ranks under srun. SLURM's own timer (--time=2 --signal=USR1@115: the warning 5-35 s
    into the job, the time limit 85 s or more after it, room for a slow start on a busy machine)
    stops it first, then ``scancel --signal=USR1`` once the requeued job trains again; each time it
    saves at a step boundary and requeues itself; the third run completes. The export (with
    validation on) is the reference run's, bit for bit."""
    p = demo_pipeline
    reference = p.root / "runs" / "train"
    env = {**p.env, "CONFIG": str(reference / "config.yaml"), "CACHE": str(p.root / "cache"),
           "RUN_ROOT": str(tmp_path / "runs")}
    out = run_ok(["bash", "slurm/train.sbatch", *CPU_TRAINING, "--time=2", "--signal=USR1@115", "--",
                  "trainer.accelerator=cpu"], p.checkout, env)
    (job_id,) = submitted_ids(out)
    run_dir, logs = tmp_path / "runs" / f"img-train-{job_id}", p.checkout / "logs"
    log = logs / f"img-train-{job_id}.out"

    # SLURM checks time limits every 30 s: the warning comes 5-35 s into the job. Should training be
    # under way before that, its tasks are paused (SIGSTOP) until the warning must have been sent, so
    # it always lands in training, however fast this machine trains.
    _wait(lambda: show_jobs(job_id)[0].state == "RUNNING", 120, "the job to start", logs)
    warned_by = datetime.fromisoformat(show_jobs(job_id)[0].start).timestamp() + 37
    _wait(lambda: _started_training(run_dir, 1)() or time.time() > warned_by, 120, "training", logs)
    if time.time() < warned_by and not (run_dir / "requeue").exists():
        _signal_quickly(job_id, "STOP")
        time.sleep(max(0.0, warned_by - time.time()))
        _signal_quickly(job_id, "CONT")
    _restart_when_requeued(job_id, 1, logs, "TimeLimit=10")
    _signal_and_restart(job_id, 2, run_dir, logs)
    assert_completed(wait_for([job_id], 300, logs), logs)

    text = log.read_text()
    saved = [int(s) for s in re.findall(r"time-limit signal: saved \S+/requeue/requeue-\d\.ckpt at step (\d+)", text)]
    assert len(saved) == 2 and 1 <= saved[0] < saved[1] < 400, text[-3000:]
    assert [f"(restart {i})" in text for i in range(3)] == [True] * 3
    assert (run_dir / "requeue" / "requeue-2.ckpt").exists()
    for stem in ("aligner", "aligner_best"):
        _bitwise_equal(load_file(run_dir / "export" / f"{stem}.safetensors"),
                       load_file(reference / "export" / f"{stem}.safetensors"))
    assert json.loads((run_dir / "export" / "aligner.json").read_text())["global_step"] == 400


def test_mllm_finetuning_requeued_by_a_signal_exports_the_uninterrupted_weights(demo_pipeline, tmp_path):
    p = demo_pipeline
    reference = p.root / "runs" / "finetune"
    env = {**p.env, "CONFIG": str(reference / "config.yaml"), "RUN_ROOT": str(tmp_path / "runs"),
           "DATA": str(p.out / "data" / "edit_triplets.parquet")}
    out = run_ok(["bash", "slurm/finetune_mllm.sbatch", *CPU_TRAINING, "--time=10", "--",
                  "trainer.accelerator=cpu"], p.checkout, env)
    (job_id,) = submitted_ids(out)
    run_dir, logs = tmp_path / "runs" / f"img-finetune-mllm-{job_id}", p.checkout / "logs"

    _signal_and_restart(job_id, 1, run_dir, logs)
    assert_completed(wait_for([job_id], 300, logs), logs)

    text = (logs / f"img-finetune-mllm-{job_id}.out").read_text()
    assert re.search(r"time-limit signal: saved \S+/requeue/requeue-1\.ckpt at step \d+", text), text[-3000:]
    mine, theirs = run_dir / "export", reference / "export"
    weights = sorted(f.name for f in theirs.glob("*.safetensors"))
    assert weights and weights == sorted(f.name for f in mine.glob("*.safetensors"))
    for name in weights:
        _bitwise_equal(load_file(mine / name), load_file(theirs / name))
    manifest = json.loads((mine / "img_finetune.json").read_text())
    assert manifest["training"]["global_step"] == 30 and manifest["training"]["val_loss"] == json.loads(
        (theirs / "img_finetune.json").read_text())["training"]["val_loss"]


def test_a_job_that_fails_says_why_in_its_own_log_from_a_fresh_clone(demo_pipeline, tmp_path):
    """Plain ``sbatch slurm/train.sbatch`` in a fresh clone (no logs/ directory): the log goes next to
    the submission, and a bad cache fails the job with the reason in that log."""
    p = demo_pipeline
    env = {**p.env, "CACHE": str(tmp_path / "no-cache"), "CONFIG": "configs/train/demo.yaml",
           "RUN_ROOT": str(tmp_path / "runs")}
    out = run_ok(["sbatch", "--parsable", "--ntasks-per-node=1", "--cpus-per-task=1", "--gpus-per-node=0",
                  "--mem=2G", "--time=5", "slurm/train.sbatch", "trainer.accelerator=cpu"], p.checkout, env)
    job_id = out.strip().split(";")[0]
    (job,) = wait_for([job_id], 180).values()
    assert job.state == "FAILED"
    text = (p.checkout / f"img-train-{job_id}.out").read_text()
    assert "img-train: error:" in text and "no-cache" in text, text
    assert f"img-train job {job_id} failed (exit" in text
