"""Typed schema of ``img-train`` configs (``configs/train/*.yaml``).

Defaults are the paper's SDXL recipe (README "Full recipe"): LLaVA-1.5-13B guidance (5120),
aligner dim 2048, depth 4, 20 heads of 64, AdamW 1e-4 / wd 1e-4 constant, lambda 1, k = 10, batch 8
per GPU, 100K steps.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from .checks import at_least, betas, between, non_negative, one_of, optional, positive, steps_limit
from .choices import Choice


class Reduction(Choice):
    mean = "mean"  # ||.||^2 averaged over each sample's elements (see docs/method.md)
    sum = "sum"  # summed: eq. 5 literally with unit-variance Gaussians


class ReferenceInit(Choice):
    random = "random"  # an independent random initialisation (the paper)
    copy = "copy"  # a copy of f_theta


class FiniteCheck(Choice):
    auto = "auto"  # on the device when training on a GPU, else on the reader thread
    reader = "reader"  # each sample on the reader thread, right after its read; bad ones dropped
    device = "device"  # per-sample isfinite after the host-to-device copy; bad ones masked out of the loss


class Schedule(Choice):
    constant = "constant"  # the paper
    cosine = "cosine"


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
    # beta = 1 / (2 sigma^2) of the Gaussian likelihood; see docs/method.md for how it
    # interacts with `reduction` (mean over the 16x2048 elements vs their sum).
    beta: float = 1.0
    reduction: Reduction = Reduction.mean


@dataclass
class ReferenceConfig:
    init: ReferenceInit = ReferenceInit.random
    patience: int = 10  # k: consecutive optimizer steps f_theta must beat f_ref before a swap
    seed: int = 1234  # seed of the independent random initialisation of f_ref


@dataclass
class OptimConfig:
    lr: float = 1e-4
    weight_decay: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    schedule: Schedule = Schedule.constant
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0  # cosine floor as a fraction of lr
    grad_clip: Optional[float] = None  # max global grad norm; the paper does not clip
    # A gradient with NaN/Inf stops the run with an error naming the step and the samples. Set N > 0
    # to skip up to N such optimizer steps instead (weights left unchanged, counted in
    # train/skipped_steps and in the checkpoint); the (N+1)-th still stops the run.
    skip_nonfinite: int = 0


@dataclass
class DataConfig:
    cache: str = "???"  # directory holding manifest.json and the shards
    val_cache: Optional[str] = None  # separate validation cache (same recipe)
    val_fraction: float = 0.0  # or: hold out this fraction of `cache` for validation
    val_split_seed: int = 0
    # The cache must have been made by this preprocessing recipe (a configs/preprocess YAML) or
    # carry exactly this key; training refuses anything else.
    recipe: Optional[str] = None
    # key=value overrides applied to the recipe YAML before its key is computed, for what the
    # recipe leaves to the user (e.g. ["encoders.mllm.questions=/models/IMG/edit_instructions.json"]:
    # the question file's sha256 is part of the key).
    recipe_overrides: list[str] = field(default_factory=list)
    cache_key: Optional[str] = None
    batch_size: int = 8  # per GPU
    val_batch_size: Optional[int] = None
    num_workers: int = 4  # reader threads (see data/loader.py); 0 reads inline
    prefetch_factor: int = 2  # batches in flight per reader thread
    pin_memory: bool = True  # read straight into pinned memory when training on a GPU
    seed: int = 0  # shuffle seed; the permutation of epoch e uses (seed, e)
    # Shards whose size differs from the manifest are skipped; samples that fail to decode or hold
    # NaN/Inf are dropped from their batch (and named in the log). Above this fraction of the data
    # the run stops: skipped shards plus the share of bad samples among those the run reads, over all
    # ranks (docs/training.md, "The bad-sample limit").
    max_bad_fraction: float = 0.01
    # Where each sample is checked for NaN/Inf (docs/performance.md, "Safety off the reader thread"):
    # `reader` costs a reader thread ~30 % of its page-cache throughput; `device` runs one isfinite
    # reduction over the batch on the GPU after the copy and masks bad samples out of the loss.
    # Both count bad samples against max_bad_fraction and name them in the log. `auto`: device on a GPU.
    finite_check: FiniteCheck = FiniteCheck.auto
    # sha256 every shard at start-up, on every rank: a full extra read of the cache at one core's
    # hashing speed (docs/performance.md). Off: the loader's per-sample checks catch what would
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
    # Keys whose value may differ from the run's saved config.yaml when it resumes (see
    # RESUME_FREE_KEYS for the ones that always may); each use is recorded in the run directory.
    allow_config_change: list[str] = field(default_factory=list)
    # torch intra-op threads per process (None: torch's default, one per core). On a shared or small
    # CPU box use 1 or 2: OpenMP threads waiting on a descheduled sibling make tiny steps ~10x slower.
    torch_threads: Optional[int] = None


@dataclass
class TrainConfig:
    model: AlignerConfig = field(default_factory=AlignerConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    run: RunConfig = field(default_factory=RunConfig)


# Keys that may differ when a run resumes: they change where or how fast it runs, or how it
# reports, never which samples it sees or how its weights are updated. Every other key must equal
# the run's saved config.yaml unless listed in run.allow_config_change.
RESUME_FREE_KEYS = frozenset({
    "run.ckpt_path", "run.allow_config_change", "run.export", "run.torch_threads",
    "data.num_workers", "data.prefetch_factor", "data.pin_memory", "data.max_open_shards",
    "data.verify_checksums", "data.finite_check", "optim.skip_nonfinite",
    "trainer.accelerator", "trainer.strategy", "trainer.enable_progress_bar",
    "trainer.log_every_n_steps", "trainer.checkpoint_every_n_steps", "trainer.val_check_interval",
    # Extending a run is normal; with a cosine schedule it changes the lr curve (see resume check).
    "trainer.max_steps", "trainer.max_epochs",
})


TrainConfig.CHECKS = {  # type: ignore[attr-defined]  # value ranges, checked at load (config/checks.py)
    **{f"model.{k}": at_least(1) for k in ("guidance_dim", "dim", "depth", "heads", "dim_head", "ff_mult",
                                             "num_tokens", "passes")},
    "objective.lambda_pref": non_negative,
    "objective.beta": positive,
    "reference.patience": at_least(1),
    "optim.lr": positive,
    "optim.weight_decay": non_negative,
    "optim.eps": positive,
    "optim.betas": betas,
    "optim.warmup_steps": non_negative,
    "optim.min_lr_ratio": between(0.0, 1.0),
    "optim.grad_clip": optional(positive),
    "optim.skip_nonfinite": non_negative,
    "data.batch_size": at_least(1),
    "data.val_batch_size": optional(at_least(1)),
    "data.val_fraction": between(0.0, 1.0, high_open=True),
    "data.num_workers": non_negative,
    "data.prefetch_factor": at_least(1),
    "data.max_bad_fraction": between(0.0, 1.0),
    "data.max_open_shards": at_least(1),
    "trainer.max_steps": steps_limit,
    "trainer.max_epochs": steps_limit,
    "trainer.num_nodes": at_least(1),
    "trainer.precision": one_of("32", "32-true", "bf16-mixed", "bf16-true", "16-mixed"),
    "trainer.accumulate_grad_batches": at_least(1),
    "trainer.log_every_n_steps": at_least(1),
    "trainer.val_check_interval": at_least(1),
    "trainer.limit_val_batches": between(0.0, float("inf")),
    "trainer.checkpoint_every_n_steps": at_least(1),
    "run.torch_threads": optional(at_least(1)),
}
