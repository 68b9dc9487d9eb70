"""``IMGRefiner``: a trained aligner on your own prompts or images, from Python.

    from img_lightning import IMGRefiner

    r = IMGRefiner.from_config("configs/eval/backbones/sdxl.yaml", "img.aligner.checkpoint=aligner_sdxl.pth",
                               **{"encoders.mllm.path": "/models/IMG/llava-hf"})
    out = r("a red cube on a blue sphere", seed=0, rounds=1)    # out.base, out.refined, out.tokens
    outs = r(["a red cube", "two cats"], seed=[0, 1])           # a list, batched
    out = r.refine(Image.open("mine.png"), "a red cube on a blue sphere")   # IMG on an image you have

The configs are ``img-eval``'s (``configs/eval/backbones/*.yaml``: the released demos' settings;
``run_dir`` and ``prompts`` are not needed). Every model is checked before the first is loaded (one
error listing every problem), then loaded once and kept for the next calls. The images are made by
:class:`~.generator.IMGGenerator`, the generation stage's own steps: for the same prompt and seed an
IMG round is the image ``img-eval generate`` makes (bit for bit on CPU at the same batch size). The
seed is the generator's seed as given (``img-eval`` derives one per prompt from ``generation.seed``
and the prompt's uid, and records it in each image's metadata).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union, overload

import torch
from PIL import Image

from ..config.eval import EvalConfig
from ..config.loading import ConfigError, missing_keys, missing_message
from ..errors import Problems, UserError
from ..eval_run import img_arm
from ..hashing import file_sha256_once
from .generator import IMGGenerator
from .provenance import aligner_sha256, common_meta, img_meta
from .strip import side_by_side

# Keys only img-eval needs: where its run goes and which prompt file it reads.
_NOT_NEEDED = ("run_dir", "prompts.")


class InputError(UserError, ValueError):
    """An empty prompt, a missing or unreadable image, seeds that do not match the prompts."""


@dataclass
class Refinement:
    """One prompt and seed: the base image (generated, or the one given), each IMG round's image,
    the aligned IP tokens that made it (``[N, D]``, float32) and the question the MLLM was asked."""

    prompt: str
    seed: int
    base: Image.Image
    rounds: list[Image.Image] = field(default_factory=list)
    tokens: list[torch.Tensor] = field(default_factory=list)
    questions: list[int] = field(default_factory=list)
    records: list[dict[str, Any]] = field(default_factory=list)  # provenance per image, base first

    @property
    def refined(self) -> Image.Image:
        """The last round's image (the base image when no round ran)."""
        return self.rounds[-1] if self.rounds else self.base

    def images(self) -> list[tuple[str, Image.Image]]:
        """``[(arm, image), ...]``: ``base``, ``img_r1``, ..."""
        return [("base", self.base), *((img_arm(r), im) for r, im in enumerate(self.rounds, 1))]

    def strip(self) -> Image.Image:
        """The images side by side, labelled."""
        return side_by_side([(rec["label"], im) for rec, (_, im) in zip(self.records, self.images(), strict=True)])


def _override(key: str, value: Any) -> str:
    """A ``key=value`` override from a Python value (``img__ip_scale`` may stand for ``img.ip_scale``)."""
    value = str(value) if isinstance(value, Path) else value
    return f"{key.replace('__', '.')}={json.dumps(value)}"  # JSON values are YAML values


def load_image(image: Union[str, Path, Image.Image]) -> tuple[Image.Image, Optional[str]]:
    """An RGB copy of ``image`` (a PIL image or a file) and the file's path, or one clear error."""
    if isinstance(image, Image.Image):
        return image.convert("RGB"), None
    path = Path(image).expanduser()
    if not path.is_file():
        raise InputError(f"image {path} does not exist")
    try:
        with Image.open(path) as im:
            return im.convert("RGB"), str(path)
    except Exception as err:  # noqa: BLE001 - any decoder failure: not an image we can read
        raise InputError(f"image {path} is not a readable image ({type(err).__name__}: {err})") from None


