"""ImageReward (THUDM/ImageReward, ``ImageReward-v1.0``) on transformers' BLIP modules.

The reference ``ImageReward.score(prompt, image)``:

1. image: OpenAI CLIP's transform at 224 (short side to 224 bicubic, centre crop, CLIP mean/std);
2. BLIP ViT-L/16 image embeddings (all 197 tokens);
3. the prompt through BLIP's tokenizer (``bert-base-uncased`` plus ``[DEC]`` as bos and ``[ENC]``
   as an additional special token), ``padding="max_length", truncation=True, max_length=35``; the
   ids go in as they are (ImageReward does not swap ``[CLS]`` for ``[ENC]``);
4. the BERT text encoder with cross-attention over the image embeddings; the ``[CLS]`` position of
   the last layer -> the MLP head (float32) -> ``(reward - 0.16717362830052426) / 1.0333394966054072``.

The released ``ImageReward.pt`` is a plain state dict: it is loaded with ``weights_only=True`` (a
file that needs unpickling is refused) and mapped onto ``BlipVisionModel`` / ``BlipTextModel`` by
the written key mapping of :mod:`.blip_layout`. Architecture sizes come from the weights; heads are
64-dimensional (BLIP's ViT-B/L and BERT-base), or read from ``med_config.json`` (``model_config``,
or beside the checkpoint) for the text encoder.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import torch
from PIL import Image
from torch import Tensor

from ...config.eval import ScorerConfig
from ...errors import Problems
from ...models import ModelNotFoundError, check_model, compute_dtype, from_pretrained, resolve_device
from .aesthetic import aesthetic_mlp
from .base import Scorer, register, register_check
from .blip_layout import ImageRewardState, count_layers, split_image_reward_state
from .checkpoints import CheckpointError, file_sha256, load_state_dict_file, need_file
from .transforms import clip_pixels

TOKENIZER = "bert-base-uncased"  # ImageReward's text side
REWARD_MEAN = 0.16717362830052426
REWARD_STD = 1.0333394966054072
MAX_LENGTH = 35
HEAD_DIM = 64
VISION_LN_EPS = 1e-6  # BLIP's ViT: partial(nn.LayerNorm, eps=1e-6)


def image_reward_tokenizer(tokenizer: Any) -> Any:
    """BLIP's ``init_tokenizer`` on a ``bert-base-uncased`` tokenizer: ``[DEC]`` bos, ``[ENC]`` extra."""
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tokenizer


