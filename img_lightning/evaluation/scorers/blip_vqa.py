"""T2I-CompBench attribute binding: BLIP-VQA on transformers' ``BlipForQuestionAnswering``.

Each noun phrase of the prompt becomes the question ``"{np}?"``, cleaned as BLIP's ``pre_question``
does (lower-cased, ``.!"()*#:;~`` removed, at most 50 words) and tokenised with ``[ENC]`` in place
of ``[CLS]``, as BLIP's VQA model feeds its text encoder. The answer probability is the one
of T2I-CompBench's ``vqa_prob``: one decoder step from the decoder start token, softmax over the
vocabulary, ``p(yes) / (p(yes) + p(no))``. The image score is the product over the phrases (1 for a
prompt without any phrase, as the official script scores an empty question). The processor's image
backend is pinned to PIL: BLIP's own transform (384 x 384 bicubic resize on the PIL image).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image
from torch import Tensor

from ...config.eval import ScorerConfig
from ...config.loading import ConfigError
from ...errors import Problems
from ...models import check_model, compute_dtype, from_pretrained, resolve_device
from .base import Scorer, register, register_check, rgb
from .checkpoints import model_sha256
from .noun_phrases import is_exact, noun_phrase_extractor, resolve_noun_phrases

MODEL = "Salesforce/blip-vqa-base"  # transformers' port of BLIP-VQA (T2I-CompBench runs the original at 480 px)
# T2I-CompBench asks about the first 8 noun phrases only (BLIP_vqa.py --np_num, default 8).
MAX_PHRASES = 8


def yes_probability(logits: Tensor, yes_id: int, no_id: int) -> Tensor:
    """``p(yes) / (p(yes) + p(no))`` from first-step decoder logits ``[B, vocab]``.

    Equal to ``sigmoid(logit_yes - logit_no)``: the softmax normaliser cancels, which keeps it exact
    in low precision.
    """
    logits = logits.float()
    return torch.sigmoid(logits[:, yes_id] - logits[:, no_id])


_PUNCT = re.compile(r"([.!\"()*#:;~])")


def pre_question(question: str, max_words: int = 50) -> str:
    """BLIP's question cleaning (``data/utils.py``), which T2I-CompBench's VQA dataset applies."""
    question = _PUNCT.sub("", question.lower()).rstrip(" ")
    words = question.split(" ")
    return " ".join(words[:max_words]) if len(words) > max_words else question


def product_over_phrases(probs: Sequence[float] | Tensor, owners: Sequence[int], n: int) -> Tensor:
    """Multiply question probabilities into one score per image; images without questions get 1."""
    out = torch.ones(n, dtype=torch.float64)
    for p, i in zip(torch.as_tensor(probs, dtype=torch.float64).tolist(), owners, strict=True):
        out[i] *= p
    return out.float()


def phrase_questions(phrases: Sequence[str]) -> list[str]:
    """``"{np}?"`` for the first :data:`MAX_PHRASES` noun phrases, as T2I-CompBench asks them."""
    return [f"{np}?" for np in list(phrases)[:MAX_PHRASES]]


class BlipVQAScorer(Scorer):
    def __init__(self, model: Any, processor: Any, device: torch.device, noun_phrases: str = "rules",
                 batch_size: int = 16, name: str = "blip_vqa", model_id: str = "", sha256: str | None = None) -> None:
        self.model = model.eval().to(device)
        self.processor = processor
        self.device = device
        self.noun_phrases = resolve_noun_phrases(noun_phrases)
        self.phrases = noun_phrase_extractor(self.noun_phrases)
        self.sha256 = sha256
        self.batch_size = batch_size
        self.name = name
        self.model_id = model_id
        self.image_size = int(model.config.vision_config.image_size)
        tok = processor.tokenizer
        self.yes_id = tok.convert_tokens_to_ids("yes")
        self.no_id = tok.convert_tokens_to_ids("no")
        self.enc_id = tok.convert_tokens_to_ids("[ENC]")
        if tok.unk_token_id in (self.yes_id, self.no_id, self.enc_id) or self.enc_id is None:
            raise ConfigError("BLIP tokenizer has no single tokens for 'yes', 'no' and '[ENC]': not BLIP's tokenizer")

    @classmethod
    def from_config(cls, cfg: ScorerConfig) -> BlipVQAScorer:
        from transformers import BlipForQuestionAnswering, BlipProcessor

        device = resolve_device(cfg.device)
        model_id = cfg.model or MODEL
        key = f"scorers[{cfg.name or 'blip_vqa'}]"
        model = from_pretrained(BlipForQuestionAnswering.from_pretrained, "BLIP VQA model", model_id, cfg.path,
                                f"{key}.path", dtype=compute_dtype(cfg.dtype, device))
        processor = from_pretrained(BlipProcessor.from_pretrained, "BLIP processor", cfg.processor or model_id,
                                    cfg.processor_path or cfg.path, f"{key}.processor_path",
                                    backend=cfg.image_backend.value)
        return cls(model, processor, device, cfg.noun_phrases, cfg.batch_size, cfg.name or "blip_vqa", model_id,
                   model_sha256(model_id, cfg.path))

    def questions(self, prompt: str) -> list[str]:
        return phrase_questions(self.phrases(prompt))

    def encode(self, images: list[Image.Image], questions: list[str]) -> Any:
        """Processor outputs with BLIP-VQA's question handling: ``pre_question``, padding to the
        longest, truncation at 35 tokens, ``[ENC]`` as the first token."""
        enc = self.processor(images=rgb(images), text=[pre_question(q) for q in questions], padding="longest",
                             truncation=True, max_length=35, return_tensors="pt")
        enc["input_ids"][:, 0] = self.enc_id
        return enc

    @torch.no_grad()
    def answer_yes(self, images: list[Image.Image], questions: list[str]) -> Tensor:
        """p(yes)/(p(yes)+p(no)) for each (image, question) pair."""
        dtype = next(self.model.parameters()).dtype
        enc = self.encode(images, questions)
        pixel_values = enc["pixel_values"].to(self.device, dtype)
        input_ids = enc["input_ids"].to(self.device)
        mask = enc["attention_mask"].to(self.device)
        image_embeds = self.model.vision_model(pixel_values=pixel_values)[0]
        image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=self.device)
        question = self.model.text_encoder(
            input_ids=input_ids, attention_mask=mask, encoder_hidden_states=image_embeds,
            encoder_attention_mask=image_mask, return_dict=True,
        ).last_hidden_state
        start = torch.full((len(images), 1), self.model.decoder_start_token_id, device=self.device)
        logits = self.model.text_decoder(
            input_ids=start, encoder_hidden_states=question, encoder_attention_mask=mask, return_dict=True,
        ).logits[:, 0, :]
        return yes_probability(logits, self.yes_id, self.no_id)

    def _score_batch(self, images: list[Image.Image], prompts: list[str]) -> Tensor:
        pair_images, questions, owners = [], [], []
        for i, (im, p) in enumerate(zip(images, prompts, strict=True)):
            for q in self.questions(p):
                pair_images.append(im)
                questions.append(q)
                owners.append(i)
        probs = []
        for s in range(0, len(questions), self.batch_size):
            chunk = slice(s, s + self.batch_size)
            probs.append(self.answer_yes(pair_images[chunk], questions[chunk]).cpu())
        flat = torch.cat(probs) if probs else torch.zeros(0)
        return product_over_phrases(flat, owners, len(images))

    def info(self) -> dict[str, Any]:
        # Always a proxy: T2I-CompBench runs BLIP's own VQA checkpoint (capfilt-large, finetuned
        # for VQA) at 480 px; this is transformers' port of another checkpoint at its own size.
        how = ("T2I-CompBench's own chunker, spaCy" if is_exact(self.noun_phrases) else
               "the built-in rule-based chunker, a PROXY for T2I-CompBench's spaCy en_core_web_sm "
               "(install spaCy and en_core_web_sm for its questions)")
        return {"kind": "blip_vqa", "model": self.model_id, "sha256": self.sha256,
                "noun_phrases": self.noun_phrases, "max_phrases": MAX_PHRASES, "exact": False,
                "note": f"PROXY: transformers' {self.model_id} at {self.image_size} px stands in for the BLIP VQA "
                        f"checkpoint (capfilt-large) T2I-CompBench runs at 480 px, so numbers are not comparable "
                        f"with published ones; noun phrases: {how}",
                "reference": "T2I-CompBench BLIPvqa_eval (vqa_prob: p(yes)/(p(yes)+p(no)), product over noun phrases)",
                "scale": "0-1"}


@register("blip_vqa")
def _build(cfg: ScorerConfig, **_: Any) -> Scorer:
    return BlipVQAScorer.from_config(cfg)


@register_check("blip_vqa")
def _check(cfg: ScorerConfig, key: str, problems: Problems, **_: Any) -> None:
    model_id = cfg.model or MODEL
    problems.check(check_model, "BLIP VQA model", model_id, cfg.path, f"{key}.path")
    problems.check(check_model, "BLIP processor", cfg.processor or model_id, cfg.processor_path or cfg.path,
                   f"{key}.processor_path", marker=None, weights=False)
    problems.check(noun_phrase_extractor, cfg.noun_phrases, where=f"{key}.noun_phrases")
