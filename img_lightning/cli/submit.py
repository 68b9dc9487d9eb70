"""``img-submit``: submit the whole IMG pipeline to SLURM from one recipe (``configs/pipeline/*.yaml``).

    img-submit configs/pipeline/sdxl_llava13b.yaml root=/scratch/img/sdxl preprocess.input=/data/pickapic_v2/data ...

MLLM (finetune, convert, or a given folder) -> preprocessing array -> manifest + verify -> training
-> evaluation array -> report, each job waiting for the one before (``--dependency=afterok``).
Prints every job id and where each stage writes. A stage whose output is already there and
verifies is skipped, so submitting the same command again after a failure resumes the pipeline.
Run it from the repository root: each stage is submitted through its ``slurm/*.sbatch`` script.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

from ..config.pipeline import PipelineConfig
from ..errors import UserError
from .common import (
    CONFIG_EPILOG,
    add_common_arguments,
    add_config_arguments,
    parse_command,
    print_config,
    resolve_config,
    run_cli,
    setup_from_args,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="img-submit", description=__doc__.split("\n\n")[0].split(": ", 1)[1],
                                     epilog=CONFIG_EPILOG + " Recipes: configs/pipeline/. See docs/slurm.md.")
    add_config_arguments(parser)
    parser.add_argument("--scripts", type=Path, default=Path("slurm"),
                        help="the folder of the sbatch scripts (default: ./slurm, i.e. run from the repository root)")
    parser.add_argument("--dry-run", action="store_true", help="print what would be submitted, submit nothing")
    add_common_arguments(parser)
    return parser


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    return parse_command(build_parser(), argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    setup_from_args(args)

    def body() -> int:
        cfg = resolve_config(PipelineConfig, args)
        if args.print_config:
            return print_config(cfg)
        from ..submit.plan import job_names, plan_pipeline
        from ..submit.submit import queued_jobs, submit_stages

        scripts = args.scripts.absolute()
        if not (scripts / "train.sbatch").is_file():
            raise UserError(f"{scripts}: no sbatch scripts there; run img-submit from the repository root, or pass "
                            f"--scripts DIR")
        stages = plan_pipeline(cfg, scripts)
        if not args.dry_run:
            queued = queued_jobs(job_names(cfg))
            if queued:
                raise UserError(f"jobs of pipeline '{cfg.name}' are still queued or running ({'; '.join(queued)}): "
                                f"wait for them, or scancel them, before submitting it again")
        results = submit_stages(stages, dry_run=args.dry_run)
        print(f"\npipeline '{cfg.name}' under {Path(cfg.root).expanduser().absolute()}"
              f"{' (dry run: nothing submitted)' if args.dry_run else ''}:")
        for r in results:
            state = f"skipped ({r.skipped})" if r.skipped is not None else "job(s) " + ", ".join(r.job_ids)
            print(f"  {r.stage.name:<10} {state}\n  {'':<10} -> {r.stage.output}")
        print(f"  logs: {Path(cfg.root).expanduser().absolute() / 'logs'}")
        return 0

    return run_cli(body, "img-submit", debug=args.debug)


if __name__ == "__main__":
    raise SystemExit(main())
