"""Tiny, randomly initialised scorer models saved in the formats the real ones ship in.

- HPS: an open_clip model config registered under a custom name (same ``CLIP`` class as
  ``ViT-H-14``) and a ``{"state_dict": ...}`` checkpoint, loaded back by the HPS scorer with
  ``weights_only=True``.
- CLIP / PickScore: a transformers ``CLIPModel`` folder + ``CLIPProcessor``.
- BLIP-VQA: a ``BlipForQuestionAnswering`` folder + ``BlipProcessor`` (BERT word-piece vocab with
  the ``[DEC]`` start token and single tokens for "yes"/"no", like ``Salesforce/blip-vqa-base``).
- Detector: an ``OwlViTForObjectDetection`` folder + ``OwlViTProcessor``.
- ImageReward: ``ImageReward.pt`` as released (a plain state dict of ImageReward's module: BLIP ViT
  ``blip.visual_encoder.*``, BERT-with-cross-attention ``blip.text_encoder.*`` incl. its
  ``position_ids`` buffer, the unused ``blip.vision_proj``/``text_proj``, the ``mlp.layers.*`` head),
  ``med_config.json`` beside it and a ``bert-base-uncased``-style tokenizer folder (no ``[DEC]``/``[ENC]``:
  the scorer adds them as ImageReward does).
- Aesthetic predictor: the MLP state dict (``layers.{0,2,4,6,7}``) over the tiny CLIP's embeddings.
"""

from __future__ import annotations

import json
from itertools import pairwise
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
    image_proc = CLIPImageProcessor(size={"shortest_edge": image_size},
                                    crop_size={"height": image_size, "width": image_size})
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


