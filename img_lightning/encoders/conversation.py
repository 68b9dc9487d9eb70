"""Conversation formats: how a question (and, for finetuning, an answer) becomes MLLM input.

One module for the guidance encoder (preprocessing, evaluation) and the MLLM finetuning stage, so
the model is trained and read with exactly the same text and token ids.

Formats (:class:`PromptFormat`):

* ``llava_v0`` - LLaVA's ``conv_llava_v0`` (separator style SINGLE, no example messages):
  ``{system}###Human: <image>\\n{question}###Assistant:``. The released IMG inference code picks it
  for the released model folder ``llava`` (the conversation is derived from the folder name), so
  the released aligners were trained on features of this format.
* ``llava_v1`` - LLaVA's ``conv_llava_v1`` (style TWO), LLaVA-1.5's training conversation:
  ``{system} USER: <image>\\n{question} ASSISTANT:``; an answer turn ends with ``</s>``.
* ``chat_template`` - one user turn (image, then question) through the processor's own chat
  template (Qwen2.5-VL, or llava-hf's template); training samples (:func:`encode_chat_template_conversation`)
  take their ids from the processor, as the guidance encoder does.

Token ids of the LLaVA formats follow LLaVA's ``tokenizer_image_token``, not the llava-hf processor
(which tokenises the whole string at once and so tokenises the text after ``<image>`` with another
leading space): the text is split at ``<image>``, every piece is tokenised on its own (with the
tokenizer's special tokens), the later pieces lose their first token when the first piece began
with BOS, and the image position is spliced in between. :func:`llava_input_ids` expands that
position to the model's image token repeated once per image feature, which is where the llava-hf
model scatters the projected image features - the same sequence the original model builds.

API: ``LLAVA_CONVERSATIONS[fmt].prompt(question)`` / ``.conversation(question, answer)`` (a
:class:`Rendered` with the answer's character span), :func:`llava_input_ids` (model ids),
:func:`encode_llava_conversation` (ids + the answer-and-end-of-turn token span, ``.labels()`` for a
loss on the answer only); for chat templates :func:`chat_template_prompt`,
:func:`chat_template_conversation` and :func:`answer_token_span`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional

from ..config.encoders import PromptFormat  # the enum lives with the schema that types it
from ..errors import UserError

IMAGE_MARKER = "<image>"


class PromptTextError(UserError, ValueError):
    """A question or answer that cannot be put into the conversation (it holds the image marker)."""


class PromptTooLong(PromptTextError):
    """A prompt whose token sequence (question + image tokens) exceeds the MLLM's context."""


# The system line LLaVA's v0 and v1 conversations share.
LLAVA_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
                "The assistant gives helpful, detailed, and polite answers to the human's questions.")


@dataclass(frozen=True)
class Rendered:
    """A conversation as text: ``text[:prompt_end]`` is the prompt (it ends where the assistant's
    answer starts), ``text[prompt_end:answer_end]`` the answer with its end-of-turn separator."""

    text: str
    prompt_end: int
    answer_end: int

    @property
    def prompt(self) -> str:
        return self.text[: self.prompt_end]

    @property
    def answer(self) -> str:
        return self.text[self.prompt_end : self.answer_end]


@dataclass(frozen=True)
class LlavaConversation:
    """LLaVA's separator-style conversations (one image, one question, optionally one answer)."""

    name: str
    system: str
    roles: tuple[str, str]
    sep: str  # after the system line and after the user's turn
    end_of_turn: str  # after the assistant's answer: ``sep`` (style SINGLE) or ``sep2`` (style TWO)

    def _user_turn(self, question: str) -> str:
        if IMAGE_MARKER in question:
            raise PromptTextError(f"the question contains {IMAGE_MARKER!r}, the image placeholder of the "
                                  f"{self.name} conversation: {question[:120]!r}")
        return f"{IMAGE_MARKER}\n{question}"

    def prompt(self, question: str) -> str:
        """What the model reads before answering (LLaVA: user turn, then the empty assistant turn)."""
        return f"{self.system}{self.sep}{self.roles[0]}: {self._user_turn(question)}{self.sep}{self.roles[1]}:"

    def conversation(self, question: str, answer: str) -> Rendered:
        """The prompt followed by the answer turn, as LLaVA renders a finished conversation."""
        if IMAGE_MARKER in answer:
            raise PromptTextError(f"the answer contains {IMAGE_MARKER!r}: {answer[:120]!r}")
        prompt = self.prompt(question)
        text = f"{prompt} {answer}{self.end_of_turn}"
        return Rendered(text=text, prompt_end=len(prompt), answer_end=len(text))


