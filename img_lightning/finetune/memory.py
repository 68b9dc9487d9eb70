"""Expected GPU memory of the full finetune under FSDP (FULL_SHARD, bf16-mixed, activation checkpointing).

Parameter counts are exact: they come from the transformers model built on the meta device from
its config (no weights). The rest is arithmetic, term by term (bytes per GPU):

* shards: every parameter in float32 (4 B), split over the ``world`` ranks;
* gradients: float32 (4 B) for the trainable parameters, sharded;
* AdamW: two float32 states (8 B) per trainable parameter, sharded;
* gathered parameters: bf16 (2 B) copies of the units FSDP has un-sharded at once - the root unit
  (embeddings, lm_head, norm, projector, the tower's stem) plus two decoder layers (the current
  one and the prefetched next) - and the bf16 gradient of one decoder layer before its reduce-scatter;
* checkpointed activations: each decoder layer keeps only its input, ``batch x seq x hidden`` in
  bf16, for all layers;
* recomputation: the one decoder layer being recomputed in the backward holds its intermediate
  activations and their gradients: ``2 x (6 x B S H + 4 x B S I) x 2 B`` (q, k, v, attention
  output, two norms; gate, up, activation, product of the MLP; x2 for the gradients), with SDPA
  (no ``seq x seq`` matrix);
* logits: only at the answer positions (the module never computes the others), float32 plus gradient.

Not counted: the CUDA context and allocator fragmentation (a few GB), the frozen tower's forward
activations (no gradient flows there, so autograd keeps none), NCCL buffers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

GB = 1e9


@dataclass(frozen=True)
class ParameterCounts:
    total: int
    trainable: int  # projector + language model (LLaVA-1.5's finetune)
    vision: int
    projector: int
    embeddings: int  # input embeddings + lm_head
    per_layer: int  # one decoder layer
    layers: int
    hidden: int
    intermediate: int
    vocab: int

    @property
    def root_unit(self) -> int:
        """Parameters outside the auto-wrapped decoder layers and vision blocks (approximately:
        the tower's stem is small and counted with the tower's blocks)."""
        return self.total - self.per_layer * self.layers - self.vision


def count_parameters(model: Any) -> ParameterCounts:
    """Exact counts of a llava-hf ``LlavaForConditionalGeneration`` (meta device is fine)."""
    lm = model.model.language_model
    vision = sum(p.numel() for p in model.model.vision_tower.parameters())
    projector = sum(p.numel() for p in model.model.multi_modal_projector.parameters())
    total = sum(p.numel() for p in model.parameters())
    per_layer = sum(p.numel() for p in lm.layers[0].parameters())
    embeddings = lm.embed_tokens.weight.numel() + model.lm_head.weight.numel()
    text = model.config.text_config
    return ParameterCounts(total=total, trainable=total - vision, vision=vision, projector=projector,
                           embeddings=embeddings, per_layer=per_layer, layers=len(lm.layers),
                           hidden=int(text.hidden_size), intermediate=int(text.intermediate_size),
                           vocab=int(text.vocab_size))


def llava_1_5_13b_config() -> Any:
    """``llava-hf/llava-1.5-13b-hf``'s architecture (Vicuna-13B + CLIP ViT-L/14-336 + 2-layer MLP)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    return LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                       num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768,
                                       hidden_act="quick_gelu"),
        text_config=LlamaConfig(vocab_size=32064, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                                num_attention_heads=40, num_key_value_heads=40, max_position_embeddings=4096),
        image_token_index=32000, vision_feature_layer=-2, vision_feature_select_strategy="default",
        projector_hidden_act="gelu", image_seq_length=576,
    )


def meta_model(config: Any) -> Any:
    import torch
    from transformers import LlavaForConditionalGeneration

    with torch.device("meta"):
        return LlavaForConditionalGeneration._from_config(config)


def full_finetune_memory(counts: ParameterCounts, *, world: int = 8, batch: int = 16, seq: int = 2048,
                         answer_tokens: int = 64) -> dict[str, float]:
    """Per-GPU bytes of each term (see the module docstring), in GB, and their ``total``."""
    b, s, h, i = batch, seq, counts.hidden, counts.intermediate
    bf16, fp32 = 2, 4
    terms = {
        "parameter shards (fp32)": fp32 * counts.total / world,
        "gradient shards (fp32)": fp32 * counts.trainable / world,
        "AdamW states (2 x fp32)": 2 * fp32 * counts.trainable / world,
        "gathered units (bf16: root + 2 layers, 1 layer's grads)": bf16 * (counts.root_unit + 3 * counts.per_layer),
        "checkpointed layer inputs (bf16)": bf16 * b * s * h * counts.layers,
        "recomputed layer + its gradients (bf16)": 2 * bf16 * (6 * b * s * h + 4 * b * s * i),
        "answer logits + gradient (fp32)": 2 * fp32 * b * answer_tokens * counts.vocab,
    }
    out = {k: v / GB for k, v in terms.items()}
    out["total"] = sum(out.values())
    return out
