"""``img-convert-llava``: an original LLaVA-repository folder -> an llava-hf folder we can load."""

from __future__ import annotations

import argparse
import errno
from collections.abc import Sequence
from typing import Optional

from .common import add_common_arguments, parse_command, run_cli, setup_from_args

FULL_DISK = (errno.ENOSPC, errno.EDQUOT)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="img-convert-llava",
        description=(
            "Convert a LLaVA-1.5 checkpoint in the original LLaVA repository format (config.json of "
            "LlavaLlamaForCausalLM, model.* / model.mm_projector.* / lm_head.* weights), such as the "
            "IMG-finetuned model in the llava/ folder of shi-labs/IMG, into a transformers "
            "LlavaForConditionalGeneration folder + LlavaProcessor for encoders.mllm.path. Unsupported "
            "configurations are refused; DST gets conversion.json (source hashes, config, key mapping). "
            "Nothing is downloaded."
        ),
        epilog="Example: img-convert-llava /models/IMG/llava /models/IMG/llava-hf "
        "--vision-tower /models/clip-vit-large-patch14-336",
    )
    parser.add_argument("src", metavar="SRC", help="the original LLaVA folder")
    parser.add_argument("dst", metavar="DST", help="output folder (must not exist; written atomically)")
    parser.add_argument("--vision-tower", metavar="PATH_OR_ID", default=None,
                        help="CLIP vision tower: a local folder or a hub id in the local Hugging Face cache "
                             "(default: the config's mm_vision_tower, openai/clip-vit-large-patch14-336 for LLaVA-1.5)")
    parser.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), default="float16",
                        help="dtype of the written weights (default: float16, what LLaVA's own loader computes "
                             "with whatever the checkpoint's dtype, tower included)")
    parser.add_argument("--pad-vocab-multiple", type=int, default=64,
                        help="pad the embedding rows to a multiple of this (llava-hf models use 64; 1: no padding)")
    add_common_arguments(parser)
    return parser


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    return parse_command(build_parser(), argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    setup_from_args(args)

    def body() -> int:
        from ..convert.llava import convert_llava
        from ..errors import UserError

        try:
            result = convert_llava(args.src, args.dst, vision_tower=args.vision_tower, dtype=args.dtype,
                                   pad_vocab_multiple=args.pad_vocab_multiple)
        except OSError as err:
            if err.errno in FULL_DISK:
                raise  # run_cli's full-disk message
            # every path here is the user's (SRC, DST, the tower): a user error naming it, not a bug
            raise UserError(f"{err.filename or args.dst}: {err.strerror or err}; check that SRC and the tower are "
                            f"readable and DST's folder writable") from None
        rec = result.record
        by_name = rec["conversation_by_folder_name"]
        print(f"converted {args.src} -> {result.dst} ({rec['dtype']}, vision tower {rec['vision_tower']['path']})")
        print(f"use it with encoders.mllm.path={result.dst} encoders.mllm.prompt_format={by_name['conversation']} "
              f"(the conversation LLaVA's own code picks for a folder named {by_name['model_name']!r})")
        return 0

    return run_cli(body, "img-convert-llava", debug=args.debug)


if __name__ == "__main__":
    raise SystemExit(main())
