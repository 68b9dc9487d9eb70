"""Finding pretrained models without surprises, and choosing their device and dtype.

Models are never downloaded implicitly: a SLURM array of 64 tasks must not start 64 downloads of a
26 GB model, and an air-gapped cluster must fail fast. A model is either a local directory (a
``*.path`` key in the config) or a Hugging Face id already in the local cache (``HF_HOME``);
anything else is one :class:`ModelNotFoundError` that names the model and how to provide it,
instead of a deep stack trace from inside a library. Encoders (preprocessing and evaluation) and
scorers all go through here.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Optional, TypeVar

import torch

from .errors import UserError

T = TypeVar("T")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class ModelNotFoundError(UserError, FileNotFoundError):
    """A configured model cannot be found locally; the message names it and how to provide it."""


def hf_home() -> str:
    return os.environ.get("HF_HOME") or str(Path.home() / ".cache" / "huggingface")


def missing_model_message(what: str, model_id: str, key: str, revision: Optional[str] = None, subfolder: str = "",
                          files: Sequence[str] = ()) -> str:
    """The error for a model that is not here, with a command that fetches it (:mod:`.model_sources`)."""
    from .model_sources import fetch_advice

    rev = f" (revision {revision})" if revision else ""
    return (f"{what} {model_id!r}{rev} is neither a local directory nor in the local Hugging Face cache "
            f"(HF_HOME={hf_home()}): {fetch_advice(model_id, key, revision, subfolder, files)}.")


def resolve_model_root(model_id: str, path: Optional[str], revision: Optional[str], config_key: str) -> Path:
    """Local directory standing for ``model_id`` (an HF repo root or a plain model folder).

    ``path`` (a local override) wins; otherwise the id must be a local directory or be in the
    Hugging Face cache. ``config_key`` is the dotted config key users set to point at a local copy.
    """
    if path:
        root = Path(path).expanduser()
        if not root.exists():
            raise ModelNotFoundError(f"{config_key}={path!r} does not exist: point it at a local copy of {model_id!r}.")
        return root
    if Path(model_id).expanduser().is_dir():
        return Path(model_id).expanduser()
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model_id, revision=revision, local_files_only=True))
    except Exception:  # noqa: BLE001 - every failure here means "not available locally"
        raise ModelNotFoundError(missing_model_message("model", model_id, config_key, revision)) from None


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


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")


def check_model(what: str, model_id: Optional[str], path: Optional[str], key: str, *, revision: Optional[str] = None,
                subfolder: str = "", marker: Optional[str] = "config.json", weights: bool = True,
                files: Sequence[str] = ()) -> Path:
    """Is ``what`` there? The cheap check before a long run: nothing is loaded.

    The local ``path`` must exist, else ``model_id`` must be a local directory or be in the local
    Hugging Face cache (never the network), as for :func:`from_pretrained`. With ``marker``, the
    folder (``subfolder`` of it, or itself) must hold that file, and with ``weights`` a weights file
    beside it (a download of the configs alone is not a model). Returns that folder, or the root
    when there is no marker; raises :class:`ModelNotFoundError` naming ``key`` and the command that
    fetches the model (``files`` of it when it is not needed whole).
    """
    if path:
        root = Path(path).expanduser()
        if not root.exists():
            raise ModelNotFoundError(f"{what}: local path {path} does not exist (set by {key})")
    elif model_id and Path(model_id).expanduser().is_dir():
        root = Path(model_id).expanduser()
    else:
        try:
            from huggingface_hub import snapshot_download

            root = Path(snapshot_download(model_id or "", revision=revision, local_files_only=True))
        except Exception:  # noqa: BLE001 - every failure here means "not available locally"
            raise ModelNotFoundError(missing_model_message(what, model_id or "", key, revision, subfolder,
                                                           files)) from None
    if marker is None:
        return root
    folder = find_in(root, subfolder, marker, model_id or str(root), key).parent
    if weights and not any(p.name.endswith(WEIGHT_SUFFIXES) or p.name.endswith(".index.json")
                           for p in folder.iterdir()):
        raise ModelNotFoundError(f"{what} {model_id!r}: {folder} has {marker} but no weights file "
                                 f"({', '.join('*' + s for s in WEIGHT_SUFFIXES)}); the download is incomplete "
                                 f"or {key} points at the wrong folder.")
    return folder


def model_dir(root: Path, subfolder: str, model_id: str, config_key: str) -> Path:
    """The folder holding ``config.json`` of a sub-model (``root/subfolder`` or ``root`` itself)."""
    return find_in(root, subfolder, "config.json", model_id, config_key).parent


def from_pretrained(
    loader: Callable[..., T], what: str, model_id: str, path: Optional[str], key: str, **kwargs: Any
) -> T:
    """``loader(path or model_id, **kwargs)`` with a clear error when the model is not available.

    Always ``local_files_only``: a cluster node without internet must fail at once with our
    message, not after the hub client's retries and timeouts.
    """
    if path is not None and not Path(path).exists():
        raise ModelNotFoundError(f"{what}: local path {path} does not exist (set by {key})")
    try:
        return loader(path or model_id, local_files_only=True, **kwargs)
    except (OSError, ValueError) as err:
        text = str(err)
        not_found = isinstance(err, OSError) or "does not appear to have" in text or "not found" in text.lower()
        if not_found and path is None:
            raise ModelNotFoundError(missing_model_message(what, model_id, key)) from None
        raise


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; use one of {sorted(DTYPES)}")
    return DTYPES[name]


def compute_dtype(name: str, device: torch.device) -> torch.dtype:
    """``name`` on GPU; float32 on CPU, where half-precision kernels are slow or missing."""
    dtype = resolve_dtype(name)
    return torch.float32 if device.type == "cpu" else dtype
