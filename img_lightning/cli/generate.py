"""``img-generate``: a trained aligner on your own prompts, or on an image you have.

    img-generate CONFIG.yaml [more.yaml] --prompt TEXT [--prompt ...] [--prompts FILE] [--image PATH]
                 [--seed N ...] [--rounds R] --out DIR [key=value ...]

For each prompt (and seed): the base image (generated, or ``--image``, which IMG then refines),
each IMG round and a side-by-side strip, plus ``DIR/metadata.jsonl`` with every image's settings,
seed and the aligner's sha256. The configs are ``img-eval``'s backbones; the images are made by the
generation stage's own code (:class:`~img_lightning.generation.refiner.IMGRefiner`), so the same
prompt and seed give what ``img-eval generate`` gives.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

from ..errors import UserError
from .common import (
    CONFIG_EPILOG,
    add_common_arguments,
    add_config_arguments,
    parse_command,
    print_config,
    run_cli,
    setup_from_args,
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="img-generate",
        description="Generate a base image and its IMG refinement(s) for your own prompts (or refine an image you "
        "have) with a trained aligner. Every model is checked before the first one is loaded.",
        epilog="Example: img-generate configs/eval/backbones/sdxl.yaml --prompt 'a red cube on a blue sphere' "
        "--out out/ img.aligner.checkpoint=aligner_sdxl.pth encoders.mllm.path=/models/IMG/llava-hf. "
        + CONFIG_EPILOG,
    )
    add_config_arguments(p)  # img-eval's configs (configs/eval/backbones/*.yaml) and key=value overrides
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeat for several)")
    p.add_argument("--prompts", type=Path, help="a text file, one prompt per line (blank lines are skipped)")
    p.add_argument("--image", type=Path, help="refine this image instead of generating the base image")
    p.add_argument("--seed", type=int, action="append", default=None,
                   help="generator seed (repeat for several images per prompt; default: generation.seed)")
    p.add_argument("--rounds", type=int, default=None, help="IMG rounds (default: img.rounds of the config)")
    p.add_argument("--out", type=Path, required=True, help="output folder (created; existing files are kept)")
    add_common_arguments(p)
    return p


def read_prompts(prompt: Sequence[str], prompts_file: Optional[Path]) -> list[str]:
    """``--prompt`` values, then the lines of ``--prompts``; one clear error for a missing file or no prompt."""
    texts = list(prompt)
    if prompts_file is not None:
        if not prompts_file.is_file():
            raise UserError(f"--prompts {prompts_file}: no such file")
        lines = [line.strip() for line in prompts_file.read_text(encoding="utf-8").splitlines()]
        if not any(lines):
            raise UserError(f"--prompts {prompts_file}: the file has no prompt (one per line)")
        texts += [line for line in lines if line]
    if not texts:
        raise UserError("give at least one --prompt TEXT or --prompts FILE")
    return texts


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    return parse_command(build_parser(), argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    ns = parse_args(argv)
    setup_from_args(ns)

    def body() -> int:
        from ..config.eval_loading import load_eval_config

        cfg = load_eval_config(ns.config + ([f"img.rounds={ns.rounds}"] if ns.rounds is not None else []),
                               allow_missing=True)
        if ns.print_config:
            return print_config(cfg)
        texts = read_prompts(ns.prompt, ns.prompts)
        from ..generation.refine_outputs import write_refinements
        from ..generation.refiner import IMGRefiner, load_image

        image = load_image(ns.image)[0] if ns.image is not None else None  # a bad file fails before any model loads
        seeds = ns.seed or [int(cfg.generation.seed)]
        prompts = [t for t in texts for _ in seeds]
        per_prompt = [s for _ in texts for s in seeds]
        refiner = IMGRefiner(cfg)
        if image is None:
            results = refiner(prompts, seed=per_prompt)
        else:
            results = refiner.refine(ns.image, prompts, seed=per_prompt)
        strips = write_refinements(results, ns.out)
        for res, strip in zip(results, strips, strict=True):
            print(f"{strip}  (seed {res.seed}) {res.prompt}")
        print(f"img-generate: {len(results)} image set(s); settings, seeds and the aligner's sha256 in "
              f"{ns.out / 'metadata.jsonl'}")
        return 0

    return run_cli(body, "img-generate", debug=ns.debug)


if __name__ == "__main__":
    sys.exit(main())
