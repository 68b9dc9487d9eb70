"""Tiny LLaVA-1.5 and Qwen2.5-VL saved as Hugging Face folders (model + processor).

Same model classes, config structure, processor classes, special tokens and chat-prompt formats as
``llava-hf/llava-1.5-{7,13}b-hf`` and ``Qwen/Qwen2.5-VL-7B-Instruct``, so
``from_pretrained`` + the processor + ``apply_chat_template`` run their real code. Language-model
hidden size is 64 for both. Differences from the real ones (unavoidable offline / for speed):

* tokenizers are tiny BPE vocabularies built from a word list (real: 32K Llama SentencePiece-BPE,
  152K Qwen byte-level BPE), so token counts of the same text differ;
* the chat templates are our own Jinja that renders the same prompt format as the released
  ``chat_template`` files (``USER: <image>\\n... ASSISTANT:`` / Qwen's ``<|im_start|>`` turns);
* LLaVA sees 32x32 images in 8x8 patches (16 image tokens; real: 336/14 -> 576); Qwen's image
  processor is pinned to 112x112 (16 merged image tokens; real: dynamic resolution).
"""

from __future__ import annotations

from pathlib import Path

import torch

from .sizes import TINY_LLAVA, LlavaSize, default_dtype
from .vocab import gpt2_vocab, sentencepiece_bpe_vocab

HIDDEN = TINY_LLAVA.text.hidden

# Renders "USER: <image>\n{question} ASSISTANT:" like the llava-hf 1.5 processors.
LLAVA_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] != 'system' -%}{{ message['role'] | upper }}: {% endif -%}"
    "{%- for part in message['content'] if part['type'] == 'image' -%}<image>\n{% endfor -%}"
    "{%- for part in message['content'] if part['type'] == 'text' -%}{{ part['text'] }} {% endfor -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}ASSISTANT:{%- endif -%}"
)

# Renders Qwen2.5-VL-Instruct's format: default system turn, vision block, then the text.
QWEN_CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] != 'system' -%}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{ '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)

QWEN_SPECIALS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|image_pad|>", "<|video_pad|>",
)


def build_tiny_llava(out_dir: str | Path, seed: int = 0, size: LlavaSize = TINY_LLAVA,
                     dtype: torch.dtype = torch.float32) -> Path:
    """``LlavaForConditionalGeneration`` + ``LlavaProcessor`` (CLIP image processor, Llama BPE).

    ``size``: :data:`~.sizes.TINY_LLAVA`, or :data:`~.sizes.REAL_WIDTH_LLAVA` (LLaVA-1.5-13B's widths
    and vocabulary, 336 px images in 14 px patches: 576 image tokens), stored in ``dtype``.
    """
    from transformers import (
        CLIPImageProcessor,
        LlamaConfig,
        LlamaTokenizer,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    from .vision import clip_vision_config

    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    vocab, merges = sentencepiece_bpe_vocab()
    tokenizer = LlamaTokenizer(vocab=vocab, merges=merges, add_bos_token=True, add_eos_token=False)
    tokenizer.add_special_tokens({"pad_token": "<pad>"})
    tokenizer.add_tokens(["<image>"], special_tokens=True)
    vision, text = size.vision, size.text
    image_processor = CLIPImageProcessor(size={"shortest_edge": vision.image_size}, crop_size=vision.image_size)
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=vision.patch,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=LLAVA_CHAT_TEMPLATE,
    )
    config = LlavaConfig(
        vision_config=clip_vision_config(vision),
        text_config=LlamaConfig(
            vocab_size=text.vocab or len(tokenizer), hidden_size=text.hidden, intermediate_size=text.intermediate,
            num_hidden_layers=text.layers, num_attention_heads=text.heads, num_key_value_heads=text.kv_heads,
            max_position_embeddings=text.max_positions,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=(vision.image_size // vision.patch) ** 2,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        pad_token_id=tokenizer.pad_token_id,
    )
    with default_dtype(dtype):
        model = LlavaForConditionalGeneration(config).eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    processor.save_pretrained(out_dir)
    return out_dir


def build_tiny_qwen2_5_vl(out_dir: str | Path, seed: int = 0) -> Path:
    """``Qwen2_5_VLForConditionalGeneration`` + ``Qwen2_5_VLProcessor`` (Qwen2-VL image/video
    processors pinned to 112x112, byte-level BPE tokenizer with Qwen's special tokens)."""
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2Tokenizer,
        Qwen2VLImageProcessor,
    )
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    vocab, merges = gpt2_vocab()
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges, unk_token=None, bos_token=None,
                               eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tokenizer.add_tokens(list(QWEN_SPECIALS), special_tokens=True)
    pixels = 112 * 112
    size = {"shortest_edge": pixels, "longest_edge": pixels}
    processor = Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(size=size),
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(size=size),
        chat_template=QWEN_CHAT_TEMPLATE,
    )
    ids = {tok: tokenizer.convert_tokens_to_ids(tok) for tok in QWEN_SPECIALS}
    config = Qwen2_5_VLConfig(
        vision_config=dict(
            depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=HIDDEN,
            patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
            fullatt_block_indexes=[1], hidden_act="silu",
        ),
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]},
            bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
        ),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    processor.save_pretrained(out_dir)
    return out_dir
