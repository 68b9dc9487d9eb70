"""MLLM guidance features ``h``: hidden states of an MLLM reading an image and a question.

IMG (DESIGN §1) asks the MLLM, about the image generated for a prompt, one of our paraphrased
questions ("How can the image be modified to correspond with the prompt: ...?") and keeps the
hidden states of one layer (default: the last, after the final norm, as ``hidden_states[-1]`` of
transformers) for every REAL input token - image tokens and the chat-formatted question - with
no padding. Shared by preprocessing and evaluation so both produce identical features.

Backends (transformers): LLaVA-1.5 (``llava-hf/llava-1.5-{7,13}b-hf``) and Qwen2.5-VL
(``Qwen/Qwen2.5-VL-7B-Instruct``). Prompt formats: ``llava_v1`` is the original LLaVA-1.5
conversation (system line, ``USER: <image>\n{question} ASSISTANT:``), which the official IMG code
feeds LLaVA, so features match the released aligners; ``chat_template`` renders one user turn
(image, then question, generation prompt appended) with the processor's own template (Qwen's).

Batching never changes a sample's features (up to float rounding): sequences are padded on the
RIGHT, so with causal attention no real token ever sees a pad token and every real token keeps
the position id it has alone (LLaVA's position ids ignore the mask; Qwen's M-RoPE index uses it);
then only the positions with ``attention_mask == 1`` are returned.

``image_mode="pad"`` reproduces LLaVA-1.5's original preprocessing: pad the image to a square with
the processor's mean colour (``int(mean * 255)`` per channel, as LLaVA computes it), then the
processor (resize + centre crop, now a pure resize).
``"processor"`` hands the image to the processor unchanged (Qwen2.5-VL's native behaviour).
"""

from __future__ import annotations

from typing import Sequence

import torch
from PIL import Image
from torch import Tensor

from ..config.encoders import MLLMConfig
from ..models import ModelNotFoundError, model_dir, resolve_device, resolve_dtype, resolve_model_root
from .templates import build_question, template_id_for, templates

__all__ = ["GuidanceEncoder", "build_question", "template_id_for", "expand_to_square", "BACKENDS"]

# backend -> (transformers model class name, config.model_type)
BACKENDS = {
    "llava": ("LlavaForConditionalGeneration", "llava"),
    "qwen2_5_vl": ("Qwen2_5_VLForConditionalGeneration", "qwen2_5_vl"),
}
IMAGE_MODES = ("pad", "processor")
PROMPT_FORMATS = ("auto", "llava_v1", "chat_template")
# The system line of LLaVA-1.5's "llava_v1" conversation template.
LLAVA_V1_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
                   "The assistant gives helpful, detailed, and polite answers to the human's questions.")


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