LLAVA_V0 = LlavaConversation("llava_v0", LLAVA_SYSTEM, ("Human", "Assistant"), sep="###", end_of_turn="###")
LLAVA_V1 = LlavaConversation("llava_v1", LLAVA_SYSTEM, ("USER", "ASSISTANT"), sep=" ", end_of_turn="</s>")
LLAVA_CONVERSATIONS = {PromptFormat.llava_v0: LLAVA_V0, PromptFormat.llava_v1: LLAVA_V1}


def resolve_format(prompt_format: Any, backend: str) -> PromptFormat:
    """``auto`` -> the backend's natural format; LLaVA formats only for the LLaVA backend."""
    fmt = PromptFormat(getattr(prompt_format, "value", prompt_format))
    if fmt is PromptFormat.auto:
        return PromptFormat.llava_v1 if backend == "llava" else PromptFormat.chat_template
    if fmt in LLAVA_CONVERSATIONS and backend != "llava":
        raise ValueError(f"prompt_format={fmt.value!r} is LLaVA's conversation format; use chat_template "
                         f"for the {backend} backend")
    return fmt


# -- chat templates -----------------------------------------------------------------------------------
def _user_message(question: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]


def chat_template_prompt(processor: Any, question: str) -> str:
    """One user turn (image first) with the generation prompt, in the processor's own template."""
    token = getattr(processor, "image_token", None)
    if token and token in question:
        raise PromptTextError(f"the question contains {token!r}, the processor's image placeholder: {question[:120]!r}")
    return processor.apply_chat_template(_user_message(question), add_generation_prompt=True, tokenize=False)


def chat_template_conversation(processor: Any, question: str, answer: str) -> Rendered:
    """The prompt plus the assistant's answer; the answer span starts right after the generation
    prompt (spaces the template puts before the answer, as llava-hf's ``ASSISTANT: ``, belong to
    it, as in LLaVA's own formats) and ends after the tokenizer's EOS text. When the template closes
    the turn with it (Qwen's ``<|im_end|>``) that is the template's own; when it does not
    (llava-hf's template ends the turn with a space), the EOS is put right after the answer, as
    LLaVA's own v1 conversation ends a turn with ``</s>``: a model never shown an end of turn never
    learns to stop."""
    prompt = chat_template_prompt(processor, question)
    messages = _user_message(question) + [{"role": "assistant", "content": [{"type": "text", "text": answer}]}]
    text = processor.apply_chat_template(messages, tokenize=False)
    start = len(prompt)
    gap = len(text[start:]) - len(text[start:].lstrip(" "))
    if not text.startswith(prompt) or not text[start + gap:].startswith(answer):
        raise PromptTextError("the chat template does not render the answer right after the generation prompt; "
                              "its answer tokens cannot be located")
    end = start + gap + len(answer)
    eos = getattr(getattr(processor, "tokenizer", processor), "eos_token", None)
    if not eos:
        raise UserError("the tokenizer has no EOS token, so an answer's end of turn cannot be supervised with "
                        "prompt_format=chat_template; use a LLaVA conversation format (llava_v0, llava_v1)")
    if text[end:].lstrip(" ").startswith(eos):
        end = text.index(eos, end) + len(eos)
    else:
        text = text[:end] + eos + text[end:]
        end += len(eos)
    return Rendered(text=text, prompt_end=start, answer_end=end)


# -- token ids ----------------------------------------------------------------------------------------
def llava_pieces_ids(tokenizer: Any, texts: Sequence[str]) -> list[list[Optional[int]]]:
    """LLaVA's ``tokenizer_image_token`` for a batch of texts, with ``None`` at each image position.

    Every piece between image markers is tokenised on its own with the tokenizer's special tokens;
    if the first piece starts with BOS, every later piece drops its first token (its own BOS).
    """
    pieces = [text.split(IMAGE_MARKER) for text in texts]
    flat = [p for parts in pieces for p in parts]
    encoded = tokenizer(flat, add_special_tokens=True)["input_ids"] if flat else []
    bos = getattr(tokenizer, "bos_token_id", None)
    out: list[list[Optional[int]]] = []
    k = 0
    for parts in pieces:
        chunks = [list(encoded[k + j]) for j in range(len(parts))]
        k += len(parts)
        drop = 1 if bos is not None and chunks[0][:1] == [bos] else 0
        ids: list[Optional[int]] = list(chunks[0])
        for chunk in chunks[1:]:
            ids.append(None)
            ids.extend(chunk[drop:])
        out.append(ids)
    return out


