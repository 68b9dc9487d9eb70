"""``img-preprocess``: Pick-a-Pic parquet -> feature cache (run / verify / manifest).

    img-preprocess CONFIG.yaml [key=value ...]        extract (this task's shards; all if no array)
    img-preprocess verify DIR                          check every shard; exit 1 with a report on problems
    img-preprocess manifest DIR                        write manifest.json + summary.json after an array job

(``COMMAND [STAGE] ARGS...``, options anywhere after ``img-preprocess``: the shape of every CLI, see
:mod:`img_lightning.cli.common`; ``run`` is the default stage.)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from typing import Optional

from img_lightning.cli.common import (
    add_common_arguments,
    add_config_arguments,
    parse_staged_command,
    print_config,
    resolve_config,
    run_cli,
    setup_from_args,
    show_progress,
)
from img_lightning.config.preprocess import PreprocessConfig

log = logging.getLogger("img-preprocess")


def _parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    parser = argparse.ArgumentParser(
        prog="img-preprocess",
        description="Turn Pick-a-Pic v2 parquet files into the IMG feature cache that img-train reads: MLLM "
                    "guidance for the losing image + IP-Adapter tokens of both images, in fixed-size shards.",
        epilog="Without a command, `run` is assumed: img-preprocess CONFIG.yaml [key=value ...]. "
               "`img-preprocess run -h` lists the run options.",
    )
    add_common_arguments(parser)
    sub = parser.add_subparsers(dest="command", metavar="{run,verify,manifest}")
    run = sub.add_parser("run", help="extract features for this task's shards (the default command)",
                         description="Extract features. The input parquet path/glob and the output directory are "
                                     "the config keys data.input and data.output.",
                         epilog="Configs merge as: schema defaults <- each YAML file <- key=value overrides. "
                                "Under a SLURM job array the task index/count come from SLURM_ARRAY_TASK_ID / "
                                "SLURM_ARRAY_TASK_COUNT (task i does shards i mod n); a single process does all "
                                "shards and also writes the manifest.")
    add_config_arguments(run)
    run.add_argument("--task-index", type=int, default=None, help="this task's index (default: SLURM or 0)")
    run.add_argument("--num-tasks", type=int, default=None, help="number of tasks (default: SLURM or 1)")
    add_common_arguments(run)
    ver = sub.add_parser("verify", help="check every shard (sha256, counts, keys, shapes, dtypes, finite values, "
                                        "cache key); exit status 1 and a report on any problem")
    ver.add_argument("dir", help="cache directory")
    ver.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="parallel shard checks")
    ver.add_argument("--json", default=None, metavar="PATH", help="also write the report as JSON")
    add_common_arguments(ver)
    man = sub.add_parser("manifest", help="assemble manifest.json and summary.json once all array tasks finished")
    man.add_argument("dir", help="cache directory")
    add_common_arguments(man)
    return parser, {"run": run, "verify": ver, "manifest": man}


def _run(args: argparse.Namespace) -> int:
    cfg = resolve_config(PreprocessConfig, args)
    if args.print_config:
        return print_config(cfg)
    from .run import run_preprocess

    result = run_preprocess(cfg, task_index=args.task_index, num_tasks=args.num_tasks,
                            progress=show_progress(args))
    log.info("task %d/%d: %d shards written (%d were already complete), %d pairs written, %d skipped, %.1f pairs/s",
             result.task_index, result.num_tasks, result.shards_written, result.shards_already_done,
             result.pairs_written, result.pairs_skipped, result.pairs_per_s)
    if result.manifest is not None:
        m = result.manifest
        print(f"cache complete: {cfg.data.output} ({m.num_samples} samples, {len(m.shards)} shards, "
              f"{m.num_bytes / 1e9:.3f} GB, cache key {m.cache_key}); check it with "
              f"`img-preprocess verify {cfg.data.output}`")
    elif result.busy_shards:
        print(f"task {result.task_index}/{result.num_tasks} done, but {len(result.busy_shards)} shard(s) were being "
              f"written by another process (first {result.busy_shards[0]}) and were left to it; when it has "
              f"finished run `img-preprocess manifest {cfg.data.output}`")
    else:
        print(f"task {result.task_index}/{result.num_tasks} done; when every task has finished run "
              f"`img-preprocess manifest {cfg.data.output}`")
    return 0


def _verify(args: argparse.Namespace) -> int:
    from .verify import verify_cache

    report = verify_cache(args.dir, workers=max(1, args.workers))
    print(report.render())
    if args.json:
        from img_lightning.atomic import atomic_write_json

        atomic_write_json(args.json, {"ok": report.ok, "problems": report.problems, "samples": report.num_samples,
                                      "bytes": report.num_bytes, "shards": len(report.shards),
                                      "cache_key": report.cache_key})
    return 0 if report.ok else 1


def _manifest(args: argparse.Namespace) -> int:
    from .run import finalize

    m = finalize(args.dir)
    print(f"wrote {args.dir}/manifest.json: {len(m.shards)} shards, {m.num_samples} samples, "
          f"{m.num_bytes / 1e9:.3f} GB, cache key {m.cache_key}")
    print(json.dumps(json.load(open(os.path.join(args.dir, "summary.json"), encoding="utf-8")), indent=1))
    return 0


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser, stages = _parser()
    return parse_staged_command(parser, stages, argv, default="run")


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    setup_from_args(args)
    body = {"run": _run, "verify": _verify, "manifest": _manifest}[args.command]
    return run_cli(lambda: body(args), "img-preprocess", debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
