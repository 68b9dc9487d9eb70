"""Scorer checkpoints: loaded without unpickling, and fingerprinted (sha256) for the report.

Weights files are read with ``torch.load(weights_only=True)`` or safetensors only: a file that
needs pickled code is refused with one message saying so. A report that says "HPS v2.1" but was made
with another file is worse than none; the hash pins what was measured. Files in the Hugging Face
cache are symlinks to blobs named by their sha256, so those cost nothing; other files are hashed
once per score stage.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from ...config.loading import ConfigError
from ...hashing import file_sha256 as sha256_of_file
from ...models import ModelNotFoundError


class CheckpointError(ConfigError):
    """A scorer checkpoint that cannot be used as configured (refused, wrong layout, wrong version)."""

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
_BLOB = re.compile(r"[0-9a-f]{64}")


def file_sha256(path: str | Path) -> str:
    p = Path(path)
    if p.is_symlink() and _BLOB.fullmatch(p.resolve().name):
        return p.resolve().name  # HF cache blob: its name is the file's sha256
    return sha256_of_file(p)


def folder_sha256(folder: str | Path) -> Optional[str]:
    """One sha256 over the weight files of a model folder (``name:sha256`` lines, sorted by name);
    None when the folder holds no weight file (e.g. a processor-only folder)."""
    files = sorted(p for p in Path(folder).iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))
    if not files:
        return None
    lines = "".join(f"{p.name}:{file_sha256(p)}\n" for p in files)
    return hashlib.sha256(lines.encode()).hexdigest()


def model_sha256(model_id: str, path: Optional[str]) -> Optional[str]:
    """Fingerprint of a model loaded from ``path`` or from ``model_id`` (local dir or HF cache)."""
    from ...models import resolve_model_root

    try:
        root = resolve_model_root(model_id, path, None, "path")
    except ModelNotFoundError:
        return None
    return folder_sha256(root) if root.is_dir() else file_sha256(root)


def need_file(path: Optional[str], what: str, key: str, where: str = "") -> Path:
    """The file a scorer reads, checked before the run: set, and there. ``where`` says where to get it."""
    hint = f" ({where})" if where else ""
    if not path:
        raise ModelNotFoundError(f"{key}: not set; point it at the {what}{hint}")
    p = Path(path).expanduser()
    if not p.is_file():
        raise ModelNotFoundError(f"{key}={path}: no such file; it should be the {what}{hint}")
    return p


def load_state_dict_file(path: str | Path, what: str, key: str) -> dict[str, Tensor]:
    """A plain state dict from ``.safetensors`` or a torch file, never unpickling code.

    ``what`` names the file in errors, ``key`` is the config key that points at it.
    """
    p = Path(path)
    if not p.is_file():
        raise ModelNotFoundError(f"{what} not found: {p} (set {key}=PATH)")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(p))
    else:
        try:
            state = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as err:  # torch's pickle.UnpicklingError: the file holds more than tensors
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise CheckpointError(
                f"{p}: refused: loading this {what} would unpickle code ({first}). Load it once in a trusted "
                f"environment and save the plain state dict (torch.save(model.state_dict()) or safetensors)."
            ) from None
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError(f"{p}: expected a plain state dict (name -> tensor) for the {what}")
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