def _bert_tokenizer_dir(out: Path) -> tuple[Path, int]:
    """A BertTokenizer folder (vocab.txt) without BLIP's [DEC]/[ENC]; returns (dir, its size)."""
    from transformers import BertTokenizer

    out.mkdir(parents=True, exist_ok=True)
    letters = [c for c in "abcdefghijklmnopqrstuvwxyz0123456789.,'-"] + [f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz"]
    words = [w for w in dict.fromkeys(BLIP_WORDS + letters) if w not in ("[DEC]", "[ENC]")]
    vocab = out / "vocab.txt"
    vocab.write_text("\n".join(words) + "\n")
    tok = BertTokenizer(str(vocab), model_max_length=512)
    vocab.unlink()
    tok.save_pretrained(out)
    return out, len(tok)


def image_reward_shapes(vocab: int, vision_width: int = 128, vision_layers: int = 1, patch: int = 8,
                        image_size: int = 32, text_width: int = 64, text_layers: int = 1,
                        max_positions: int = 40) -> dict[str, tuple[int, ...]]:
    """Every tensor of ``ImageReward.pt`` with its shape, named as ImageReward's module names them."""
    d, t, n = vision_width, text_width, (image_size // patch) ** 2 + 1
    shapes: dict[str, tuple[int, ...]] = {
        "blip.visual_encoder.cls_token": (1, 1, d), "blip.visual_encoder.pos_embed": (1, n, d),
        "blip.visual_encoder.patch_embed.proj.weight": (d, 3, patch, patch),
        "blip.visual_encoder.patch_embed.proj.bias": (d,),
        "blip.visual_encoder.norm.weight": (d,), "blip.visual_encoder.norm.bias": (d,),
    }
    for i in range(vision_layers):
        b = f"blip.visual_encoder.blocks.{i}."
        shapes.update({b + "norm1.weight": (d,), b + "norm1.bias": (d,), b + "attn.qkv.weight": (3 * d, d),
                       b + "attn.qkv.bias": (3 * d,), b + "attn.proj.weight": (d, d), b + "attn.proj.bias": (d,),
                       b + "norm2.weight": (d,), b + "norm2.bias": (d,), b + "mlp.fc1.weight": (4 * d, d),
                       b + "mlp.fc1.bias": (4 * d,), b + "mlp.fc2.weight": (d, 4 * d), b + "mlp.fc2.bias": (d,)})
    e = "blip.text_encoder.embeddings."
    shapes.update({e + "word_embeddings.weight": (vocab, t), e + "position_embeddings.weight": (max_positions, t),
                   e + "LayerNorm.weight": (t,), e + "LayerNorm.bias": (t,)})
    for i in range(text_layers):
        b = f"blip.text_encoder.encoder.layer.{i}."
        for att, kv in (("attention", t), ("crossattention", d)):
            shapes.update({b + f"{att}.self.query.weight": (t, t), b + f"{att}.self.query.bias": (t,),
                           b + f"{att}.self.key.weight": (t, kv), b + f"{att}.self.key.bias": (t,),
                           b + f"{att}.self.value.weight": (t, kv), b + f"{att}.self.value.bias": (t,),
                           b + f"{att}.output.dense.weight": (t, t), b + f"{att}.output.dense.bias": (t,),
                           b + f"{att}.output.LayerNorm.weight": (t,), b + f"{att}.output.LayerNorm.bias": (t,)})
        shapes.update({b + "intermediate.dense.weight": (4 * t, t), b + "intermediate.dense.bias": (4 * t,),
                       b + "output.dense.weight": (t, 4 * t), b + "output.dense.bias": (t,),
                       b + "output.LayerNorm.weight": (t,), b + "output.LayerNorm.bias": (t,)})
    shapes.update({"blip.vision_proj.weight": (16, d), "blip.vision_proj.bias": (16,),
                   "blip.text_proj.weight": (16, t), "blip.text_proj.bias": (16,)})
    dims = (t, 32, 16, 8, 4, 1)
    for i, (a, b_) in zip((0, 2, 4, 6, 7), pairwise(dims), strict=True):
        shapes.update({f"mlp.layers.{i}.weight": (b_, a), f"mlp.layers.{i}.bias": (b_,)})
    return shapes


def build_tiny_image_reward(out_dir: str | Path, seed: int = 0) -> dict[str, Path]:
    """``{out_dir}/ImageReward.pt`` + ``med_config.json`` + ``tokenizer/``; returns their paths."""
    out = Path(out_dir)
    tok_dir, n_tok = _bert_tokenizer_dir(out / "tokenizer")
    vocab = n_tok + 2  # + [DEC], [ENC], as bert-base-uncased's 30522 -> med_config's 30524
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in image_reward_shapes(vocab).items():
        if "norm" in name.lower() and name.endswith("weight"):
            state[name] = torch.ones(shape)
        elif name.endswith("bias") and not name.startswith("mlp."):
            state[name] = torch.zeros(shape)
        else:
            state[name] = torch.randn(shape, generator=gen) * (0.3 if name.startswith("mlp.") else 0.05)
    state["blip.text_encoder.embeddings.position_ids"] = torch.arange(40)[None]  # med.py's persistent buffer
    torch.save(state, out / "ImageReward.pt")
    (out / "med_config.json").write_text(json.dumps({
        "hidden_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 256,
        "vocab_size": vocab, "max_position_embeddings": 40, "layer_norm_eps": 1e-12, "hidden_act": "gelu",
        "pad_token_id": 0, "add_cross_attention": True, "encoder_width": 128,
    }, indent=2))
    return {"checkpoint": out / "ImageReward.pt", "tokenizer": tok_dir, "med_config": out / "med_config.json"}


def build_tiny_aesthetic(out_dir: str | Path, embed_dim: int = 16, seed: int = 0) -> Path:
    """The predictor's MLP (``layers.{0,2,4,6,7}``) for ``embed_dim``-d CLIP embeddings, a plain
    ``.pth`` state dict like ``sac+logos+ava1-l14-linearMSE.pth``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    head = torch.nn.Module()
    head.layers = torch.nn.Sequential(
        torch.nn.Linear(embed_dim, 32), torch.nn.Dropout(0.2), torch.nn.Linear(32, 16), torch.nn.Dropout(0.2),
        torch.nn.Linear(16, 8), torch.nn.Dropout(0.1), torch.nn.Linear(8, 4), torch.nn.Linear(4, 1),
    )
    path = out / "aesthetic_mlp.pth"
    torch.save(head.state_dict(), path)
    return path


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
        **{f"image_reward_{k}": v for k, v in build_tiny_image_reward(out / "image_reward").items()},
        "aesthetic_mlp": build_tiny_aesthetic(out / "aesthetic"),
    }
