"""Tiny, randomly initialised scorer models saved in the formats the real ones ship in.

- HPS: an open_clip model config registered under a custom name (same ``CLIP`` class as
  ``ViT-H-14``) and a ``{"state_dict": ...}`` checkpoint, loaded back by the HPS scorer with
  ``weights_only=True``.
- CLIP / PickScore: a transformers ``CLIPModel`` folder + ``CLIPProcessor``.
- BLIP-VQA: a ``BlipForQuestionAnswering`` folder + ``BlipProcessor`` (BERT word-piece vocab with
  the ``[DEC]`` start token and single tokens for "yes"/"no", like ``Salesforce/blip-vqa-base``).
- Detector: an ``OwlViTForObjectDetection`` folder + ``OwlViTProcessor``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .vocab import clip_vocab

TINY_HPS_ARCH = "img-lightning-tiny-hps"
TINY_HPS_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 224, "layers": 1, "width": 32, "head_width": 16, "patch_size": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
BLIP_WORDS = (
    "[PAD] [UNK] [CLS] [SEP] [MASK] [DEC] [ENC] yes no a an the of on and with to is in "
    "red green blue yellow black white brown pink orange purple gray wooden metallic fluffy glass "
    "bench bowl car dog cat hat box ball tree sky house table chair lamp book cup bottle vase "
    "round square triangle circle star ring cross diamond shape left right top bottom next near ?"
).split()


def _clip_tokenizer():
    from transformers import CLIPTokenizer

    vocab, merges = clip_vocab()
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def build_tiny_hps(out_dir: str | Path, seed: int = 0) -> dict[str, Path]:
    """Write ``{out_dir}/{arch}.json`` (open_clip model config) and ``hps_tiny.pt``.

    Returns ``{"model_config": json, "checkpoint": pt}``; the scorer registers the JSON with
    ``open_clip.add_model_config`` and creates the model by ``TINY_HPS_ARCH``.
    """
    import open_clip

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg_path = out / f"{TINY_HPS_ARCH}.json"
    cfg_path.write_text(json.dumps(TINY_HPS_CONFIG, indent=2))
    open_clip.add_model_config(cfg_path)
    torch.manual_seed(seed)
    model = open_clip.create_model(TINY_HPS_ARCH, pretrained=None)
    ckpt = out / "hps_tiny.pt"
    torch.save({"state_dict": model.state_dict()}, ckpt)
    return {"model_config": cfg_path, "checkpoint": ckpt}


def build_tiny_clip(out_dir: str | Path, seed: int = 0, image_size: int = 32) -> Path:
    """A ``CLIPModel`` + ``CLIPProcessor`` folder (stands in for PickScore, CLIP-H and ViT-B/32)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    out = Path(out_dir)
    tok = _clip_tokenizer()
    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=image_size, patch_size=8),
        projection_dim=16,
    )
    CLIPModel(config).save_pretrained(out)
    image_proc = CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size})
    CLIPProcessor(image_processor=image_proc, tokenizer=tok).save_pretrained(out)
    return out


def build_tiny_blip_vqa(out_dir: str | Path, seed: int = 0, image_size: int = 32) -> Path:
    from transformers import BertTokenizer, BlipConfig, BlipForQuestionAnswering, BlipImageProcessor, BlipProcessor

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab_file = out / "vocab.txt"
    letters = [c for c in "abcdefghijklmnopqrstuvwxyz0123456789.,'-"] + [f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz"]
    words = list(dict.fromkeys(BLIP_WORDS + letters))
    vocab_file.write_text("\n".join(words) + "\n")
    tok = BertTokenizer(str(vocab_file), bos_token="[DEC]", model_max_length=35)
    tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    vocab_file.unlink()
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("[PAD]", "[SEP]", "[DEC]")}
    torch.manual_seed(seed)
    config = BlipConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, encoder_hidden_size=32, max_position_embeddings=64,
                         pad_token_id=ids["[PAD]"], bos_token_id=ids["[DEC]"], sep_token_id=ids["[SEP]"]),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=image_size, patch_size=8),
    )
    BlipForQuestionAnswering(config).save_pretrained(out)
    image_proc = BlipImageProcessor(size={"height": image_size, "width": image_size})
    BlipProcessor(image_processor=image_proc, tokenizer=tok).save_pretrained(out)
    return out


def build_tiny_owlvit(out_dir: str | Path, seed: int = 0, image_size: int = 32) -> Path:
    from transformers import OwlViTConfig, OwlViTForObjectDetection, OwlViTImageProcessor, OwlViTProcessor

    out = Path(out_dir)
    tok = _clip_tokenizer()
    torch.manual_seed(seed)
    config = OwlViTConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=16, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=image_size, patch_size=8),
        projection_dim=32,  # = text hidden size, as in the real model (512/512)
    )
    OwlViTForObjectDetection(config).save_pretrained(out)
    image_proc = OwlViTImageProcessor(size={"height": image_size, "width": image_size},
                                      crop_size={"height": image_size, "width": image_size})
    tok.model_max_length = 16
    OwlViTProcessor(image_processor=image_proc, tokenizer=tok).save_pretrained(out)
    return out


def build_tiny_scorers(out_dir: str | Path) -> dict[str, Path]:
    """Everything the evaluation tests and the demo need, under ``out_dir``."""
    out = Path(out_dir)
    hps = build_tiny_hps(out / "hps")
    return {
        "hps_checkpoint": hps["checkpoint"],
        "hps_model_config": hps["model_config"],
        "clip": build_tiny_clip(out / "clip"),
        "blip_vqa": build_tiny_blip_vqa(out / "blip_vqa"),
        "owlvit": build_tiny_owlvit(out / "owlvit"),
    }
