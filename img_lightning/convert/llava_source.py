"""Reading an original LLaVA-repository checkpoint folder without trusting it.

LLaVA's training code saves with ``transformers``' ``save_pretrained`` of its time: ``config.json``
plus the weights as safetensors (``model.safetensors`` or ``model-0000i-of-0000n.safetensors``
with ``model.safetensors.index.json``) or as ``torch.save`` state dicts (``pytorch_model.bin`` or
``pytorch_model-0000i-of-0000n.bin`` with ``pytorch_model.bin.index.json``). Pickled ``.bin``
files are read with ``torch.load(weights_only=True)`` only (tensors and plain containers, no code).
Every problem - a missing shard, an index that disagrees with its files, a file that is not a
state dict, a duplicated key, a non-finite weight - is one :class:`ConversionError`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from tqdm.auto import tqdm

from ..config.loading import ConfigError
from ..hashing import file_sha256


class ConversionError(ConfigError):
    """A source checkpoint that cannot be converted; the message names the file / key and why."""


_LAYOUTS = (  # (format, index file, single file, shard pattern), in order of preference
    ("safetensors", "model.safetensors.index.json", "model.safetensors",
     re.compile(r"^model-(\d{5})-of-(\d{5})\.safetensors$")),
    ("bin", "pytorch_model.bin.index.json", "pytorch_model.bin",
     re.compile(r"^pytorch_model-(\d{5})-of-(\d{5})\.bin$")),
)


@dataclass
class WeightFiles:
    """The weight files of a checkpoint and, if it has one, the index saying which key is where."""

    format: str  # "safetensors" | "bin"
    files: list[Path]
    weight_map: Optional[dict[str, str]] = None  # key -> file name, from the index json
    ignored: list[str] = field(default_factory=list)  # other weight files present but not read


def read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise ConversionError(f"{path} not found: {what}")
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConversionError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(value, dict):
        raise ConversionError(f"{path} must hold a JSON object")
    return value


def _shard_set(root: Path, pattern: re.Pattern) -> Optional[list[Path]]:
    """All ``-of-N`` shards matching ``pattern``; an error when one of 1..N is missing."""
    found = {}
    totals = set()
    for path in root.iterdir():
        m = pattern.match(path.name)
        if m:
            found[int(m.group(1))] = path
            totals.add(int(m.group(2)))
    if not found:
        return None
    if len(totals) != 1:
        raise ConversionError(f"{root}: weight shards from different saves (of-{sorted(totals)}); keep one set")
    total = totals.pop()
    missing = [i for i in range(1, total + 1) if i not in found]
    if missing:
        raise ConversionError(f"{root}: weight shards {missing} of {total} are missing; the download is incomplete")
    return [found[i] for i in range(1, total + 1)]


def find_weight_files(root: Path) -> WeightFiles:
    """The weights to read, preferring safetensors; every listed file must exist."""
    chosen: Optional[WeightFiles] = None
    present: list[str] = []
    for fmt, index_name, single, pattern in _LAYOUTS:
        index_path = root / index_name
        files: Optional[list[Path]] = None
        weight_map = None
        if index_path.is_file():
            index = read_json(index_path, "the weight index")
            weight_map = index.get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise ConversionError(f"{index_path}: no 'weight_map'")
            names = sorted(set(weight_map.values()))
            missing = [n for n in names if not (root / n).is_file()]
            if missing:
                raise ConversionError(f"{index_path} lists weight files that are missing: {missing}; "
                                      f"the download is incomplete")
            files = [root / n for n in names]
        elif (root / single).is_file():
            files = [root / single]
        else:
            files = _shard_set(root, pattern)
        if files:
            present.extend(f.name for f in files)
            if chosen is None:
                chosen = WeightFiles(fmt, files, weight_map)
    if chosen is None:
        raise ConversionError(f"{root}: no weights found (model.safetensors[.index.json], "
                              f"model-*-of-*.safetensors, pytorch_model.bin[.index.json] or pytorch_model-*-of-*.bin)")
    chosen.ignored = sorted(set(present) - {f.name for f in chosen.files})
    return chosen


def sha256_files(files: list[Path], desc: str = "sha256") -> dict[str, str]:
    """``{file name: sha256}``, streamed (one progress bar over all bytes)."""
    total = sum(f.stat().st_size for f in files)
    out = {}
    with tqdm(total=total, unit="B", unit_scale=True, desc=desc, leave=False) as bar:
        for f in files:
            out[f.name] = file_sha256(f, progress=bar.update)
    return out


def _load_file(path: Path, fmt: str) -> dict[str, torch.Tensor]:
    if fmt == "safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError) as err:
            raise ConversionError(f"{path} is not a readable safetensors file: {err}") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # noqa: BLE001 - any failure: not a plain tensor state dict
        raise ConversionError(f"{path} cannot be read as a tensor state dict with torch.load(weights_only=True): "
                              f"{err}") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise ConversionError(f"{path} is not a flat state dict of tensors")
    return state


def iter_state(weights: WeightFiles) -> Iterator[tuple[str, torch.Tensor]]:
    """Every (key, tensor) of the checkpoint; checks the index against the files, duplicate keys
    and finiteness on the way."""
    seen: dict[str, str] = {}
    for path in tqdm(weights.files, desc="reading weights", leave=False):
        state = _load_file(path, weights.format)
        if weights.weight_map is not None:
            expected = {k for k, n in weights.weight_map.items() if n == path.name}
            extra, absent = sorted(set(state) - expected), sorted(expected - set(state))
            if extra or absent:
                raise ConversionError(f"{path.name} disagrees with its index: keys not in the index {extra[:5]}, "
                                      f"indexed keys not in the file {absent[:5]}")
        for key, tensor in state.items():
            if key in seen:
                raise ConversionError(f"key {key!r} is stored twice ({seen[key]} and {path.name})")
            seen[key] = path.name
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise ConversionError(f"{path.name}: {key!r} holds NaN or Inf values")
            yield key, tensor
