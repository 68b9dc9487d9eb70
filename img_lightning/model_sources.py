"""How to get a model that is not here: the command that fetches it, for the error that says it is missing.

``hf download REPO`` takes a repository id (``owner/name``), then the files of it to fetch, or
``--include PATTERN`` (one pattern per ``--include``). Our model ids are not always repository ids:

- ``owner/name/folder`` (the released IMG MLLM is ``shi-labs/IMG/llava``) names a folder of a
  repository: it is fetched with ``--include 'folder/*'`` into a local directory, and that folder is
  what the config's ``*.path`` key must name (the Hugging Face cache cannot stand for such an id);
- the released IMG MLLM is in the original LLaVA repository's format: it is converted once with
  ``img-convert-llava`` (which reads its CLIP tower, ``openai/clip-vit-large-patch14-336``, from the
  cache) before it loads.

Every command here is checked against the installed ``hf`` command line (tests/test_models.py).
Imports nothing heavy: config loading uses it to say where a key left ``???`` gets its value.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from typing import Optional

RELEASED_MLLM = "shi-labs/IMG/llava"
RELEASED_MLLM_TOWER = "openai/clip-vit-large-patch14-336"
MODELS_DIR = "/models"  # where the commands put what must live in a local directory


def hf_download(repo: str, files: Sequence[str] = (), include: Sequence[str] = (), revision: Optional[str] = None,
                local_dir: Optional[str] = None) -> str:
    """The ``hf download`` command line (shell-quoted)."""
    parts = ["hf", "download", repo, *files]
    for pattern in include:
        parts += ["--include", pattern]
    if revision:
        parts += ["--revision", revision]
    if local_dir:
        parts += ["--local-dir", local_dir]
    return " ".join(shlex.quote(p) for p in parts)


def split_model_id(model_id: str) -> tuple[str, str]:
    """``owner/name/folder...`` -> (``owner/name``, ``folder...``); a repository id -> (it, "")."""
    parts = model_id.strip("/").split("/")
    return "/".join(parts[:2]), "/".join(parts[2:])


def released_mllm_steps(key: str) -> str:
    local = f"{MODELS_DIR}/IMG"
    return (f"the released IMG MLLM is the llava/ folder of shi-labs/IMG, in the original LLaVA format; where "
            f"there is internet: `{hf_download('shi-labs/IMG', include=['llava/*'], local_dir=local)}` and its "
            f"vision tower `{hf_download(RELEASED_MLLM_TOWER)}`, then convert it once: "
            f"`img-convert-llava {local}/llava {local}/llava-hf`, and set {key}={local}/llava-hf")


def fetch_advice(model_id: str, key: str, revision: Optional[str] = None, subfolder: str = "",
                 files: Sequence[str] = ()) -> str:
    """What to run, and what to set, to have ``model_id`` (``files`` of it, or its ``subfolder``)
    where ``key`` finds it."""
    if model_id == RELEASED_MLLM:
        return released_mllm_steps(key)
    repo, folder = split_model_id(model_id)
    if folder:
        local = f"{MODELS_DIR}/{repo.split('/')[-1]}"
        command = hf_download(repo, include=[f"{folder}/*"], revision=revision, local_dir=local)
        return (f"{model_id!r} is the folder {folder}/ of the Hugging Face repository {repo}: download it once where "
                f"there is internet with `{command}`, then set {key}={local}/{folder}")
    include = [] if files or not subfolder else [f"{subfolder.strip('/')}/*"]
    command = hf_download(repo, files=files, include=include, revision=revision)
    return (f"download it once where there is internet, into the Hugging Face cache (HF_HOME), with `{command}`; "
            f"or set {key}=/path/to/a/local/copy")


def checkpoint_advice(repo: str, filename: str, key: str, also: Sequence[str] = ()) -> str:
    """A checkpoint file of a repository (and the files ``also`` read beside it), for a key that
    takes a file path."""
    local = f"{MODELS_DIR}/{repo.split('/')[-1]}"
    command = hf_download(repo, files=[filename, *also], local_dir=local)
    return f"download it once where there is internet with `{command}` and set {key}={local}/{filename}"
