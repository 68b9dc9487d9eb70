"""Typed schema of ``img-finetune-mllm`` configs (``configs/finetune_mllm/*.yaml``).

Defaults are LLaVA-1.5's visual-instruction finetuning recipe, which the IMG paper says it follows
for its MLLM stage: vision tower frozen, projector and language model trained, AdamW lr 2e-5,
cosine schedule with 3 % warm-up, weight decay 0, global batch 128, max length 2048, bf16,
gradient checkpointing, one epoch. ``finetune.method: lora`` is LLaVA-1.5's LoRA variant (r 128,
alpha 256, lr 2e-4, projector lr 2e-5).

The ``mllm`` block is the guidance encoder's own block (``encoders.mllm`` of the preprocessing
recipes: backend, model, questions, prompt_format, image_mode, ...), so the model is trained on
exactly the text, token ids and pixels it is later read with.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Optional

from .checks import at_least, betas, between, non_negative, one_of, optional, positive, steps_limit
from .choices import Choice, Dtype
from .encoders import MLLMConfig
from .node import as_node


class FinetuneMethod(Choice):
    full = "full"  # projector + language model, all weights (LLaVA-1.5's finetune; FSDP for 13B)
    lora = "lora"  # LoRA on the language model's linear layers + the full projector (DDP)


class StrategyKind(Choice):
    auto = "auto"  # Lightning's choice (one device: none; several: DDP)
    ddp = "ddp"
    fsdp = "fsdp"  # Lightning's FSDPStrategy: decoder layers auto-wrapped, sharded checkpoints


class Schedule(Choice):
    cosine = "cosine"
    constant = "constant"


class ShardingStrategy(Choice):
    FULL_SHARD = "FULL_SHARD"  # parameters, gradients and optimizer states sharded (ZeRO-3)
    SHARD_GRAD_OP = "SHARD_GRAD_OP"  # gradients and optimizer states (ZeRO-2)
    HYBRID_SHARD = "HYBRID_SHARD"  # FULL_SHARD inside a node, replicated across nodes


class StateDictType(Choice):
    sharded = "sharded"  # each rank writes its shard (torch.distributed.checkpoint directory)
    full = "full"  # rank 0 gathers one file (needs the whole model in host memory)


class EvalSource(Choice):
    heldout = "heldout"  # the held-out InstructPix2Pix triplets of `data`
    seed_data_edit = "seed_data_edit"  # a SEED-Data-Edit sample file the user gives (eval.input)


@dataclass
class FinetuneDataConfig:
    # InstructPix2Pix CLIP-filtered parquet: a file, a directory of *.parquet, or a glob. Columns
    # original_prompt, original_image {bytes, path}, edit_prompt, edited_prompt, edited_image.
    input: str = "???"
    dataset: str = "timbrooks/instructpix2pix-clip-filtered"  # identity recorded in the export manifest
    # Fixed held-out split: a triplet text (original, instruction, edited prompt) is held out when
    # sha256(salt:text) falls below this fraction; the same text is never on both sides.
    heldout_fraction: float = 0.01
    heldout_salt: str = "img-finetune-heldout-v1"
    heldout_limit: Optional[int] = 512  # held-out samples used for val/loss (None: all of them)
    limit: Optional[int] = None  # train on the first N training samples only (smoke runs)
    max_length: int = 2048  # longer samples (image tokens included) are counted and skipped
    batch_size: int = 16  # per device
    val_batch_size: Optional[int] = None
    # Global batch (batch_size x devices x nodes x accumulation). Set, it fixes the gradient
    # accumulation for the cluster at hand (it must divide exactly); None: trainer.accumulate_grad_batches.
    global_batch_size: Optional[int] = None
    # Shuffle: row groups are permuted, then samples are shuffled within windows of this many row
    # groups, so each rank reads every row group of a window once instead of one per sample.
    shuffle_window: int = 16
    row_group_cache: int = 32  # row groups (their image bytes) kept in memory per rank
    num_workers: int = 4  # threads decoding and tokenising (0: inline)
    prefetch_batches: int = 2  # batches in flight per thread
    seed: int = 0  # the permutation of epoch e uses (seed, e)
    # Corrupt images and over-long samples are dropped from their batch, counted and listed in
    # RUN/skipped/; above this fraction of the samples read the run stops.
    max_bad_fraction: float = 0.01


@dataclass
class LoraConfig:
    r: int = 128
    alpha: int = 256
    dropout: float = 0.05
    # Linear layers of the language model that get adapters (LLaVA's LoRA: every linear layer of
    # the LM, not the projector, the vision tower or lm_head).
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj",
                                                               "gate_proj", "up_proj", "down_proj"])


@dataclass
class FinetuneMethodConfig:
    method: FinetuneMethod = FinetuneMethod.full
    train_projector: bool = True  # the vision tower is always frozen (LLaVA-1.5's finetune)
    gradient_checkpointing: bool = True  # FSDP: activation checkpointing of the decoder layers
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class FinetuneOptimConfig:
    lr: float = 2e-5
    projector_lr: Optional[float] = None  # None: lr (LoRA recipe: 2e-5 with lr 2e-4)
    weight_decay: float = 0.0  # when > 0, biases and norms are not decayed
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    schedule: Schedule = Schedule.cosine  # linear warm-up, then cosine to 0 at the last step
    warmup_ratio: float = 0.03  # share of the optimizer steps
    grad_clip: Optional[float] = 1.0  # max global grad norm (HF Trainer's default, which LLaVA used)


@dataclass
class FSDPConfig:
    sharding_strategy: ShardingStrategy = ShardingStrategy.FULL_SHARD
    state_dict_type: StateDictType = StateDictType.sharded
    cpu_offload: bool = False
    limit_all_gathers: bool = True


@dataclass
class FinetuneTrainerConfig:
    max_steps: int = -1  # -1: run max_epochs
    max_epochs: int = 1
    accelerator: str = "auto"
    devices: str = "auto"
    num_nodes: int = 1
    strategy: StrategyKind = StrategyKind.auto
    precision: str = "bf16-mixed"  # trainable weights in float32, compute in bf16
    accumulate_grad_batches: int = 1
    log_every_n_steps: int = 10
    val_check_interval: int = 500  # optimizer steps between held-out losses
    limit_val_batches: float = 1.0
    checkpoint_every_n_steps: int = 200
    deterministic: bool = False
    enable_progress_bar: bool = True


@dataclass
class FinetuneRunConfig:
    root: str = "runs"
    name: str = "img-finetune-mllm"  # run directory {root}/{name}: no timestamp (ranks, requeues)
    # seed_everything at setup, LoRA's initialisation, and the dropout masks of every micro-batch
    # (re-seeded from seed, rank and the batch's data position, so a resume draws the same masks)
    seed: int = 42
    ckpt_path: Optional[str] = None  # "last": resume from the run's newest checkpoint if any
    export: bool = True  # write RUN/export (llava-hf / Qwen folder + img_finetune.json) at the end
    # dtype of the exported weights (LoRA: float32 base + update, rounded once to it). float16, as
    # LLaVA's own merge script saves: ~2 % of a 1 %-of-the-weight update lost; bfloat16 loses ~16 %
    # (its 8-bit mantissa); float32 keeps it exactly at twice the size. float16 overflows above
    # 65504: such a weight is refused, never written.
    export_dtype: Dtype = Dtype.float16
    # torch intra-op threads (None: torch's default). On a small or shared CPU box use 1: with small
    # models, OpenMP threads waiting on a descheduled sibling make each step ~10x slower.
    torch_threads: Optional[int] = None
    allow_config_change: list[str] = field(default_factory=list)


@dataclass
class JudgeConfig:
    """An LLM that says whether the model's answer and the reference instruction mean the same edit
    (the paper's yes/no consistency question), through an OpenAI-compatible chat endpoint."""

    enabled: bool = False
    endpoint: str = "http://localhost:8000/v1"  # .../v1; POST {endpoint}/chat/completions
    model: str = "gpt-4o"
    api_key_env: Optional[str] = "OPENAI_API_KEY"  # name of the environment variable holding the key
    timeout_s: float = 60.0
    max_retries: int = 3
    # {reference} and {answer} are replaced; the reply must start with yes or no.
    template: str = (
        "Two instructions for editing the same image are given.\n"
        "Instruction A: {reference}\nInstruction B: {answer}\n"
        "Are instructions A and B semantically consistent, i.e. do they ask for the same change? "
        "Answer with one word: yes or no."
    )


@dataclass
class FinetuneEvalConfig:
    source: EvalSource = EvalSource.heldout
    # SEED-Data-Edit sample (source seed_data_edit): a .jsonl / .json file, one object per case with
    # the source image, the target prompt and the reference instruction (see docs/finetune-mllm.md for the columns).
    input: Optional[str] = None
    image_root: Optional[str] = None  # relative image paths are resolved against it (default: the file's folder)
    limit: Optional[int] = 300  # cases (the paper: 300); held-out cases are a fixed hash-ordered subset
    finetuned: Optional[str] = None  # export folder (default: RUN/export)
    base: bool = True  # also answer with the base model (mllm.*), side by side
    output: Optional[str] = None  # default: RUN/eval/{source}
    max_new_tokens: int = 64
    batch_size: int = 8
    judge: JudgeConfig = field(default_factory=JudgeConfig)


@dataclass
class FinetuneMLLMConfig:
    mllm: MLLMConfig = field(default_factory=MLLMConfig)
    data: FinetuneDataConfig = field(default_factory=FinetuneDataConfig)
    finetune: FinetuneMethodConfig = field(default_factory=FinetuneMethodConfig)
    optim: FinetuneOptimConfig = field(default_factory=FinetuneOptimConfig)
    fsdp: FSDPConfig = field(default_factory=FSDPConfig)
    trainer: FinetuneTrainerConfig = field(default_factory=FinetuneTrainerConfig)
    run: FinetuneRunConfig = field(default_factory=FinetuneRunConfig)
    eval: FinetuneEvalConfig = field(default_factory=FinetuneEvalConfig)


# Keys that may differ when a run resumes: where or how fast it runs, how it reports, where the
# (same) data and base model live. The data's fingerprint is checked on resume anyway.
RESUME_FREE_KEYS = frozenset({
    "run.ckpt_path", "run.allow_config_change", "run.export", "run.export_dtype", "run.torch_threads",
    "mllm.path", "mllm.device", "mllm.batch_size", "data.input",
    "data.num_workers", "data.prefetch_batches", "data.row_group_cache",
    "trainer.accelerator", "trainer.enable_progress_bar", "trainer.log_every_n_steps",
    "trainer.checkpoint_every_n_steps", "trainer.val_check_interval", "trainer.limit_val_batches",
    "fsdp.limit_all_gathers",
})


def resume_free_keys(cfg: FinetuneMLLMConfig) -> frozenset[str]:
    """Every ``eval.*`` key too; ``max_steps``/``max_epochs`` only with a constant schedule (they
    shape the cosine curve)."""
    keys = set(RESUME_FREE_KEYS) | {f"eval.{k}" for k in _flat_keys(as_node(cfg.eval))}
    if cfg.optim.schedule == Schedule.constant:
        keys |= {"trainer.max_steps", "trainer.max_epochs"}
    return frozenset(keys)


def _flat_keys(block: Mapping[str, Any], prefix: str = "") -> list[str]:
    out: list[str] = []
    for key in block:
        value = block[key]
        if hasattr(value, "keys"):
            out += _flat_keys(value, f"{prefix}{key}.")
        else:
            out.append(f"{prefix}{key}")
    return out


FinetuneMLLMConfig.CHECKS = {  # type: ignore[attr-defined]  # value ranges, checked at load
    "mllm.backend": one_of("llava", "qwen2_5_vl"),
    "mllm.image_mode": one_of("pad", "processor"),
    "mllm.dtype": one_of("float32", "float16", "bfloat16"),
    "data.heldout_fraction": between(0.0, 1.0, high_open=True),
    "data.heldout_limit": optional(at_least(1)),
    "data.limit": optional(at_least(1)),
    "data.max_length": at_least(8),
    "data.batch_size": at_least(1),
    "data.val_batch_size": optional(at_least(1)),
    "data.global_batch_size": optional(at_least(1)),
    "data.shuffle_window": at_least(1),
    "data.row_group_cache": at_least(1),
    "data.num_workers": non_negative,
    "data.prefetch_batches": at_least(1),
    "data.max_bad_fraction": between(0.0, 1.0),
    "finetune.lora.r": at_least(1),
    "finetune.lora.alpha": positive,
    "finetune.lora.dropout": between(0.0, 1.0, high_open=True),
    "optim.lr": positive,
    "optim.projector_lr": optional(positive),
    "optim.weight_decay": non_negative,
    "optim.betas": betas,
    "optim.eps": positive,
    "optim.warmup_ratio": between(0.0, 1.0, high_open=True),
    "optim.grad_clip": optional(positive),
    "trainer.max_steps": steps_limit,
    "trainer.max_epochs": steps_limit,
    "trainer.num_nodes": at_least(1),
    "trainer.precision": one_of("32", "32-true", "bf16-mixed", "bf16-true", "16-mixed"),
    "trainer.accumulate_grad_batches": at_least(1),
    "trainer.log_every_n_steps": at_least(1),
    "trainer.val_check_interval": at_least(1),
    "trainer.limit_val_batches": between(0.0, float("inf")),
    "trainer.checkpoint_every_n_steps": at_least(1),
    "run.export_dtype": one_of("float32", "float16", "bfloat16"),
    "run.seed": non_negative,
    "run.torch_threads": optional(at_least(1)),
    "eval.limit": optional(at_least(1)),
    "eval.max_new_tokens": at_least(1),
    "eval.batch_size": at_least(1),
    "eval.judge.timeout_s": positive,
    "eval.judge.max_retries": non_negative,
}
