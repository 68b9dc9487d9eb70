"""``img-finetune-mllm``: finetune an MLLM into IMG's misalignment detector, export it, evaluate it.

Subcommands (each takes ``CONFIG.yaml [more.yaml] [key=value ...]``):

* ``train``  - fit on InstructPix2Pix-layout edit triplets (CPU, one GPU, DDP or FSDP; SLURM:
  ``slurm/finetune_mllm.sbatch``), then write ``RUN/export`` (llava-hf / Qwen folder + manifest);
* ``export`` - write the export of a run's checkpoint (``--checkpoint``, default the run's last);
* ``eval``   - greedy answers of the base and the finetuned model on held-out triplets or a
  SEED-Data-Edit sample: exact match, ROUGE-L, token F1 (``metrics.json``), an HTML page, and
  optionally an LLM judge.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

from ..config.finetune_mllm import FinetuneMLLMConfig
from ..time_limit_signal import catch_time_limit_signal
from .common import (
    CONFIG_EPILOG,
    add_common_arguments,
    add_config_arguments,
    parse_staged_command,
    print_config,
    resolve_config,
    run_cli,
    setup_from_args,
    show_progress,
)

log = logging.getLogger("img_lightning.finetune")
PROG = "img-finetune-mllm"


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The overview parser (``--help``, ``--version``) and one parser per stage."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Finetune an MLLM (LLaVA-1.5, Qwen2.5-VL) to say how an image must change to match a prompt "
                    "(the IMG paper's misalignment detector), export it for img-preprocess, and evaluate it.",
        epilog=CONFIG_EPILOG + " Example: img-finetune-mllm train configs/finetune_mllm/llava13b_full.yaml "
        "data.input=/data/ip2p/data mllm.questions=/models/IMG/edit_instructions.json run.name=llava13b-full",
    )
    add_common_arguments(parser)
    sub = parser.add_subparsers(dest="command", required=True, metavar="{train,export,eval}")
    train = sub.add_parser("train", help="finetune on edit triplets, then export", epilog=CONFIG_EPILOG,
                           description="Finetune on InstructPix2Pix-layout triplets (resume with run.ckpt_path=last).")
    add_config_arguments(train)
    add_common_arguments(train)
    export = sub.add_parser("export", help="export a run's checkpoint as an llava-hf / Qwen folder + manifest",
                            epilog=CONFIG_EPILOG, description="Write the export of a checkpoint of the run the config "
                            "names.")
    add_config_arguments(export)
    export.add_argument("--checkpoint", default=None,
                        help="checkpoint file or sharded directory (default: the run's last)")
    export.add_argument("--out", default=None, help="export folder (default: RUN/export)")
    add_common_arguments(export)
    evaluate = sub.add_parser("eval", help="base vs finetuned answers: exact match, ROUGE-L, token F1, HTML",
                              epilog=CONFIG_EPILOG, description="Evaluate on held-out triplets (eval.source=heldout) "
                              "or a SEED-Data-Edit sample (eval.source=seed_data_edit eval.input=FILE).")
    add_config_arguments(evaluate)
    add_common_arguments(evaluate)
    return parser, {"train": train, "export": export, "eval": evaluate}


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser, stages = build_parser()
    return parse_staged_command(parser, stages, argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    catch_time_limit_signal()  # before anything slow: SLURM's warning may come early
    args = parse_args(argv)
    setup_from_args(args)

    def body() -> int:
        cfg = resolve_config(FinetuneMLLMConfig, args)
        if args.print_config:
            return print_config(cfg)
        if not show_progress(args):
            cfg.trainer.enable_progress_bar = False
        if args.command == "train":
            from ..finetune.training import run_finetune

            result = run_finetune(cfg)
            if result.is_global_zero:
                report_training(result)
            return 0
        if args.command == "export":
            from ..finetune.offline import export_checkpoint

            path = export_checkpoint(cfg, args.checkpoint, args.out)
            print(f"exported: {path}")
            return 0
        from ..finetune.evaluate import run_eval

        report_eval(run_eval(cfg, progress=show_progress(args)))
        return 0

    return run_cli(body, PROG, debug=args.debug)


def report_training(result) -> None:
    lines = [f"run directory: {result.run_dir}"]
    if result.requeued_at is not None:
        lines.append(f"stopped by SLURM's time-limit signal: saved at step {result.requeued_at}; the requeued job "
                     f"resumes there (run.ckpt_path=last)")
    if "val/loss" in result.metrics:
        lines.append(f"held-out loss per answer token: {result.metrics['val/loss']:.4f}")
    skipped = result.summary.get("skipped", {})
    if any(skipped.values()):
        lines.append(f"skipped samples: {skipped} (listed in {result.run_dir / 'skipped'})")
    if result.export_dir:
        lines.append(f"export (encoders.mllm.path of img-preprocess): {result.export_dir}")
    lines.append(f"TensorBoard: tensorboard --logdir {result.run_dir / 'tensorboard'}")
    print("\n".join(lines))


def report_eval(result) -> None:
    lines = [f"evaluated {result.n} cases ({result.source}); answers and metrics in {result.out_dir}"]
    for name, m in result.metrics.items():
        judge = f", judge consistent {m['judge_consistent']:.3f}" if m.get("judge_consistent") is not None else ""
        lines.append(f"  {name:9s} ROUGE-L {m['rouge_l']:.4f}  token F1 {m['token_f1']:.4f}  "
                     f"exact match {m['exact_match']:.4f}{judge}")
    lines.append(f"page: {Path(result.out_dir) / 'index.html'}")
    print("\n".join(lines))


if __name__ == "__main__":
    raise SystemExit(main())
