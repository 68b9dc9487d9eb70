"""MLLM grader (Diffusion-Sharpening's "MLLM" column): a local MLLM scores each image on a rubric.

The MLLM is loaded exactly as the guidance encoder loads it (:class:`GuidanceEncoder.from_config`
with the scorer's ``mllm`` block: LLaVA-1.5 llava-hf or Qwen2.5-VL), and asked the rubric's
question (:mod:`.rubric`) about the image in the encoder's conversation format (``prompt_format``:
``auto`` is LLaVA-1.5's own ``llava_v1`` for LLaVA, the chat template for Qwen), token ids and image
preprocessing. Decoding is greedy (``do_sample=False``), one image at a time, so a score does not
depend on the batch it was in. The answer is parsed strictly; the metric is ``overall / scale``
(0-1, as the paper's table reports it). An answer that cannot be parsed gets no score (NaN: left
out of the means, counted in the report) and is kept with the reason in
``scores/{arm}/answers/{metric}.*.jsonl``, with every parsed answer and its aspect scores.

Not the paper's grader: Diffusion-Sharpening graded with GPT-4o through an API; a local model
judges on its own scale, so compare arms within one report, not with published numbers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Optional

import torch
from PIL import Image
from torch import Tensor

from ...config.eval import ScorerConfig
from ...config.loading import ConfigError
from ...errors import Problems
from .base import Scorer, register, register_check, rgb
from .checkpoints import model_sha256
from .rubric import Rubric, load_rubric, parse_answer

GenerateFn = Callable[[Image.Image, str], str]  # (image, question) -> the model's answer


class MLLMGrader(Scorer):
    abstains = True  # an unparseable answer: NaN, counted in the report

    def __init__(self, rubric: Rubric, generate: GenerateFn, *, name: str = "mllm_grader", model_id: str = "",
                 sha256: Optional[str] = None, prompt_format: str = "", max_new_tokens: int = 512) -> None:
        self.rubric = rubric
        self.generate = generate
        self.name = name
        self.model_id = model_id
        self.sha256 = sha256
        self.prompt_format = prompt_format
        self.max_new_tokens = max_new_tokens
        self.batch_size = 1
        self._records: list[dict[str, Any]] = []

    @classmethod
    def from_config(cls, cfg: ScorerConfig) -> MLLMGrader:
        from ...encoders.mllm import GuidanceEncoder

        if cfg.mllm is None:
            raise ConfigError(f"scorer '{cfg.name or 'mllm_grader'}': set its `mllm:` block (backend, model, path, "
                              f"dtype, device), e.g. backend: qwen2_5_vl, model: Qwen/Qwen2.5-VL-7B-Instruct")
        encoder = GuidanceEncoder.from_config(cfg.mllm)
        return cls(load_rubric(cfg.rubric), greedy_generate(encoder, cfg.max_new_tokens),
                   name=cfg.name or "mllm_grader", model_id=cfg.mllm.model,
                   sha256=model_sha256(cfg.mllm.model, cfg.mllm.path), prompt_format=encoder.prompt_format,
                   max_new_tokens=cfg.max_new_tokens)

    def _score_batch(self, images: list[Image.Image], prompts: list[str]) -> Tensor:
        out = []
        for image, prompt in zip(rgb(images), prompts, strict=True):
            answer = self.generate(image, self.rubric.question(prompt))
            grade = parse_answer(answer, self.rubric)
            self._records.append({"prompt": prompt, "answer": answer, "parsed": grade.ok, "error": grade.error,
                                  "overall": grade.overall, "aspects": grade.aspects})
            out.append(float("nan") if grade.overall is None else grade.overall / self.rubric.scale)
        return torch.tensor(out, dtype=torch.float32)

    def pop_records(self) -> list[dict[str, Any]]:
        """The answers since the last call, one per scored image in order (the score stage saves them)."""
        records, self._records = self._records, []
        return records

    def info(self) -> dict[str, Any]:
        r = self.rubric
        return {"kind": "mllm_grader", "model": self.model_id, "sha256": self.sha256, "exact": False,
                "rubric": r.name, "rubric_sha256": r.sha256, "prompt_format": self.prompt_format,
                "decoding": f"greedy, max_new_tokens={self.max_new_tokens}",
                "scale": f"overall / {r.scale:g} (0-1)",
                "reference": "Diffusion-Sharpening (arXiv 2502.12146) MLLM grader: 5 aspects 0-10 + overall",
                "note": "local MLLM instead of the paper's GPT-4o, our wording of the rubric; unparseable answers "
                        "get no score and are counted, never replaced by a default"}


def grader_inputs(encoder: Any, image: Image.Image, question: str) -> dict[str, Tensor]:
    """Model inputs for one image and one question, built as the guidance encoder builds its own:
    the encoder's conversation format and image preprocessing; for LLaVA's conversations, LLaVA's
    piecewise ``tokenizer_image_token`` ids (:func:`~img_lightning.encoders.conversation.llava_input_ids`)."""
    from ...encoders.conversation import LLAVA_CONVERSATIONS, llava_input_ids

    text = encoder.chat_text(question)
    prepared = encoder.prepare_image(image)
    if encoder.format not in LLAVA_CONVERSATIONS:
        return dict(encoder.processor(images=[prepared], text=[text], return_tensors="pt"))
    pixels = encoder.processor.image_processor([prepared], return_tensors="pt")["pixel_values"]
    ids = llava_input_ids(encoder.processor.tokenizer, [text], int(encoder.model.config.image_token_id),
                          encoder.num_image_tokens(pixels))[0]
    return {"input_ids": torch.tensor([ids], dtype=torch.long),
            "attention_mask": torch.ones((1, len(ids)), dtype=torch.long), "pixel_values": pixels}


def greedy_generate(encoder: Any, max_new_tokens: int) -> GenerateFn:
    """``(image, question) -> answer`` with the encoder's model and inputs (:func:`grader_inputs`);
    greedy decoding, batch size 1, the answer without the prompt tokens."""
    model, tokenizer = encoder.model, encoder.processor.tokenizer
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    @torch.inference_mode()
    def generate(image: Image.Image, question: str) -> str:
        inputs = {k: (v.to(encoder.device, encoder.dtype) if v.is_floating_point() else v.to(encoder.device))
                  for k, v in grader_inputs(encoder, image, question).items() if isinstance(v, Tensor)}
        out = model.generate(**inputs, do_sample=False, num_beams=1, max_new_tokens=max_new_tokens,
                             temperature=None, top_p=None, top_k=None, pad_token_id=pad)
        return tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()

    return generate


@register("mllm_grader")
def _build(cfg: ScorerConfig, **_: Any) -> Scorer:
    return MLLMGrader.from_config(cfg)


@register_check("mllm_grader")
def _check(cfg: ScorerConfig, key: str, problems: Problems, **_: Any) -> None:
    from ...encoders.checks import check_mllm

    if cfg.mllm is None:
        problems.add(f"{key}.mllm: not set; give the grader's MLLM (backend, model, path, dtype, device), e.g. "
                     f"backend: qwen2_5_vl, model: Qwen/Qwen2.5-VL-7B-Instruct")
    else:
        check_mllm(cfg.mllm, problems, key=f"{key}.mllm")
    problems.check(load_rubric, cfg.rubric, where=f"{key}.rubric")
