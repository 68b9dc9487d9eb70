"""ImageReward's checkpoint layout -> transformers' BLIP modules: the written key mapping.

``ImageReward.pt`` is the state dict of ImageReward's ``nn.Module``: ``blip.*`` (its BLIP_Pretrain:
the BLIP ViT ``visual_encoder``, the BERT ``text_encoder`` with cross-attention in every layer,
and the unused contrastive ``vision_proj``/``text_proj``) and ``mlp.layers.*`` (the reward head).

- ``blip.visual_encoder.*`` (BLIP's timm-style ViT) -> ``BlipVisionModel``:
  ``cls_token`` -> ``embeddings.class_embedding``, ``pos_embed`` -> ``embeddings.position_embedding``,
  ``patch_embed.proj`` -> ``embeddings.patch_embedding``, ``blocks.{i}.norm1/norm2`` ->
  ``encoder.layers.{i}.layer_norm1/layer_norm2``, ``blocks.{i}.attn.qkv`` -> ``...self_attn.qkv``
  (same fused q|k|v row order), ``blocks.{i}.attn.proj`` -> ``...self_attn.projection``,
  ``blocks.{i}.mlp.fc1/fc2`` -> ``...mlp.fc1/fc2``, ``norm`` -> ``post_layernorm``.
- ``blip.text_encoder.*`` (BLIP's ``med.py`` BertModel, no pooler) -> ``BlipTextModel``: the same
  names (transformers' BLIP text model was ported from ``med.py``); the ``embeddings.position_ids``
  buffer is dropped.
- ``mlp.layers.{0,2,4,6,7}`` -> the reward head (same five-linear MLP as the aesthetic predictor).
- ``blip.vision_proj`` / ``blip.text_proj`` are not used by the reward and are ignored.

Any other key is refused: a checkpoint we would only half load must not produce numbers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from torch import Tensor

from .checkpoints import CheckpointError

VISION = "blip.visual_encoder."
TEXT = "blip.text_encoder."
HEAD = "mlp."
IGNORED_PREFIXES = ("blip.vision_proj.", "blip.text_proj.")
IGNORED_KEYS = ("blip.text_encoder.embeddings.position_ids",)

_VISION_RULES = (
    (r"cls_token", "embeddings.class_embedding"),
    (r"pos_embed", "embeddings.position_embedding"),
    (r"patch_embed\.proj\.(weight|bias)", r"embeddings.patch_embedding.\1"),
    (r"blocks\.(\d+)\.norm1\.(weight|bias)", r"encoder.layers.\1.layer_norm1.\2"),
    (r"blocks\.(\d+)\.norm2\.(weight|bias)", r"encoder.layers.\1.layer_norm2.\2"),
    (r"blocks\.(\d+)\.attn\.qkv\.(weight|bias)", r"encoder.layers.\1.self_attn.qkv.\2"),
    (r"blocks\.(\d+)\.attn\.proj\.(weight|bias)", r"encoder.layers.\1.self_attn.projection.\2"),
    (r"blocks\.(\d+)\.mlp\.(fc1|fc2)\.(weight|bias)", r"encoder.layers.\1.mlp.\2.\3"),
    (r"norm\.(weight|bias)", r"post_layernorm.\1"),
)


def vision_key(key: str) -> str:
    """A BLIP ViT parameter name (without ``blip.visual_encoder.``) -> its ``BlipVisionModel`` name."""
    for pattern, repl in _VISION_RULES:
        if re.fullmatch(pattern, key):
            return re.sub(pattern, repl, key)
    raise CheckpointError(f"ImageReward checkpoint: unknown visual-encoder key 'blip.visual_encoder.{key}'")


@dataclass
class ImageRewardState:
    vision: dict[str, Tensor] = field(default_factory=dict)  # BlipVisionModel names
    text: dict[str, Tensor] = field(default_factory=dict)  # BlipTextModel names
    head: dict[str, Tensor] = field(default_factory=dict)  # "layers.{i}.{weight,bias}"
    ignored: list[str] = field(default_factory=list)


def split_image_reward_state(state: dict[str, Tensor], source: str = "ImageReward checkpoint") -> ImageRewardState:
    out = ImageRewardState()
    unknown = []
    for key, value in state.items():
        if key.startswith(IGNORED_PREFIXES) or key in IGNORED_KEYS:
            out.ignored.append(key)
        elif key.startswith(VISION):
            out.vision[vision_key(key[len(VISION):])] = value
        elif key.startswith(TEXT):
            out.text[key[len(TEXT):]] = value
        elif key.startswith(HEAD):
            out.head[key[len(HEAD):]] = value
        else:
            unknown.append(key)
    if unknown:
        raise CheckpointError(f"{source}: keys outside ImageReward's layout: {unknown[:5]} (is this ImageReward.pt?)")
    if not (out.vision and out.text and out.head):
        missing = [p for p, d in ((VISION, out.vision), (TEXT, out.text), (HEAD, out.head)) if not d]
        raise CheckpointError(f"{source}: no '{missing[0]}*' weights: not ImageReward's layout")
    return out


def count_layers(state: dict[str, Tensor], pattern: str) -> int:
    """Number of distinct ``{i}`` in keys matching ``pattern`` (a regex with one ``(\\d+)`` group)."""
    found = {int(m.group(1)) for k in state if (m := re.match(pattern, k))}
    if found != set(range(len(found))):
        raise CheckpointError(f"layer indices are not 0..n-1: {sorted(found)}")
    return len(found)