def expand_image(ids: Sequence[Optional[int]], image_token_id: int, num_image_tokens: int) -> list[int]:
    """Replace each image position by ``num_image_tokens`` copies of the model's image token."""
    out: list[int] = []
    for i in ids:
        if i is None:
            out.extend([image_token_id] * num_image_tokens)
        else:
            out.append(int(i))
    return out


def llava_input_ids(tokenizer: Any, texts: Sequence[str], image_token_id: int,
                    num_image_tokens: int) -> list[list[int]]:
    """Model input ids of LLaVA-format texts (one image each), image positions expanded."""
    out = []
    for ids in llava_pieces_ids(tokenizer, texts):
        if sum(i is None for i in ids) != 1:
            raise PromptTextError(f"a LLaVA prompt must hold exactly one {IMAGE_MARKER!r}")
        out.append(expand_image(ids, image_token_id, num_image_tokens))
    return out


def common_prefix(a: Sequence[Any], b: Sequence[Any]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


@dataclass(frozen=True)
class EncodedConversation:
    """Token ids of a full conversation and the answer tokens the loss is computed on."""

    input_ids: list[int]
    answer_start: int  # input_ids[answer_start:answer_end] are the answer (+ end of turn) tokens
    answer_end: int

    def labels(self, ignore_index: int = -100) -> list[int]:
        """``input_ids`` at the answer positions, ``ignore_index`` everywhere else."""
        return [t if self.answer_start <= i < self.answer_end else ignore_index for i, t in enumerate(self.input_ids)]


def answer_token_span(prompt_ids: Sequence[Any], upto_answer_end_ids: Sequence[Any],
                      full_ids: Sequence[Any]) -> tuple[int, int]:
    """Answer tokens of ``full_ids`` from tokenisations of the prompt and of the text up to the
    answer's end: they start where the full sequence stops agreeing with the prompt's tokens (so a
    token that merges across the boundary counts as answer) and end after as many tokens as the
    text up to the answer's end has."""
    start = common_prefix(prompt_ids, full_ids)
    end = min(len(upto_answer_end_ids), len(full_ids))
    return start, max(start, end)


def encode_llava_conversation(tokenizer: Any, fmt: PromptFormat, question: str, answer: str,
                              image_token_id: int, num_image_tokens: int) -> EncodedConversation:
    """A LLaVA-format training sample: ids as ``tokenizer_image_token`` gives them for the whole
    conversation, and the span of the answer plus its end-of-turn separator."""
    rendered = LLAVA_CONVERSATIONS[PromptFormat(fmt)].conversation(question, answer)
    prompt_ids, full_ids = llava_input_ids(tokenizer, [rendered.prompt, rendered.text], image_token_id,
                                           num_image_tokens)
    start, end = answer_token_span(prompt_ids, full_ids, full_ids)
    return EncodedConversation(input_ids=full_ids, answer_start=start, answer_end=end)


def encode_chat_template_conversation(processor: Any, image: Any, question: str,
                                      answer: str) -> tuple[EncodedConversation, dict]:
    """A chat-template training sample: the processor's ids and image inputs for the whole
    conversation (image placeholders expanded by the processor, exactly as the guidance encoder's
    ``processor(images, text)`` call does for the prompt), and the answer span, located from the
    processor's ids of the prompt and of the text up to the answer's end."""
    rendered = chat_template_conversation(processor, question, answer)
    full = processor(images=[image], text=[rendered.text], return_tensors="pt")
    spans = processor(images=[image, image], text=[rendered.prompt, rendered.text[: rendered.answer_end]])
    full_ids = [int(t) for t in full["input_ids"][0].tolist()]
    start, end = answer_token_span(list(spans["input_ids"][0]), list(spans["input_ids"][1]), full_ids)
    extra = {k: v for k, v in full.items() if k not in ("input_ids", "attention_mask")}
    return EncodedConversation(input_ids=full_ids, answer_start=start, answer_end=end), extra
