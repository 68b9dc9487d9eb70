"""A tiny LLaVA-1.5 in the ORIGINAL LLaVA-repository format (what ``shi-labs/IMG`` ``llava/`` is).

The format ``img-convert-llava`` reads, written file by file as LLaVA's training code leaves it:

* ``config.json`` of ``LlavaLlamaForCausalLM``: the Llama fields plus LLaVA's ``mm_*`` fields
  (``mm_vision_tower`` names a CLIP vision tower that is NOT part of the checkpoint,
  ``mm_projector_type: mlp2x_gelu``, ``mm_vision_select_layer: -2``, ``mm_vision_select_feature:
  patch``, ``image_aspect_ratio: pad``, ``mm_hidden_size``);
* weights ``model.embed_tokens``, ``model.layers.*``, ``model.norm``, ``lm_head`` and the projector
  ``model.mm_projector.{0,2}.*``, as safetensors or ``torch.save`` state-dict shards with an index
  json (or one file without it);
* a slow-tokenizer save: ``tokenizer.model`` (a SentencePiece BPE model with byte fallback, trained
  here on a small corpus, like Llama's), ``tokenizer_config.json``, ``special_tokens_map.json`` and
  ``added_tokens.json`` with the pad token LLaVA's v0 training adds (``[PAD]``, one extra row).

Sizes: CLIP tower 32x32 images in 8x8 patches (16 patch tokens, width 32), Llama hidden 64, 2 layers.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Optional

import torch

from .vocab import COMMON_WORDS

HIDDEN = 64
TOWER_HIDDEN = 32
IMAGE_SIZE = 32
PATCH_SIZE = 8
PAD_TOKEN = "[PAD]"
TOWER_ID = "openai/clip-vit-large-patch14-336"  # what the released LLaVA-1.5 configs name

# Extra lines so the tokenizer has pieces for the conversation formats and for non-ASCII text.
_CORPUS_EXTRA = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions.",
    "###Human: ###Assistant: USER: ASSISTANT: </s>",
    "naïve café crème brûlée, Zürich, 東京の猫, Ελληνικά, ünïcödé 🙂 — “quotes” and ‘ticks’",
    "1234567890 + - * / = ( ) [ ] { } < > # @ & % $ !",
)


def train_tiny_sentencepiece(out_file: str | Path, extra: Iterable[str] = (), vocab_size: int = 600) -> Path:
    """Train a Llama-style SentencePiece BPE model (byte fallback, split digits, dummy prefix,
    whitespace kept as is) on a small built-in corpus; writes ``tokenizer.model``."""
    import sentencepiece as spm

    from ..encoders.templates import templates

    lines = [" ".join(COMMON_WORDS), *_CORPUS_EXTRA, *templates("img-v1"), *extra]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines * 4), model_writer=model, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, split_digits=True, add_dummy_prefix=True, remove_extra_whitespaces=False,
        normalization_rule_name="identity", allow_whitespace_only_pieces=True, character_coverage=1.0,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, hard_vocab_limit=False, num_threads=1, minloglevel=2,
    )
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    out_file.write_bytes(model.getvalue())
    return out_file


def _sp_size(model_file: Path) -> int:
    import sentencepiece as spm

    return int(spm.SentencePieceProcessor(model_file=str(model_file)).get_piece_size())


def write_original_tokenizer(out_dir: Path, extra_corpus: Iterable[str] = ()) -> int:
    """The slow-tokenizer files of a LLaVA v0 checkpoint; returns the vocabulary size with [PAD]."""
    model_file = train_tiny_sentencepiece(out_dir / "tokenizer.model", extra_corpus)
    size = _sp_size(model_file)

    def token(text: str) -> dict:
        return {"__type": "AddedToken", "content": text, "lstrip": False, "normalized": False,
                "rstrip": False, "single_word": False}

    (out_dir / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": True, "add_eos_token": False, "bos_token": token("<s>"), "eos_token": token("</s>"),
        "unk_token": token("<unk>"), "pad_token": None, "clean_up_tokenization_spaces": False, "legacy": False,
        "model_max_length": 2048, "padding_side": "right", "sp_model_kwargs": {}, "tokenizer_class": "LlamaTokenizer",
    }, indent=2))
    (out_dir / "special_tokens_map.json").write_text(json.dumps({
        "bos_token": token("<s>"), "eos_token": token("</s>"), "unk_token": token("<unk>"), "pad_token": PAD_TOKEN,
    }, indent=2))
    (out_dir / "added_tokens.json").write_text(json.dumps({PAD_TOKEN: size}))
    return size + 1


def build_tiny_clip_tower(out_dir: str | Path, seed: int = 0) -> Path:
    """A ``CLIPVisionModel`` folder + ``CLIPImageProcessor`` (stand-in for the CLIP ViT-L/14-336 tower)."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    config = CLIPVisionConfig(hidden_size=TOWER_HIDDEN, intermediate_size=64, num_hidden_layers=3,
                              num_attention_heads=2, image_size=IMAGE_SIZE, patch_size=PATCH_SIZE,
                              projection_dim=TOWER_HIDDEN, hidden_act="quick_gelu")
    model = CLIPVisionModel(config).eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE}, crop_size=IMAGE_SIZE).save_pretrained(out_dir)
    return out_dir


