"""``img-eval``: generate base / IMG / control images, score them, and write the report.

    img-eval generate CONFIG.yaml [more.yaml] [key=value ...] [--task-index I --num-tasks N]
    img-eval score    CONFIG.yaml [key=value ...] [--task-index I --num-tasks N]
    img-eval report   CONFIG.yaml [key=value ...]
    img-eval all      CONFIG.yaml [key=value ...]

(``COMMAND STAGE ARGS...``, options anywhere after ``img-eval``: the shape of every CLI, see
:mod:`img_lightning.cli.common`.)

Every stage is resumable: finished images and scores are skipped. Under a SLURM array each task
takes every N-th prompt (``--task-index $SLURM_ARRAY_TASK_ID --num-tasks $SLURM_ARRAY_TASK_COUNT``);
``report`` then merges all tasks' outputs (see slurm/eval.sbatch). The pipeline itself is
:mod:`img_lightning.evaluation.pipeline`; this module only parses the command line.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Optional

from ..evaluation.pipeline import STAGES  # light: the pipeline imports its heavy stages lazily
from .common import add_common_arguments, add_config_arguments, parse_command, run_cli, setup_from_args, show_progress


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="img-eval",
        description="Evaluate an IMG aligner: base vs IMG (vs control) images, scored with HPS v2, PickScore, "
        "CLIP and T2I-CompBench metrics, with win rates and bootstrap intervals. Before the first image, every "
        "model, checkpoint and prompt file the stage needs is checked, and all problems are reported at once.",
        epilog="Configs: configs/eval/{backbones,benchmarks}/*.yaml. Example: img-eval all "
        "configs/eval/backbones/sdxl.yaml configs/eval/benchmarks/partiprompts.yaml prompts.path=PartiPrompts.tsv "
        "run_dir=runs/eval/parti img.aligner.checkpoint=aligner_sdxl.pth scorers.0.checkpoint=HPS_v2.1_compressed.pt",
    )
    p.add_argument("stage", choices=STAGES, help="generate | score | report | all (= the three in order)")
    add_config_arguments(p)
    p.add_argument("--task-index", type=int, default=None, help="this task's chunk (SLURM_ARRAY_TASK_ID)")
    p.add_argument("--num-tasks", type=int, default=None, help="number of chunks (SLURM_ARRAY_TASK_COUNT)")
    add_common_arguments(p)
    return p


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    return parse_command(build_parser(), argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    ns = parse_args(argv)
    setup_from_args(ns)

    def body() -> int:
        from ..config.loading import to_yaml
        from ..evaluation.pipeline import resolve_config, run

        if ns.print_config:
            print(to_yaml(resolve_config(ns.config, ns.task_index, ns.num_tasks)))
            return 0
        run(ns.stage, ns.config, ns.task_index, ns.num_tasks, progress=show_progress(ns))
        return 0

    return run_cli(body, "img-eval", debug=ns.debug)


if __name__ == "__main__":
    sys.exit(main())
