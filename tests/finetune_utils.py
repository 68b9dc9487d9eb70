"""Shared helpers for the MLLM finetuning tests: tiny edit-triplet data and tiny run configs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from img_lightning.config.finetune_mllm import FinetuneMLLMConfig
from img_lightning.config.loading import load_config


def tiny_finetune_overrides(data: Path, model: Path, run_root: Path, name: str, backend: str = "llava",
                            **extra: Any) -> list[str]:
    values = {
        "mllm.backend": backend,
        "mllm.model": f"img-lightning/tiny-{backend}",
        "mllm.path": str(model),
        "mllm.dtype": "float32",
        "mllm.device": "cpu",
        "mllm.prompt_format": "llava_v0" if backend == "llava" else "chat_template",
        "mllm.image_mode": "pad" if backend == "llava" else "processor",
        "data.input": str(data),
        "data.heldout_fraction": 0.15,
        "data.heldout_limit": 8,
        "data.max_length": 512,
        "data.batch_size": 4,
        "data.num_workers": 0,
        "data.shuffle_window": 2,
        "data.max_bad_fraction": 0.1,  # the tiny sets carry one corrupt image in 24-48 rows on purpose
        "finetune.gradient_checkpointing": False,
        "optim.lr": 1e-3,
        "trainer.accelerator": "cpu",
        "trainer.devices": 1,
        "trainer.precision": "32",
        "trainer.max_epochs": -1,
        "trainer.max_steps": 6,
        "trainer.log_every_n_steps": 2,
        "trainer.val_check_interval": 3,
        "trainer.checkpoint_every_n_steps": 2,
        "trainer.enable_progress_bar": False,
        "run.root": str(run_root),
        "run.name": name,
        "run.export_dtype": "float32",
        "run.torch_threads": 1,
        "eval.limit": 6,
        "eval.max_new_tokens": 6,
        "eval.batch_size": 3,
        **extra,
    }
    return [f"{k}={v}" for k, v in values.items()]


def tiny_finetune_config(data: Path, model: Path, run_root: Path, name: str, backend: str = "llava", **extra: Any):
    return load_config(FinetuneMLLMConfig, [], tiny_finetune_overrides(data, model, run_root, name, backend, **extra))
