"""Locating and loading evaluation models with one clear error when they are missing.

Nothing can be downloaded on an offline cluster node, so a model is either a local directory
(``path``) or a Hugging Face id already in the HF cache (``HF_HOME``). Library errors for a missing
model are deep stack traces; :class:`ModelNotFoundError` replaces them with what to do.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Optional, TypeVar

import torch

T = TypeVar("T")


class ModelNotFoundError(FileNotFoundError):
    """A model that is neither a local path nor in the Hugging Face cache."""


def hf_home() -> str:
    return os.environ.get("HF_HOME", str(Path.home() / ".cache" / "huggingface"))


def missing_model_message(what: str, model_id: str, key: str) -> str:
    return (
        f"{what} '{model_id}' was not found: it is not a local directory and not in the Hugging Face "
        f"cache ({hf_home()}). Either download it where there is internet "
        f"(`huggingface-cli download {model_id}`) and point HF_HOME at that cache, or set "
        f"{key}=/path/to/local/copy."
    )


def from_pretrained(
    loader: Callable[..., T], what: str, model_id: str, path: Optional[str], key: str, **kwargs: Any
) -> T:
    """``loader(path or model_id, **kwargs)`` with a clear error when the model is not available."""
    source = path or model_id
    if path is not None and not Path(path).exists():
        raise ModelNotFoundError(f"{what}: local path {path} does not exist (set by {key})")
    try:
        return loader(source, **kwargs)
    except (OSError, ValueError) as err:
        text = str(err)
        not_found = isinstance(err, OSError) or "does not appear to have" in text or "not found" in text.lower()
        if not_found and path is None:
            raise ModelNotFoundError(missing_model_message(what, model_id, key)) from None
        raise


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """Half precision only on GPU: CPU kernels for fp16 are slow or missing."""
    table = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if dtype not in table:
        raise ValueError(f"unknown dtype '{dtype}'; choose one of {sorted(table)}")
    if device.type == "cpu":
        return torch.float32
    return table[dtype]
