"""Edit triplet -> model inputs, in exactly the guidance encoder's format.

The question is chosen from the triplet's key with :meth:`QuestionSet.index_for` and filled with
the edited prompt; the conversation, token ids and pixels come from the same functions the
guidance encoder uses (:mod:`..encoders.conversation`, :func:`..encoders.mllm.prepare_image`), so
the finetuned model is trained on the very text and ids it is later read with. Labels are the
answer tokens plus the end of turn (``###`` for ``llava_v0``, ``</s>`` for ``llava_v1``, the
tokenizer's EOS for ``chat_template``: the template's own, as Qwen's ``<|im_end|>``, or put after
the answer when the template closes the turn without one, as llava-hf's); everything else is ``IGNORE``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from PIL import Image
from torch import Tensor

from ..config.encoders import MLLMConfig
from ..encoders.conversation import (
    LLAVA_CONVERSATIONS,
    EncodedConversation,
    chat_template_prompt,
    encode_chat_template_conversation,
    encode_llava_conversation,
    llava_input_ids,
    resolve_format,
)
from ..encoders.mllm import llava_num_image_tokens, pad_fill, prepare_image
from ..encoders.questions import QuestionSet

IGNORE = -100
# Per-token processor outputs (Qwen2.5-VL's M-RoPE needs mm_token_type_ids); padded with 0 = text.
TOKEN_KEYS = ("mm_token_type_ids", "token_type_ids")


class OverLong(Exception):
    """A sample longer than ``data.max_length`` tokens (image tokens included)."""


@dataclass
class EncodedSample:
    key: str
    input_ids: list[int]
    labels: list[int]
    image_inputs: dict[str, Tensor]  # pixel_values (+ image_grid_thw, mm_token_type_ids for Qwen)
    question_index: int = -1
    prompt_text: str = ""  # the conversation text the model read (with its image placeholder)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)

    @property
    def num_answer_tokens(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE)


class SampleEncoder:
    """Encodes (key, image, edited prompt, instruction) for training and (key, image, prompt) for
    generation. Holds only the processor and the model's config, never the weights."""

    def __init__(self, backend: str, processor: Any, model_config: Any, questions: QuestionSet,
                 prompt_format: Any = "auto", image_mode: str = "pad", max_length: int = 2048) -> None:
        self.backend = backend
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.config = model_config
        self.questions = questions
        self.format = resolve_format(prompt_format, backend)
        self.image_mode = image_mode
        self.max_length = int(max_length)
        self.fill = pad_fill(processor)
        pad = self.tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else (self.tokenizer.eos_token_id or 0))

    @classmethod
    def from_config(cls, mllm_cfg: MLLMConfig, max_length: int = 2048) -> SampleEncoder:
        from transformers import AutoConfig

        from ..encoders.mllm import load_mllm_processor, mllm_folder
        from ..encoders.questions import question_set_from_config

        questions = question_set_from_config(mllm_cfg)
        folder = mllm_folder(mllm_cfg, key="mllm")
        return cls(str(mllm_cfg.backend), load_mllm_processor(mllm_cfg, folder), AutoConfig.from_pretrained(folder),
                   questions, prompt_format=mllm_cfg.prompt_format, image_mode=str(mllm_cfg.image_mode),
                   max_length=max_length)

    @property
    def end_of_turn(self) -> Optional[str]:
        """Text that ends an answer turn (cut generated answers there)."""
        if self.format in LLAVA_CONVERSATIONS:
            return LLAVA_CONVERSATIONS[self.format].end_of_turn
        return self.tokenizer.eos_token

    # -- pieces ------------------------------------------------------------------------------------
    def question(self, key: str, prompt: str) -> tuple[int, str]:
        index = self.questions.index_for(key)
        return index, self.questions.question(prompt, index)

    def _llava_pixels(self, image: Image.Image) -> tuple[dict[str, Tensor], int]:
        pixels = self.processor.image_processor([image], return_tensors="pt")["pixel_values"]
        return {"pixel_values": pixels}, llava_num_image_tokens(self.config, pixels)

    def prompt_text(self, question: str) -> str:
        if self.format in LLAVA_CONVERSATIONS:
            return LLAVA_CONVERSATIONS[self.format].prompt(question)
        return chat_template_prompt(self.processor, question)

    # -- samples -----------------------------------------------------------------------------------
    def encode(self, key: str, image: Image.Image, prompt: str, answer: str) -> EncodedSample:
        """A training sample; raises :class:`OverLong` or ``PromptTextError`` (image placeholder in the text)."""
        image = prepare_image(image, self.image_mode, self.fill)
        index, question = self.question(key, prompt)
        enc: EncodedConversation
        if self.format in LLAVA_CONVERSATIONS:
            inputs, n_image = self._llava_pixels(image)
            enc = encode_llava_conversation(self.tokenizer, self.format, question, answer,
                                            int(self.config.image_token_id), n_image)
        else:
            enc, inputs = encode_chat_template_conversation(self.processor, image, question, answer)
        if len(enc.input_ids) > self.max_length:
            raise OverLong(f"{len(enc.input_ids)} tokens > data.max_length={self.max_length}")
        return EncodedSample(key, enc.input_ids, enc.labels(IGNORE), inputs, index, self.prompt_text(question))

    def encode_prompt(self, key: str, image: Image.Image, prompt: str) -> EncodedSample:
        """Generation input: the prompt only (what the guidance encoder feeds the model)."""
        image = prepare_image(image, self.image_mode, self.fill)
        index, question = self.question(key, prompt)
        text = self.prompt_text(question)
        if self.format in LLAVA_CONVERSATIONS:
            inputs, n_image = self._llava_pixels(image)
            ids = llava_input_ids(self.tokenizer, [text], int(self.config.image_token_id), n_image)[0]
        else:
            out = self.processor(images=[image], text=[text], return_tensors="pt")
            ids = [int(t) for t in out["input_ids"][0].tolist()]
            inputs = {k: v for k, v in out.items() if k not in ("input_ids", "attention_mask")}
        return EncodedSample(key, ids, [IGNORE] * len(ids), inputs, index, text)

    def placeholder(self) -> EncodedSample:
        """A sample with no loss (all labels ignored): fills held-out batches so every rank runs
        the same forwards, and stands in for a batch whose samples were all unusable."""
        side = 224
        image = Image.new("RGB", (side, side), self.fill)
        sample = self.encode("placeholder", image, "", "")
        sample.labels = [IGNORE] * len(sample.labels)
        sample.key = ""
        return sample

    # -- batches -----------------------------------------------------------------------------------
    def collate(self, samples: Sequence[EncodedSample], padding_side: str = "right") -> dict[str, Any]:
        """Pad to the longest sample. Training pads on the right (every real token keeps its
        position, as in the guidance encoder); generation on the left."""
        width = max(s.num_tokens for s in samples)
        n = len(samples)
        input_ids = torch.full((n, width), self.pad_id, dtype=torch.long)
        labels = torch.full((n, width), IGNORE, dtype=torch.long)
        attention = torch.zeros((n, width), dtype=torch.long)
        token_extra = {k: torch.zeros((n, width), dtype=torch.long) for k in TOKEN_KEYS
                       if any(k in s.image_inputs for s in samples)}
        for i, s in enumerate(samples):
            cols = slice(0, s.num_tokens) if padding_side == "right" else slice(width - s.num_tokens, width)
            input_ids[i, cols] = torch.tensor(s.input_ids, dtype=torch.long)
            labels[i, cols] = torch.tensor(s.labels, dtype=torch.long)
            attention[i, cols] = 1
            for k, t in token_extra.items():
                t[i, cols] = s.image_inputs[k].reshape(-1).long()
        batch: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention, "labels": labels, **token_extra}
        for k in samples[0].image_inputs:
            if k not in TOKEN_KEYS:
                batch[k] = torch.cat([s.image_inputs[k] for s in samples], dim=0)
        return batch

