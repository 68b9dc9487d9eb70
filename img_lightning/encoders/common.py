"""What every encoder needs: finding model files without surprises, device and dtype choice.

Models are never downloaded implicitly: a SLURM array of 64 tasks must not start 64 downloads of
a 26 GB model, and an air-gapped cluster must fail fast. A model is either a local directory
(``*.path`` in the config) or a Hugging Face id already in the local cache (``HF_HOME``); anything
else is one :class:`ModelNotFoundError` that says how to provide it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import torch

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class ModelNotFoundError(FileNotFoundError):
    """A configured model cannot be found locally; the message names it and how to provide it."""


def _hf_home() -> str:
    return os.environ.get("HF_HOME") or str(Path.home() / ".cache" / "huggingface")


def resolve_model_root(model_id: str, path: Optional[str], revision: Optional[str], config_key: str) -> Path:
    """Local directory standing for ``model_id`` (an HF repo root or a plain model folder).

    ``path`` (a local override) wins; otherwise the id must be a local directory or be in the
    Hugging Face cache. ``config_key`` is the dotted config key users set to point at a local copy.
    """
    if path:
        root = Path(path).expanduser()
        if not root.exists():
            raise ModelNotFoundError(
                f"{config_key}={path!r} does not exist: point it at a local copy of {model_id!r}."
            )
        return root
    if Path(model_id).expanduser().is_dir():
        return Path(model_id).expanduser()
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model_id, revision=revision, local_files_only=True))
    except Exception:  # noqa: BLE001 - every failure here means "not available locally"
        rev = f" (revision {revision})" if revision else ""
        raise ModelNotFoundError(
            f"model {model_id!r}{rev} is not in the local Hugging Face cache (HF_HOME={_hf_home()}). "
            f"Download it once (`hf download {model_id}`), or set {config_key}=/path/to/local/copy."
        ) from None


def find_in(root: Path, subfolder: str, name: str, model_id: str, config_key: str) -> Path:
    """``root/subfolder/name``, or ``root/name`` when ``root`` already is the subfolder."""
    for candidate in (root / subfolder / name if subfolder else root / name, root / name):
        if candidate.exists():
            return candidate
    where = f"{root}/{subfolder}" if subfolder else str(root)
    raise ModelNotFoundError(
        f"{name!r} not found under {where} (model {model_id!r}); the download is incomplete or "
        f"{config_key} points at the wrong folder."
    )


def model_dir(root: Path, subfolder: str, model_id: str, config_key: str) -> Path:
    """The folder holding ``config.json`` of a sub-model (``root/subfolder`` or ``root`` itself)."""
    return find_in(root, subfolder, "config.json", model_id, config_key).parent


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; use one of {sorted(DTYPES)}")
    return DTYPES[name]