def original_config(vocab_size: int, vision_tower: str) -> dict:
    """``config.json`` as LLaVA-1.5's training code writes it (model_type ``llava``, Llama fields)."""
    return {
        "_name_or_path": "./checkpoints/vicuna-tiny", "architectures": ["LlavaLlamaForCausalLM"],
        "model_type": "llava", "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "hidden_act": "silu",
        "hidden_size": HIDDEN, "intermediate_size": 128, "initializer_range": 0.02, "max_length": 4096,
        "max_position_embeddings": 512, "num_attention_heads": 4, "num_hidden_layers": 2, "num_key_value_heads": 4,
        "pretraining_tp": 1, "rms_norm_eps": 1e-5, "rope_scaling": None, "tie_word_embeddings": False,
        "torch_dtype": "float32", "transformers_version": "4.31.0", "use_cache": True, "vocab_size": vocab_size,
        "freeze_mm_mlp_adapter": False, "image_aspect_ratio": "pad", "image_grid_pinpoints": None,
        "mm_hidden_size": TOWER_HIDDEN, "mm_projector_type": "mlp2x_gelu", "mm_resampler_type": None,
        "mm_use_im_patch_token": False, "mm_use_im_start_end": False, "mm_vision_select_feature": "patch",
        "mm_vision_select_layer": -2, "mm_vision_tower": vision_tower, "tune_mm_mlp_adapter": False,
        "tune_mm_vision_resampler": False, "unfreeze_mm_vision_tower": False, "use_mm_proj": True,
        # LLaVA's training writes these two; the first is where its forward cuts long inputs
        "tokenizer_model_max_length": 256, "tokenizer_padding_side": "right",
    }


def original_state_dict(config: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights under the original names (``LlavaLlamaForCausalLM.state_dict()`` without tower)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    llama = LlamaForCausalLM(LlamaConfig(
        vocab_size=config["vocab_size"], hidden_size=config["hidden_size"],
        intermediate_size=config["intermediate_size"], num_hidden_layers=config["num_hidden_layers"],
        num_attention_heads=config["num_attention_heads"], num_key_value_heads=config["num_key_value_heads"],
        max_position_embeddings=config["max_position_embeddings"], rms_norm_eps=config["rms_norm_eps"],
        tie_word_embeddings=False))
    state = {k: v.detach().clone().contiguous() for k, v in llama.state_dict().items()}
    # RMSNorm weights start at one; make them random so a misplaced norm cannot go unnoticed.
    for key in state:
        if key.endswith("norm.weight"):
            state[key] = 1.0 + 0.1 * torch.randn_like(state[key])
    hidden, mm_hidden = config["hidden_size"], config["mm_hidden_size"]
    state["model.mm_projector.0.weight"] = torch.randn(hidden, mm_hidden) / mm_hidden**0.5
    state["model.mm_projector.0.bias"] = 0.1 * torch.randn(hidden)
    state["model.mm_projector.2.weight"] = torch.randn(hidden, hidden) / hidden**0.5
    state["model.mm_projector.2.bias"] = 0.1 * torch.randn(hidden)
    return state


def write_state_dict(out_dir: Path, state: dict[str, torch.Tensor], weights: str = "safetensors",
                     shards: int = 2) -> list[Path]:
    """Write ``state`` as LLaVA checkpoints are stored: ``shards`` files + an index json (one file,
    no index, when ``shards == 1``). ``weights``: ``safetensors`` or ``bin`` (``torch.save``)."""
    from safetensors.torch import save_file

    keys = list(state)
    if weights == "safetensors":
        stem, ext, index_name = "model", "safetensors", "model.safetensors.index.json"
    elif weights == "bin":
        stem, ext, index_name = "pytorch_model", "bin", "pytorch_model.bin.index.json"
    else:
        raise ValueError(f"weights must be 'safetensors' or 'bin', got {weights!r}")
    groups = [keys[i::shards] for i in range(shards)]
    names = [f"{stem}.{ext}"] if shards == 1 else [f"{stem}-{i + 1:05d}-of-{shards:05d}.{ext}" for i in range(shards)]
    paths = []
    for name, group in zip(names, groups, strict=True):
        part = {k: state[k] for k in group}
        if ext == "safetensors":
            save_file(part, str(out_dir / name), metadata={"format": "pt"})
        else:
            torch.save(part, out_dir / name)
        paths.append(out_dir / name)
    if shards > 1:
        total = sum(t.numel() * t.element_size() for t in state.values())
        weight_map = {k: n for n, g in zip(names, groups, strict=True) for k in g}
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out_dir / index_name).write_text(json.dumps(index, indent=2))
    return paths


def build_tiny_llava_original(out_dir: str | Path, tower_dir: Optional[str | Path] = None, *,
                              weights: str = "safetensors", shards: int = 2, vision_tower_id: Optional[str] = None,
                              seed: int = 0) -> Path:
    """Write a tiny original-format LLaVA folder. ``mm_vision_tower`` is ``vision_tower_id`` if given,
    else the local ``tower_dir`` (as LLaVA's own configs name a local tower path or a hub id)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab_size = write_original_tokenizer(out_dir)
    config = original_config(vocab_size, vision_tower_id or str(tower_dir or TOWER_ID))
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    write_state_dict(out_dir, original_state_dict(config, seed), weights=weights, shards=shards)
    return out_dir