def _vision_config(state: dict[str, Tensor]) -> Any:
    from transformers import BlipVisionConfig

    width = int(state["embeddings.class_embedding"].shape[-1])
    patch = int(state["embeddings.patch_embedding.weight"].shape[-1])
    grid = round((state["embeddings.position_embedding"].shape[1] - 1) ** 0.5)
    return BlipVisionConfig(
        hidden_size=width, intermediate_size=int(state["encoder.layers.0.mlp.fc1.weight"].shape[0]),
        num_hidden_layers=count_layers(state, r"encoder\.layers\.(\d+)\."),
        num_attention_heads=max(1, width // HEAD_DIM),
        image_size=grid * patch, patch_size=patch, layer_norm_eps=VISION_LN_EPS, hidden_act="gelu",
    )


def _text_config(state: dict[str, Tensor], med: dict[str, Any], vision_width: int) -> Any:
    from transformers import BlipTextConfig

    vocab, hidden = state["embeddings.word_embeddings.weight"].shape
    cross_in = int(state["encoder.layer.0.crossattention.self.key.weight"].shape[1])
    if cross_in != vision_width:
        raise CheckpointError(f"ImageReward checkpoint: cross-attention takes {cross_in}-d inputs, the ViT gives "
                              f"{vision_width}-d")
    layers = count_layers(state, r"encoder\.layer\.(\d+)\.")
    for name, have in (("hidden_size", hidden), ("num_hidden_layers", layers), ("vocab_size", vocab)):
        if name in med and int(med[name]) != int(have):
            raise CheckpointError(f"med_config.json says {name}={med[name]}, the checkpoint has {have}")
    return BlipTextConfig(
        vocab_size=int(vocab), hidden_size=int(hidden), encoder_hidden_size=cross_in,
        intermediate_size=int(state["encoder.layer.0.intermediate.dense.weight"].shape[0]),
        num_hidden_layers=layers, num_attention_heads=int(med.get("num_attention_heads", max(1, hidden // HEAD_DIM))),
        max_position_embeddings=int(state["embeddings.position_embeddings.weight"].shape[0]),
        layer_norm_eps=float(med.get("layer_norm_eps", 1e-12)), hidden_act=med.get("hidden_act", "gelu"),
        pad_token_id=int(med.get("pad_token_id", 0)), bos_token_id=None, sep_token_id=None, is_decoder=True,
    )


def build_image_reward_modules(state: ImageRewardState, med: Optional[dict[str, Any]] = None):
    """``(BlipVisionModel, BlipTextModel, MLP head)`` with the mapped weights loaded strictly."""
    from transformers import BlipTextModel, BlipVisionModel

    vision = BlipVisionModel(_vision_config(state.vision))
    _load_strict(vision, state.vision, "visual encoder")
    text = BlipTextModel(_text_config(state.text, med or {}, vision.config.hidden_size), add_pooling_layer=False)
    _load_strict(text, state.text, "text encoder")
    head = aesthetic_mlp(state.head, "ImageReward head")
    return vision.eval(), text.eval(), head


def _load_strict(module: torch.nn.Module, state: dict[str, Tensor], what: str) -> None:
    result = module.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(f"ImageReward checkpoint: the {what} does not fit BLIP's layout (missing "
                              f"{result.missing_keys[:4]}, unexpected {result.unexpected_keys[:4]})")


def _med_config(cfg: ScorerConfig, checkpoint: str) -> dict[str, Any]:
    path = Path(cfg.model_config) if cfg.model_config else Path(checkpoint).with_name("med_config.json")
    if cfg.model_config and not path.is_file():
        raise ModelNotFoundError(f"image_reward: model_config={path} does not exist (ImageReward's med_config.json)")
    return json.loads(path.read_text()) if path.is_file() else {}


class ImageRewardScorer(Scorer):
    def __init__(self, vision: Any, text: Any, head: torch.nn.Module, tokenizer: Any, device: torch.device, *,
                 dtype: torch.dtype = torch.float32, name: str = "image_reward", batch_size: int = 16,
                 sha256: Optional[str] = None, tokenizer_id: str = "") -> None:
        self.vision = vision.to(device=device, dtype=dtype).eval()
        self.text = text.to(device=device, dtype=dtype).eval()
        self.head = head.to(device=device, dtype=torch.float32).eval()
        self.tokenizer = tokenizer
        self.device = device
        self.dtype = dtype
        self.name = name
        self.batch_size = batch_size
        self.sha256 = sha256
        self.tokenizer_id = tokenizer_id
        self.image_size = int(vision.config.image_size)
        if len(tokenizer) > text.config.vocab_size:
            raise CheckpointError(f"image_reward: the tokenizer has {len(tokenizer)} tokens but the text encoder "
                                  f"only {text.config.vocab_size} embeddings (use bert-base-uncased)")

    @classmethod
    def from_config(cls, cfg: ScorerConfig) -> ImageRewardScorer:
        from transformers import BertTokenizer

        key = f"scorers[{cfg.name or 'image_reward'}]"
        if not cfg.checkpoint:
            raise ModelNotFoundError(f"image_reward: no checkpoint set; {image_reward_advice(f'{key}.checkpoint')}")
        raw = load_state_dict_file(cfg.checkpoint, "ImageReward checkpoint", f"{key}.checkpoint")
        vision, text, head = build_image_reward_modules(split_image_reward_state(raw, cfg.checkpoint),
                                                        _med_config(cfg, cfg.checkpoint))
        tok_id = cfg.processor or TOKENIZER
        tokenizer = from_pretrained(BertTokenizer.from_pretrained, "BERT tokenizer", tok_id, cfg.processor_path,
                                    f"{key}.processor_path")
        device = resolve_device(cfg.device)
        return cls(vision, text, head, image_reward_tokenizer(tokenizer), device,
                   dtype=compute_dtype(cfg.dtype, device), name=cfg.name or "image_reward",
                   batch_size=cfg.batch_size, sha256=file_sha256(cfg.checkpoint), tokenizer_id=tok_id)

    def tokens(self, prompts: list[str]) -> Any:
        return self.tokenizer(prompts, padding="max_length", truncation=True, max_length=MAX_LENGTH,
                              return_tensors="pt")

    def raw_reward(self, images: list[Image.Image], prompts: list[str]) -> Tensor:
        """The head's output before ImageReward's normalisation, ``[B]`` float32."""
        pix = clip_pixels(images, self.image_size).to(self.device, self.dtype)
        image_embeds = self.vision(pixel_values=pix).last_hidden_state
        image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=self.device)
        tok = self.tokens(prompts)
        out = self.text(input_ids=tok["input_ids"].to(self.device),
                        attention_mask=tok["attention_mask"].to(self.device), encoder_hidden_states=image_embeds,
                        encoder_attention_mask=image_mask, return_dict=True)
        return self.head(out.last_hidden_state[:, 0, :].float())[:, 0]

    def _score_batch(self, images: list[Image.Image], prompts: list[str]) -> Tensor:
        return (self.raw_reward(images, prompts) - REWARD_MEAN) / REWARD_STD

    def info(self) -> dict[str, Any]:
        return {"kind": "image_reward", "model": "ImageReward-v1.0 (BLIP ViT-L/16 + BERT, MLP head)",
                "sha256": self.sha256, "tokenizer": self.tokenizer_id, "exact": True,
                "dtype": str(self.dtype).replace("torch.", ""),
                "reference": "THUDM/ImageReward ImageReward.score()",
                "scale": f"(reward - {REWARD_MEAN}) / {REWARD_STD} (about -2..2)"}


@register("image_reward")
def _build(cfg: ScorerConfig, **_: Any) -> Scorer:
    return ImageRewardScorer.from_config(cfg)


def image_reward_advice(key: str) -> str:
    from ...model_sources import checkpoint_advice

    return checkpoint_advice("THUDM/ImageReward", "ImageReward.pt", key, also=["med_config.json"])


@register_check("image_reward")
def _check(cfg: ScorerConfig, key: str, problems: Problems, **_: Any) -> None:
    problems.check(need_file, cfg.checkpoint, "ImageReward checkpoint", f"{key}.checkpoint",
                   image_reward_advice(f"{key}.checkpoint"))
    if cfg.model_config:
        problems.check(need_file, cfg.model_config, "ImageReward med_config.json", f"{key}.model_config")
    problems.check(check_model, "BERT tokenizer", cfg.processor or TOKENIZER, cfg.processor_path,
                   f"{key}.processor_path", marker=None, weights=False)
