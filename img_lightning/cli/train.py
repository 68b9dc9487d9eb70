"""``img-train``: train the Implicit Aligner on a feature cache."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from typing import Optional

from ..config.train import TrainConfig
from ..time_limit_signal import catch_time_limit_signal
from .common import (
    CONFIG_EPILOG,
    add_common_arguments,
    add_config_arguments,
    parse_command,
    print_config,
    resolve_config,
    run_cli,
    setup_from_args,
    show_progress,
)

log = logging.getLogger("img_lightning.train")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="img-train",
        description=(
            "Train the IMG Implicit Aligner with the Iteratively Updated Preference Objective on a "
            "feature cache made by img-preprocess. Runs on CPU, one GPU, or many nodes (DDP; under "
            "SLURM use slurm/train.sbatch). Resume an interrupted run with run.ckpt_path=last."
        ),
        epilog=CONFIG_EPILOG + " Example: img-train configs/train/sdxl_llava13b.yaml data.cache=/data/cache "
        "run.name=sdxl-a trainer.devices=8",
    )
    add_config_arguments(parser)
    add_common_arguments(parser)
    return parser


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    return parse_command(build_parser(), argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    catch_time_limit_signal()  # before anything slow: SLURM's warning may come early
    args = parse_args(argv)
    setup_from_args(args)

    def body() -> int:
        cfg = resolve_config(TrainConfig, args)
        if args.print_config:
            return print_config(cfg)
        if not show_progress(args):
            cfg.trainer.enable_progress_bar = False
        from ..training import run_training

        result = run_training(cfg)
        if result.is_global_zero:
            report(result)
        return 0

    return run_cli(body, "img-train", debug=args.debug)


def report(result) -> None:
    m = result.metrics
    lines = [f"run directory: {result.run_dir}"]
    if result.requeued_at is not None:
        lines.append(f"stopped by SLURM's time-limit signal: saved at step {result.requeued_at}; the requeued job "
                     f"resumes there (run.ckpt_path=last)")
    if "val/identity" in m:
        lines.append(
            f"validation ||c_w - f(c)||^2: identity baseline {m['val/identity']:.5f} -> trained "
            f"{m['val/base']:.5f} ({100 * m['val/rel_improvement']:.1f}% lower); "
            f"implicit accuracy (DPO margin > 0) {m['val/implicit_acc']:.3f}, closer to the winner than the loser "
            f"{m['val/closer_to_winner']:.3f}"
        )
    for name, path in result.exports.items():
        lines.append(f"exported {name}: {path}")
    lines.append(f"TensorBoard: tensorboard --logdir {result.run_dir / 'tensorboard'}")
    print("\n".join(lines))


if __name__ == "__main__":
    raise SystemExit(main())
