"""Encoder configs shared by preprocessing and evaluation, so both compute features identically.

Fields split in two: *identity* fields (model ids, revisions, dtype, layer, templates, image
preprocessing) go into the cache key; *location/speed* fields (local paths, device, batch size) do
not, except that a local MLLM folder holding a finetuned export adds the export's identity (its
manifest's sha256). ``recipe_fields`` lists the identity fields of each block;
:mod:`img_lightning.recipe` turns them (with the question file's sha256) into the cache key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from .choices import Choice, Dtype


class MLLMBackend(Choice):
    llava = "llava"  # LLaVA-1.5 (llava-hf format; convert original-format folders with img-convert-llava)
    qwen2_5_vl = "qwen2_5_vl"


class ImageMode(Choice):
    pad = "pad"  # LLaVA-1.5's pad-to-square with the processor's mean colour, then the processor
    processor = "processor"  # the HF processor as is (Qwen2.5-VL's native behaviour)


class IPKind(Choice):
    sdxl_plus = "sdxl_plus"  # IP-Adapter-Plus SDXL: CLIP ViT-H penultimate states -> resampler -> [16, 2048]
    flux_xlabs = "flux_xlabs"  # XLabs FLUX IP-Adapter v1: CLIP ViT-L/14 embedding -> [4, 4096]


class PromptFormat(Choice):
    """How the MLLM's question is wrapped (the formats: :mod:`img_lightning.encoders.conversation`)."""

    auto = "auto"  # llava_v1 for LLaVA, chat_template otherwise
    llava_v0 = "llava_v0"
    llava_v1 = "llava_v1"
    chat_template = "chat_template"


@dataclass
class MLLMConfig:
    backend: MLLMBackend = MLLMBackend.llava
    model: str = "llava-hf/llava-1.5-13b-hf"  # Hugging Face id: the model's identity
    revision: Optional[str] = None
    path: Optional[str] = None  # local directory to load from instead of the HF cache
    layer: int = -1  # index into hidden_states (-1 = last layer, as in the paper)
    dtype: Dtype = Dtype.bfloat16  # compute dtype of the MLLM
    templates: str = "img-v1"  # built-in question set (demo, tests); unused when `questions` is set
    # Question file: a JSON list of strings, each with {prompt} exactly once (the released IMG
    # models: assets/edit_instructions.json of the authors' GitHub repository). Its sha256, not its
    # path, is part of the cache key. None: the built-in set named by `templates`.
    questions: Optional[str] = None
    image_mode: ImageMode = ImageMode.pad
    # How the question is wrapped (img_lightning/encoders/conversation.py): "llava_v0" = LLaVA's v0
    # conversation ("{system}###Human: <image>\n{q}###Assistant:", what the released IMG code feeds
    # its finetuned LLaVA); "llava_v1" = LLaVA-1.5's own ("{system} USER: <image>\n{q} ASSISTANT:");
    # "chat_template" = the processor's chat template; "auto" = llava_v1 for LLaVA, else chat_template.
    prompt_format: PromptFormat = PromptFormat.auto
    # Qwen2.5-VL only: bounds on the resized image area (pixels), i.e. on the image token count
    # (one token per 28x28 pixels). None keeps the processor's own setting.
    min_pixels: Optional[int] = None
    max_pixels: Optional[int] = None
    device: str = "auto"
    batch_size: int = 4

    # The question choice enters the recipe through `question_recipe` (set name or file sha256).
    recipe_fields = (
        "backend", "model", "revision", "layer", "dtype", "image_mode", "prompt_format", "min_pixels", "max_pixels",
    )


@dataclass
class IPEncoderConfig:
    kind: IPKind = IPKind.sdxl_plus
    image_encoder: str = "h94/IP-Adapter"  # HF id of the CLIP vision tower
    image_encoder_subfolder: str = "models/image_encoder"
    adapter: str = "h94/IP-Adapter"  # HF id holding the adapter checkpoint
    adapter_subfolder: str = "sdxl_models"
    adapter_weight_name: str = "ip-adapter-plus_sdxl_vit-h.safetensors"
    revision: Optional[str] = None
    image_encoder_path: Optional[str] = None  # local overrides (not part of the cache key)
    adapter_path: Optional[str] = None
    dtype: Dtype = Dtype.float16
    # Run the CLIP tower and the projection under torch.autocast in `dtype`, as the released SDXL
    # get_ip_feat does (on CUDA: LayerNorm, softmax and the residual stream in float32, matmuls in
    # `dtype`); no effect in float32. Identity: in the cache key when true (so older keys stay valid).
    autocast: bool = False
    device: str = "auto"
    batch_size: int = 16

    recipe_fields = (
        "kind",
        "image_encoder",
        "image_encoder_subfolder",
        "adapter",
        "adapter_subfolder",
        "adapter_weight_name",
        "revision",
        "dtype",
    )


@dataclass
class EncodersConfig:
    mllm: MLLMConfig = field(default_factory=MLLMConfig)
    ip: IPEncoderConfig = field(default_factory=IPEncoderConfig)