class GuidanceEncoder:
    """(image, prompt, template id) -> guidance ``[T_i, hidden]`` float32 CPU, one per sample."""

    def __init__(self, backend: str, model, processor, layer: int = -1, image_mode: str = "pad",
                 template_set: str = "img-v1", device: torch.device | None = None,
                 dtype: torch.dtype = torch.float32, batch_size: int = 4, prompt_format: str = "auto") -> None:
        if backend not in BACKENDS:
            raise ValueError(f"unknown MLLM backend {backend!r}; use one of {sorted(BACKENDS)}")
        if image_mode not in IMAGE_MODES:
            raise ValueError(f"unknown image_mode {image_mode!r}; use one of {IMAGE_MODES}")
        if prompt_format not in PROMPT_FORMATS:
            raise ValueError(f"unknown prompt_format {prompt_format!r}; use one of {PROMPT_FORMATS}")
        if prompt_format == "auto":
            prompt_format = "llava_v1" if backend == "llava" else "chat_template"
        if prompt_format == "llava_v1" and backend != "llava":
            raise ValueError("prompt_format='llava_v1' is LLaVA's conversation format; use chat_template")
        self.prompt_format = prompt_format
        templates(template_set)  # fail early on an unknown set
        self.backend = backend
        self.device = device or torch.device("cpu")
        self.dtype = dtype
        self.model = model.to(device=self.device, dtype=dtype).eval()
        self.processor = processor
        # Right padding keeps every real token's position and attention identical to batch size 1.
        self.processor.tokenizer.padding_side = "right"
        self.layer = int(layer)
        self.image_mode = image_mode
        self.template_set = template_set
        self.batch_size = max(1, int(batch_size))
        text_config = getattr(model.config, "text_config", model.config)
        self.hidden_size = int(text_config.hidden_size)
        num_layers = int(text_config.num_hidden_layers)
        if not -(num_layers + 1) <= self.layer <= num_layers:
            raise ValueError(f"layer {layer} out of range: the language model has {num_layers} layers "
                             f"(hidden_states has {num_layers + 1} entries)")
        mean = getattr(processor.image_processor, "image_mean", None) or (0.5, 0.5, 0.5)
        self.pad_fill = tuple(int(float(m) * 255) for m in mean[:3])  # LLaVA truncates, not rounds

    @classmethod
    def from_config(cls, cfg: MLLMConfig) -> "GuidanceEncoder":
        import transformers
        from transformers import AutoConfig, AutoProcessor

        if cfg.backend not in BACKENDS:
            raise ValueError(f"encoders.mllm.backend={cfg.backend!r} is not supported; use one of {sorted(BACKENDS)}")
        root = resolve_model_root(cfg.model, cfg.path, cfg.revision, "encoders.mllm.path")
        folder = model_dir(root, "", cfg.model, "encoders.mllm.path")
        class_name, model_type = BACKENDS[cfg.backend]
        found = AutoConfig.from_pretrained(folder).model_type
        if found != model_type:
            raise ValueError(f"encoders.mllm.backend={cfg.backend!r} expects a {model_type!r} model, but "
                             f"{folder} holds {found!r}; fix encoders.mllm.backend or the model path")
        dtype = resolve_dtype(cfg.dtype)
        device = resolve_device(cfg.device)
        # Straight onto the GPU: a 13B model need not pass through host memory first.
        placement = {"device_map": {"": str(device)}} if device.type == "cuda" else {}
        try:
            model = getattr(transformers, class_name).from_pretrained(folder, dtype=dtype, **placement)
            processor = AutoProcessor.from_pretrained(folder)
        except OSError as err:
            raise ModelNotFoundError(f"cannot load the MLLM {cfg.model!r} from {folder}: {err}") from None
        if cfg.backend == "qwen2_5_vl" and (cfg.min_pixels or cfg.max_pixels):
            size = dict(processor.image_processor.size)
            if cfg.min_pixels:
                size["shortest_edge"] = int(cfg.min_pixels)
            if cfg.max_pixels:
                size["longest_edge"] = int(cfg.max_pixels)
            processor.image_processor.size = size
        return cls(cfg.backend, model, processor, layer=cfg.layer, image_mode=cfg.image_mode,
                   template_set=cfg.templates, device=device, dtype=dtype,
                   batch_size=cfg.batch_size, prompt_format=cfg.prompt_format)

    # -- inputs ------------------------------------------------------------------------------
    def question(self, prompt: str, template_id: int) -> str:
        return build_question(prompt, template_id, self.template_set)

    def chat_text(self, question: str) -> str:
        """The question in the model's chat format, one user turn with the image first."""
        if self.prompt_format == "llava_v1":
            image_token = getattr(self.processor, "image_token", "<image>")
            return f"{LLAVA_V1_SYSTEM} USER: {image_token}\n{question} ASSISTANT:"
        conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        return self.processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)

    def prepare_image(self, image: Image.Image) -> Image.Image:
        image = image if image.mode == "RGB" else image.convert("RGB")
        return expand_to_square(image, self.pad_fill) if self.image_mode == "pad" else image

    def prepare(self, images: Sequence[Image.Image], prompts: Sequence[str], template_ids: Sequence[int]):
        """Processor outputs for one batch (CPU tensors): all the CPU-side work of :meth:`encode`."""
        if not (len(images) == len(prompts) == len(template_ids)):
            raise ValueError(f"got {len(images)} images, {len(prompts)} prompts, {len(template_ids)} template ids")
        texts = [self.chat_text(self.question(p, int(t))) for p, t in zip(prompts, template_ids)]
        return self.processor(images=[self.prepare_image(im) for im in images], text=texts,
                              padding=True, return_tensors="pt")

    # -- model ---------------------------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, batch) -> list[Tensor]:
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