def _pixels_sha256(image: Image.Image) -> str:
    return hashlib.sha256(f"{image.size}".encode() + image.tobytes()).hexdigest()


def _jobs(prompts: Union[str, Sequence[str]], seeds: Union[int, Sequence[int]]) -> list[tuple[str, int]]:
    texts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not texts:
        raise InputError("no prompt given")
    for i, text in enumerate(texts, 1):
        if not isinstance(text, str) or not text.strip():
            raise InputError(f"prompt {i} of {len(texts)} is empty: give the text the image should show")
    if isinstance(seeds, int):
        seeds = [seeds] * len(texts)
    seeds = [int(s) for s in seeds]
    if len(seeds) != len(texts):
        raise InputError(f"{len(seeds)} seeds for {len(texts)} prompts: give one seed, or one per prompt")
    return list(zip(texts, seeds, strict=True))


def _batches(n: int, size: int) -> list[range]:
    size = max(1, int(size))
    return [range(i, min(n, i + size)) for i in range(0, n, size)]


class IMGRefiner:
    def __init__(self, cfg: EvalConfig) -> None:
        """``cfg``: a resolved evaluation config (:func:`~img_lightning.config.eval_loading.load_eval_config`)."""
        from .requirements import check_generation

        missing = [k for k in missing_keys(cfg) if not k.startswith(_NOT_NEEDED)]
        if missing:
            raise ConfigError(missing_message(cfg, missing))
        problems = Problems()
        aligner = check_generation(cfg, problems)
        if problems:
            raise ConfigError(problems.message(f"IMG cannot start: {len(problems)} problem(s):"))
        self.cfg = cfg
        self.generator = IMGGenerator(cfg, aligner)
        self._aligner_hash: Optional[str] = None

    @classmethod
    def from_config(cls, *configs: Union[str, Path], **overrides: Any) -> IMGRefiner:
        """YAML files (and ``"key=value"`` strings), then ``overrides`` (``**{"img.ip_scale": 0.3}``,
        or ``img__ip_scale=0.3``), resolved as ``img-eval`` resolves them (the ``recipe``'s encoders)."""
        from ..config.eval_loading import load_eval_config

        args = [str(c) for c in configs] + [_override(k, v) for k, v in overrides.items()]
        return cls(load_eval_config(args, allow_missing=True))

    # ------------------------------------------------------------------ calls
    @overload
    def __call__(self, prompt: str, seed: Union[int, Sequence[int], None] = None,
                 rounds: Optional[int] = None) -> Refinement: ...

    @overload
    def __call__(self, prompt: list[str] | tuple[str, ...], seed: Union[int, Sequence[int], None] = None,
                 rounds: Optional[int] = None) -> list[Refinement]: ...

    def __call__(self, prompt: Union[str, Sequence[str]], seed: Union[int, Sequence[int], None] = None,
                 rounds: Optional[int] = None) -> Union[Refinement, list[Refinement]]:
        """Base image and ``rounds`` IMG rounds (default ``img.rounds``) for each prompt; ``seed``:
        one for every prompt (default ``generation.seed``) or one per prompt. A list of prompts
        gives a list of results, made in batches."""
        jobs = _jobs(prompt, self.cfg.generation.seed if seed is None else seed)
        bases: list[Image.Image] = []
        for idx in _batches(len(jobs), self.cfg.generation.pipeline.batch_size):
            bases += self.generator.base([jobs[i][0] for i in idx], [jobs[i][1] for i in idx])
        records = [self._base_record(p, s) for p, s in jobs]
        results = self._refine(jobs, bases, records, rounds)
        return results[0] if isinstance(prompt, str) else results

    @overload
    def refine(self, image: Union[str, Path, Image.Image], prompt: str,
               seed: Union[int, Sequence[int], None] = None, rounds: Optional[int] = None) -> Refinement: ...

    @overload
    def refine(self, image: Union[str, Path, Image.Image], prompt: list[str] | tuple[str, ...],
               seed: Union[int, Sequence[int], None] = None, rounds: Optional[int] = None) -> list[Refinement]: ...

    def refine(self, image: Union[str, Path, Image.Image], prompt: Union[str, Sequence[str]],
               seed: Union[int, Sequence[int], None] = None, rounds: Optional[int] = None
               ) -> Union[Refinement, list[Refinement]]:
        """IMG on an image you already have: ``image`` (a PIL image or a file) is the base image of
        round 1, re-generated towards ``prompt`` (or each of several prompts) with ``seed``."""
        picture, path = load_image(image)
        jobs = _jobs(prompt, self.cfg.generation.seed if seed is None else seed)
        if (self.cfg.img.rounds if rounds is None else rounds) < 1:
            raise InputError("refining an image needs at least one IMG round (rounds >= 1)")
        given = {"source_image": path, "source_sha256": file_sha256_once(path) if path else None,
                 "pixels_sha256": _pixels_sha256(picture), "size": list(picture.size)}
        records = [{"prompt": p, "seed": s, "arm": "base", "label": "given image", **given} for p, s in jobs]
        results = self._refine(jobs, [picture] * len(jobs), records, rounds)
        return results[0] if isinstance(prompt, str) else results

    def close(self) -> None:
        """Drop the models (a later call loads them again)."""
        self.generator.close()
        self.generator.release_encoders()

    # ------------------------------------------------------------------ the rounds
    @property
    def aligner_hash(self) -> Optional[str]:
        if self._aligner_hash is None:
            self._aligner_hash = aligner_sha256(self.cfg)
        return self._aligner_hash

    def _base_record(self, prompt: str, seed: int) -> dict[str, Any]:
        g = self.cfg.generation
        return {**common_meta(self.cfg, prompt, seed), "arm": "base", "label": "base",
                "negative_prompt": g.base.negative_prompt, "ip_scale": None}

    def _refine(self, jobs: list[tuple[str, int]], bases: list[Image.Image], records: list[dict[str, Any]],
                rounds: Optional[int]) -> list[Refinement]:
        rounds = self.cfg.img.rounds if rounds is None else int(rounds)
        if rounds < 0:
            raise InputError(f"rounds must be >= 0, got {rounds}")
        results = [Refinement(p, s, im, records=[rec]) for (p, s), im, rec in zip(jobs, bases, records, strict=True)]
        prompts, seeds = [p for p, _ in jobs], [s for _, s in jobs]
        gen, cfg = self.generator, self.cfg
        current = list(bases)
        for r in range(1, rounds + 1):
            gen.ensure_adapter()
            aligned = torch.empty(0)
            tids: list[int] = []
            for idx in _batches(len(jobs), cfg.encoders.mllm.batch_size):
                _, tokens, asked = gen.align([current[i] for i in idx], [prompts[i] for i in idx],
                                             [seeds[i] for i in idx], r)
                aligned = torch.cat([aligned, tokens]) if aligned.numel() else tokens
                tids += asked
            images: list[Image.Image] = []
            for idx in _batches(len(jobs), cfg.generation.pipeline.batch_size):
                images += gen.regenerate([prompts[i] for i in idx], [seeds[i] for i in idx],
                                         aligned[idx.start:idx.stop], cfg.img.ip_scale)
            for i, res in enumerate(results):
                res.rounds.append(images[i])
                res.tokens.append(aligned[i])
                res.questions.append(tids[i])
                res.records.append({**common_meta(cfg, prompts[i], seeds[i]), "arm": img_arm(r),
                                    "label": f"IMG round {r}", **img_meta(cfg, r, self.aligner_hash),
                                    "template_id": tids[i]})
            current = images
        return results
