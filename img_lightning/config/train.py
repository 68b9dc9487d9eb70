"""Typed schema of ``img-train`` configs (``configs/train/*.yaml``).

Defaults are the paper's SDXL recipe: LLaVA-1.5-13B guidance (5120), aligner dim 2048,
depth 4, 20 heads of 64, AdamW 1e-4 / wd 1e-4 constant, lambda 1, k = 10, batch 8 per GPU,
100K steps.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass
class AlignerConfig:
    guidance_dim: int = 5120  # hidden size of the MLLM (LLaVA-1.5-13B)
    dim: int = 2048  # IP token width (SDXL plus adapter: 2048, FLUX XLabs: 4096)
    depth: int = 4
    heads: int = 20
    dim_head: int = 64
    ff_mult: int = 4
    num_tokens: int = 16  # IP tokens per image; checked against the cache
    # Start f_theta from released weights (official .pth or our .safetensors export).
    init_from: Optional[str] = None
    # Inference passes used when the exported aligner is applied (paper: 3).
    passes: int = 3


@dataclass
class ObjectiveConfig:
    lambda_pref: float = 1.0
    # beta = 1 / (2 sigma^2) of the Gaussian likelihood; see README "Objective" for how it
    # interacts with `reduction` (mean over the 16x2048 elements vs their sum).
    beta: float = 1.0
    reduction: str = "mean"  # "mean" | "sum" over each sample's elements


@dataclass
class ReferenceConfig:
    init: str = "random"  # "random" (paper) | "copy" (start as a copy of f_theta)
    patience: int = 10  # k: consecutive optimizer steps f_theta must beat f_ref before a swap
    seed: int = 1234  # seed of the independent random initialisation of f_ref


@dataclass
class OptimConfig:
    lr: float = 1e-4
    weight_decay: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    schedule: str = "constant"  # "constant" | "cosine"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0  # cosine floor as a fraction of lr
    grad_clip: Optional[float] = None  # max global grad norm; the paper does not clip


@dataclass
class DataConfig:
    cache: str = "???"  # directory holding manifest.json and the shards
    val_cache: Optional[str] = None  # separate validation cache (same recipe)
    val_fraction: float = 0.0  # or: hold out this fraction of `cache` for validation
    val_split_seed: int = 0
    # The cache must have been made by this preprocessing recipe (a configs/preprocess YAML) or
    # carry exactly this key; training refuses anything else.
    recipe: Optional[str] = None
    cache_key: Optional[str] = None
    batch_size: int = 8  # per GPU
    val_batch_size: Optional[int] = None
    num_workers: int = 4  # reader threads (see data/loader.py); 0 reads inline
    prefetch_factor: int = 2  # batches in flight per reader thread
    pin_memory: bool = True  # read straight into pinned memory when training on a GPU
    seed: int = 0  # shuffle seed; the permutation of epoch e uses (seed, e)
    # Shards whose size differs from the manifest are skipped; samples that fail to decode or hold
    # NaN/Inf are dropped from their batch (and named in the log). Above this fraction of the data
    # the run stops.
    max_bad_fraction: float = 0.01
    # sha256 every shard at start-up, on every rank: a full extra read of the cache at one core's
    # hashing speed (README "Performance"). Off: the loader's per-sample checks catch what would
    # train silently wrong; run `img-preprocess verify --workers N` once after copying a cache.
    verify_checksums: bool = False
    max_open_shards: int = 64  # per loader worker


@dataclass
class TrainerConfig:
    max_steps: int = 100_000
    max_epochs: int = -1
    accelerator: str = "auto"
    devices: str = "auto"  # "auto", an int as a string, or a list like "[0,1]"
    num_nodes: int = 1
    strategy: str = "auto"
    precision: str = "bf16-mixed"  # "32" | "bf16-mixed" | "16-mixed"
    accumulate_grad_batches: int = 1
    log_every_n_steps: int = 50
    val_check_interval: int = 2000  # optimizer steps between validations
    limit_val_batches: float = 1.0
    checkpoint_every_n_steps: int = 1000
    deterministic: bool = False
    enable_progress_bar: bool = True


@dataclass
class RunConfig:
    root: str = "runs"
    # The run directory is {root}/{name}. It must be identical on every rank and across SLURM
    # requeues, so it never contains a timestamp; slurm/train.sbatch passes the job id.
    name: str = "img-aligner"
    seed: int = 42  # seed of f_theta's initialisation and everything not data-related
    ckpt_path: Optional[str] = None  # "last" resumes from {run_dir}/checkpoints/last.ckpt if present
    export: bool = True  # write the aligner in the official .pth layout and as safetensors at the end


@dataclass
class TrainConfig:
    model: AlignerConfig = field(default_factory=AlignerConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    run: RunConfig = field(default_factory=RunConfig)
