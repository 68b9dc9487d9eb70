"""MLLM guidance features ``h``: hidden states of an MLLM reading an image and a question.

IMG asks the MLLM, about the image generated for a prompt, one question of a question set
(:mod:`.questions`: the released question file, or our built-in paraphrases) and keeps the hidden
states of one layer (default: the last, after the final norm, as ``hidden_states[-1]`` of
transformers) for every REAL input token - image tokens and the formatted question - with no
padding. Shared by preprocessing and evaluation so both produce identical features.

Backends (transformers): LLaVA-1.5 in the llava-hf layout (``llava-hf/llava-1.5-{7,13}b-hf``, or a
folder converted from the original LLaVA repository format by ``img-convert-llava``, such as the
released IMG-finetuned model) and Qwen2.5-VL (``Qwen/Qwen2.5-VL-7B-Instruct``). Prompt formats
(:mod:`.conversation`): ``llava_v0`` (what the released IMG code feeds its LLaVA), ``llava_v1``
(LLaVA-1.5's own conversation) and ``chat_template`` (the processor's template, Qwen's). For the
LLaVA formats the token ids are built as LLaVA's ``tokenizer_image_token`` builds them (pieces
around ``<image>`` tokenised separately), then the image position is expanded to the model's image
token, once per image feature; pixels come from the processor's image processor.

Batching never changes a sample's features (up to float rounding): sequences are padded on the
RIGHT, so with causal attention no real token ever sees a pad token and every real token keeps
the position id it has alone (LLaVA's position ids ignore the mask; Qwen's M-RoPE index uses it);
then only the positions with ``attention_mask == 1`` are returned.

``image_mode="pad"`` reproduces LLaVA-1.5's original preprocessing: pad the image to a square with
the processor's mean colour (``int(mean * 255)`` per channel, as LLaVA computes it), then the
processor (resize + centre crop, now a pure resize) with transformers' PIL backend, whose bicubic
resize is the one LLaVA's CLIPImageProcessor ran.
``"processor"`` hands the image to the processor unchanged (Qwen2.5-VL's native behaviour).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from torch import Tensor

from ..config.encoders import MLLMConfig
from ..config.loading import ConfigError
from ..models import ModelNotFoundError, model_dir, resolve_device, resolve_dtype, resolve_model_root
from .conversation import (
    LLAVA_CONVERSATIONS,
    LLAVA_SYSTEM,
    PromptFormat,
    PromptTooLong,
    chat_template_prompt,
    llava_input_ids,
    resolve_format,
)
from .export_manifest import verify_export_weights, warn_if_trained_otherwise
from .questions import QuestionSet, builtin_question_set, question_set_from_config
from .templates import build_question, template_id_for

__all__ = ["GuidanceEncoder", "build_question", "template_id_for", "expand_to_square", "prepare_image", "pad_fill",
           "mllm_folder", "load_mllm_model", "load_mllm_processor", "llava_num_image_tokens", "BACKENDS"]

# backend -> (transformers model class name, config.model_type)
BACKENDS = {
    "llava": ("LlavaForConditionalGeneration", "llava"),
    "qwen2_5_vl": ("Qwen2_5_VLForConditionalGeneration", "qwen2_5_vl"),
}
IMAGE_MODES = ("pad", "processor")
PROMPT_FORMATS = tuple(f.value for f in PromptFormat)
LLAVA_V1_SYSTEM = LLAVA_SYSTEM  # kept for callers of the earlier name


def expand_to_square(image: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    """Centre ``image`` on a square canvas of its longer side filled with ``fill`` (LLaVA-1.5)."""
    image = image if image.mode == "RGB" else image.convert("RGB")
    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    canvas = Image.new("RGB", (side, side), fill)
    canvas.paste(image, ((side - w) // 2, (side - h) // 2))
    return canvas


def pad_fill(processor: Any) -> tuple[int, int, int]:
    """LLaVA's padding colour: the image processor's mean, ``int(mean * 255)`` (truncated, as LLaVA)."""
    mean = getattr(processor.image_processor, "image_mean", None) or (0.5, 0.5, 0.5)
    r, g, b = (int(float(m) * 255) for m in mean[:3])
    return r, g, b


def prepare_image(image: Image.Image, image_mode: str, fill: tuple[int, int, int]) -> Image.Image:
    """The image the processor receives: RGB, padded to a square with ``fill`` in ``"pad"`` mode.
    Shared by the guidance encoder and the MLLM finetuning stage, so both see the same pixels."""
    if image_mode not in IMAGE_MODES:
        raise ValueError(f"unknown image_mode {image_mode!r}; use one of {IMAGE_MODES}")
    image = image if image.mode == "RGB" else image.convert("RGB")
    return expand_to_square(image, fill) if image_mode == "pad" else image


def llava_num_image_tokens(config: Any, pixel_values: Tensor) -> int:
    """Image features a llava-hf model produces for one image of this size."""
    patch = int(config.vision_config.patch_size)
    n = (int(pixel_values.shape[-2]) // patch) * (int(pixel_values.shape[-1]) // patch)
    return n + (1 if config.vision_feature_select_strategy == "full" else 0)


def mllm_folder(cfg: MLLMConfig, key: str = "encoders.mllm") -> Path:
    """The local folder of ``cfg``'s MLLM (``path``, a local ``model``, or the HF cache); checks the
    backend against the folder's ``config.json``. Never downloads. ``key``: the config block's name
    in messages (``mllm`` in the finetuning configs)."""
    from transformers import AutoConfig

    if cfg.backend not in BACKENDS:
        raise ConfigError(f"{key}.backend={cfg.backend!r} is not supported; use one of {sorted(BACKENDS)}")
    if isinstance(cfg, DictConfig) and OmegaConf.is_missing(cfg, "path"):
        raise ConfigError(f"{key}.path is not set: the recipe's MLLM ({cfg.model}) is a local folder; "
                          f"for the released IMG model, convert its llava/ folder once with img-convert-llava "
                          f"and set {key}.path to the output (see README)")
    root = resolve_model_root(cfg.model, cfg.path, cfg.revision, f"{key}.path")
    folder = model_dir(root, "", cfg.model, f"{key}.path")
    _, model_type = BACKENDS[cfg.backend]
    raw = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    if "mm_vision_tower" in raw or "LlavaLlamaForCausalLM" in (raw.get("architectures") or []):
        # Its model_type also says "llava", but transformers would load it with random projector
        # and tower weights: refuse instead of producing meaningless features.
        raise ConfigError(f"{folder} is a checkpoint in the original LLaVA repository format; convert it once "
                          f"with `img-convert-llava {folder} OUT` and set {key}.path=OUT")
    found = AutoConfig.from_pretrained(folder).model_type
    if found != model_type:
        raise ConfigError(f"{key}.backend={cfg.backend!r} expects a {model_type!r} model, but "
                          f"{folder} holds {found!r}; fix {key}.backend or the model path"
                          + (" (an original LLaVA-repository folder? convert it with img-convert-llava)"
                             if cfg.backend == "llava" else ""))
    return folder


def load_mllm_processor(cfg: MLLMConfig, folder: Path) -> Any:
    """The processor as the guidance encoder uses it (LLaVA: transformers' PIL image backend, the
    resize LLaVA's own code ran; Qwen: ``min_pixels``/``max_pixels`` applied)."""
    from transformers import AutoProcessor

    backend = {"backend": "pil"} if cfg.backend == "llava" else {}
    try:
        processor = AutoProcessor.from_pretrained(folder, **backend)
    except OSError as err:
        raise ModelNotFoundError(f"cannot load the processor of the MLLM {cfg.model!r} from {folder}: {err}") from None
    if cfg.backend == "qwen2_5_vl" and (cfg.min_pixels or cfg.max_pixels):
        size = dict(processor.image_processor.size)
        if cfg.min_pixels:
            size["shortest_edge"] = int(cfg.min_pixels)
        if cfg.max_pixels:
            size["longest_edge"] = int(cfg.max_pixels)
        processor.image_processor.size = size
    return processor


def load_mllm_model(cfg: MLLMConfig, folder: Path, dtype: torch.dtype, device: torch.device | None = None) -> Any:
    """The transformers model of ``cfg.backend`` from ``folder`` (straight onto ``device`` if a GPU)."""
    import transformers

    class_name, _ = BACKENDS[cfg.backend]
    # Straight onto the GPU: a 13B model need not pass through host memory first.
    placement = {"device_map": {"": str(device)}} if device is not None and device.type == "cuda" else {}
    try:
        return getattr(transformers, class_name).from_pretrained(folder, dtype=dtype, **placement)
    except OSError as err:
        raise ModelNotFoundError(f"cannot load the MLLM {cfg.model!r} from {folder}: {err}") from None


class GuidanceEncoder:
    """(image, prompt, question index) -> guidance ``[T_i, hidden]`` float32 CPU, one per sample."""

    def __init__(self, backend: str, model: Any, processor: Any, layer: int = -1, image_mode: str = "pad",
                 template_set: str | QuestionSet = "img-v1", device: torch.device | None = None,
                 dtype: torch.dtype = torch.float32, batch_size: int = 4,
                 prompt_format: str | PromptFormat = "auto") -> None:
        if backend not in BACKENDS:
            raise ValueError(f"unknown MLLM backend {backend!r}; use one of {sorted(BACKENDS)}")
        if image_mode not in IMAGE_MODES:
            raise ValueError(f"unknown image_mode {image_mode!r}; use one of {IMAGE_MODES}")
        value = getattr(prompt_format, "value", prompt_format)
        if value not in PROMPT_FORMATS:
            raise ValueError(f"unknown prompt_format {value!r}; use one of {PROMPT_FORMATS}")
        self.format = resolve_format(value, backend)
        self.prompt_format = self.format.value
        self.questions = template_set if isinstance(template_set, QuestionSet) else builtin_question_set(template_set)
        self.backend = backend
        self.device = device or torch.device("cpu")
        self.dtype = dtype
        self.model = model.to(device=self.device, dtype=dtype).eval()
        self.processor = processor
        # Right padding keeps every real token's position and attention identical to batch size 1.
        self.processor.tokenizer.padding_side = "right"
        self.layer = int(layer)
        self.image_mode = image_mode
        self.batch_size = max(1, int(batch_size))
        text_config = getattr(model.config, "text_config", model.config)
        self.hidden_size = int(text_config.hidden_size)
        num_layers = int(text_config.num_hidden_layers)
        if not -(num_layers + 1) <= self.layer <= num_layers:
            raise ValueError(f"layer {layer} out of range: the language model has {num_layers} layers "
                             f"(hidden_states has {num_layers + 1} entries)")
        self.pad_fill = pad_fill(processor)  # LLaVA truncates, not rounds

    @property
    def template_set(self) -> str:
        """Name of the question set (a built-in set or the question file's name)."""
        return self.questions.name

    @classmethod
    def from_config(cls, cfg: MLLMConfig) -> GuidanceEncoder:
        questions = question_set_from_config(cfg)  # a bad question file fails before the model loads
        folder = mllm_folder(cfg)
        verify_export_weights(folder)  # an export's weights must be the ones its manifest (cache key) lists
        warn_if_trained_otherwise(cfg, folder)
        dtype = resolve_dtype(cfg.dtype)
        device = resolve_device(cfg.device)
        model = load_mllm_model(cfg, folder, dtype, device)
        processor = load_mllm_processor(cfg, folder)
        return cls(cfg.backend, model, processor, layer=cfg.layer, image_mode=cfg.image_mode,
                   template_set=questions, device=device, dtype=dtype,
                   batch_size=cfg.batch_size, prompt_format=cfg.prompt_format)

    # -- inputs ------------------------------------------------------------------------------
    def question_index(self, key: str) -> int:
        """The question of a sample, chosen from its id (pair id, prompt key) by a stable hash."""
        return self.questions.index_for(key)

    def question(self, prompt: str, template_id: int) -> str:
        return self.questions.question(prompt, template_id)

    def chat_text(self, question: str) -> str:
        """The question in the model's conversation format, one user turn with the image first."""
        if self.format in LLAVA_CONVERSATIONS:
            return LLAVA_CONVERSATIONS[self.format].prompt(question)
        return chat_template_prompt(self.processor, question)

    def prompt_text(self, prompt: str, template_id: int) -> str:
        """The exact text given to the MLLM for an image generated for ``prompt`` (with its image
        placeholder); raises :class:`~.conversation.PromptTextError` if the prompt holds ``<image>``."""
        return self.chat_text(self.question(prompt, int(template_id)))

    def prepare_image(self, image: Image.Image) -> Image.Image:
        return prepare_image(image, self.image_mode, self.pad_fill)

    def num_image_tokens(self, pixel_values: Tensor) -> int:
        """Image features the llava-hf model produces for one image of this size."""
        return llava_num_image_tokens(self.model.config, pixel_values)

    @property
    def max_tokens(self) -> int:
        """The longest input the model's own code would read whole: the language model's context
        (``max_position_embeddings``), or LLaVA's ``tokenizer_model_max_length`` (the length at which
        the original LLaVA code cuts the embedded sequence, 2048 for LLaVA-1.5; ``img-convert-llava``
        keeps it in the config) when smaller. Longer inputs are refused."""
        text_config = getattr(self.model.config, "text_config", self.model.config)
        limit = int(text_config.max_position_embeddings)
        released = getattr(self.model.config, "tokenizer_model_max_length", None)
        return min(limit, int(released)) if released else limit

    def sequence_length(self, text: str) -> Optional[int]:
        """Tokens the MLLM reads for ``text`` and one image (the LLaVA formats: exact, image tokens
        included; the chat-template formats: None, their images' token count depends on the image)."""
        if self.format not in LLAVA_CONVERSATIONS:
            return None
        side = self.processor.image_processor.crop_size
        pixels = torch.zeros(1, 3, int(side["height"]), int(side["width"]))
        image_token = int(self.model.config.image_token_id)
        return len(llava_input_ids(self.processor.tokenizer, [text], image_token, self.num_image_tokens(pixels))[0])

    def check_length(self, text: str) -> None:
        """Refuse a prompt longer than the model's context (raises :class:`PromptTooLong`).

        The rule is refusal, not truncation: a truncated question would cut the caption the
        guidance is about, and the features would no longer say what they claim to. Preprocessing
        skips such a pair and counts it (``too_long`` in ``summary.json``); evaluation stops.
        """
        n = self.sequence_length(text)
        if n is not None and n > self.max_tokens:
            raise PromptTooLong(f"the MLLM input is {n} tokens (question, caption and image), more than the "
                                f"model's limit of {self.max_tokens}: {text[:80]!r}...")

    def _prepare_llava(self, images: list[Image.Image], texts: list[str]) -> dict:
        pixels = self.processor.image_processor(images, return_tensors="pt")["pixel_values"]
        image_token = int(self.model.config.image_token_id)
        ids = llava_input_ids(self.processor.tokenizer, texts, image_token, self.num_image_tokens(pixels))
        for text, row in zip(texts, ids, strict=True):
            if len(row) > self.max_tokens:
                raise PromptTooLong(f"the MLLM input is {len(row)} tokens (question, caption and image), more than "
                                    f"the model's limit of {self.max_tokens}: {text[:80]!r}...")
        pad = self.processor.tokenizer.pad_token_id
        pad = 0 if pad is None else int(pad)
        width = max(len(x) for x in ids)
        input_ids = torch.full((len(ids), width), pad, dtype=torch.long)
        attention = torch.zeros((len(ids), width), dtype=torch.long)
        for i, row in enumerate(ids):
            input_ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            attention[i, : len(row)] = 1
        return {"input_ids": input_ids, "attention_mask": attention, "pixel_values": pixels}

    def prepare(self, images: Sequence[Image.Image], prompts: Sequence[str],
                template_ids: Sequence[int]) -> Mapping[str, Any]:
        """Model inputs for one batch (CPU tensors): all the CPU-side work of :meth:`encode`."""
        if not (len(images) == len(prompts) == len(template_ids)):
            raise ValueError(f"got {len(images)} images, {len(prompts)} prompts, {len(template_ids)} template ids")
        texts = [self.prompt_text(p, int(t)) for p, t in zip(prompts, template_ids, strict=True)]
        prepared = [self.prepare_image(im) for im in images]
        if self.format in LLAVA_CONVERSATIONS:
            return self._prepare_llava(prepared, texts)
        return self.processor(images=prepared, text=texts, padding=True, return_tensors="pt")

    # -- model ---------------------------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, batch: Mapping[str, Any]) -> list[Tensor]:
        """Hidden states of ``self.layer`` for the real tokens of each sample."""
        inputs = {}
        for key, value in batch.items():
            if not isinstance(value, Tensor):
                continue
            value = value.to(self.device)
            inputs[key] = value.to(self.dtype) if value.is_floating_point() else value
        want_all = self.layer != -1
        out = self.model.model(**inputs, output_hidden_states=want_all, use_cache=False, return_dict=True)
        hidden = out.hidden_states[self.layer] if want_all else out.last_hidden_state
        mask = inputs["attention_mask"].bool()
        hidden = hidden.float().cpu()
        mask = mask.cpu()
        return [hidden[i][mask[i]].clone() for i in range(hidden.shape[0])]

    def encode(self, images: Sequence[Image.Image], prompts: Sequence[str],
               template_ids: Sequence[int]) -> list[Tensor]:
        out: list[Tensor] = []
        for i in range(0, len(images), self.batch_size):
            j = i + self.batch_size
            out.extend(self.forward(self.prepare(images[i:j], prompts[i:j], template_ids[i:j])))
        return out
