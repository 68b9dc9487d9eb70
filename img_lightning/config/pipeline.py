"""Typed schema of ``img-submit`` recipes (``configs/pipeline/*.yaml``): the whole paper as SLURM jobs.

One recipe names each stage's own config (the very files ``img-finetune-mllm``, ``img-preprocess``,
``img-train`` and ``img-eval`` take) plus what a stage needs from the ones before it, which
``img-submit`` fills in: the MLLM folder for preprocessing and evaluation, the cache for training,
the aligner for evaluation. Everything is written under ``root``::

    ROOT/runs/finetune/export   the finetuned MLLM (mllm.source: finetune)
    ROOT/mllm-hf                the converted released MLLM (mllm.source: convert)
    ROOT/cache                  the feature cache (manifest.json, verify.json)
    ROOT/runs/train/export      the aligner (aligner.pth, official layout)
    ROOT/eval/report            the evaluation report (index.html)
    ROOT/logs                   every job's log

``sbatch`` lists are sbatch options (``--partition=gpu``, ``--time=12:00:00``,
``--gpus-per-node=0`` on a CPU node); ``final_sbatch`` are those of the dependent job of
preprocessing (manifest + verify) and evaluation (report).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from .choices import Choice


class MLLMSource(Choice):
    finetune = "finetune"  # img-finetune-mllm on edit triplets (the paper's MLLM stage)
    convert = "convert"  # img-convert-llava of a released checkpoint in the original LLaVA format
    path = "path"  # an MLLM folder that is ready (llava-hf, Qwen2.5-VL, an earlier export)


@dataclass
class MLLMStageConfig:
    source: MLLMSource = MLLMSource.finetune
    # finetune: the configs/finetune_mllm YAML, the edit triplets (DATA), key=value overrides
    config: str = "configs/finetune_mllm/llava13b_full.yaml"
    data: Optional[str] = None
    overrides: list[str] = field(default_factory=list)
    # convert: the original LLaVA folder (the llava/ folder of shi-labs/IMG) and img-convert-llava's options
    convert_from: Optional[str] = None
    convert_args: list[str] = field(default_factory=list)
    # path: the folder to use as it is
    path: Optional[str] = None
    sbatch: list[str] = field(default_factory=list)


@dataclass
class PreprocessStageConfig:
    config: str = "configs/preprocess/sdxl_llava13b.yaml"
    input: str = "???"  # the Pick-a-Pic parquet files (data.input)
    # key=value overrides; the encoders.* ones also go to training (data.recipe_overrides) and
    # evaluation, so all three read the MLLM and the IP encoder the same way
    overrides: list[str] = field(default_factory=list)
    sbatch: list[str] = field(default_factory=list)  # of the array (e.g. --array=0-31)
    final_sbatch: list[str] = field(default_factory=list)


@dataclass
class TrainStageConfig:
    config: str = "configs/train/sdxl_llava13b.yaml"
    overrides: list[str] = field(default_factory=list)
    sbatch: list[str] = field(default_factory=list)


@dataclass
class EvalStageConfig:
    enabled: bool = True
    configs: list[str] = field(default_factory=lambda: ["configs/eval/backbones/sdxl.yaml",
                                                         "configs/eval/benchmarks/partiprompts.yaml"])
    overrides: list[str] = field(default_factory=list)
    sbatch: list[str] = field(default_factory=list)  # of the array (e.g. --array=0-15)
    final_sbatch: list[str] = field(default_factory=list)


@dataclass
class PipelineConfig:
    name: str = "img"  # the jobs are called NAME-mllm, NAME-preprocess, ...
    root: str = "???"
    sbatch: list[str] = field(default_factory=list)  # options of every job (account, partition, qos)
    mllm: MLLMStageConfig = field(default_factory=MLLMStageConfig)
    preprocess: PreprocessStageConfig = field(default_factory=PreprocessStageConfig)
    train: TrainStageConfig = field(default_factory=TrainStageConfig)
    eval: EvalStageConfig = field(default_factory=EvalStageConfig)
