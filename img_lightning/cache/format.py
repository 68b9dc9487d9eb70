"""The feature-cache sample format: the single definition the writer and the readers share.

A cache is a directory of WebDataset shards (plain POSIX tar) plus JSON side files::

    manifest.json              cache key, recipe, tensor shapes, per-shard count/bytes/sha256
    shard-000000.tar           the samples
    shard-000000.index.json    per-shard manifest entry + byte offsets of every member

Each sample (one Pick-a-Pic preference pair) is two tar members sharing the sample key:

* ``{key}.safetensors`` - ``guidance`` [T, D_mllm] (real tokens only, no padding), ``ip_lose``
  [N, D] and ``ip_win`` [N, D], fp16 or bf16. With 8-bit guidance (format version 2),
  ``guidance`` is float8_e4m3fn (safetensors ``F8_E4M3``), ``guidance_scale`` [T] float32 holds
  one scale per token, and the K largest channels of the sample stay 16-bit in
  ``guidance_outlier`` [T, K] at the channels ``guidance_outlier_index`` [K] int32 (see
  :mod:`img_lightning.cache.quant`); the IP tokens stay 16-bit. Safetensors, so reading never
  unpickles anything.
* ``{key}.json`` - metadata: ``pair_id``, ``caption``, ``winner_uid``, ``loser_uid``,
  ``winner_index`` (0 if ``jpg_0`` won), ``template_id`` (the question's index in the question
  set), ``num_tokens`` and whatever else the writer adds (preprocessing: ``template_set``,
  ``mllm_prompt`` - the exact text given to the MLLM, with its image placeholder - and
  ``questions_sha256``, the question file's hash).

The shards stay standard WebDataset, so ``webdataset.WebDataset(urls)`` can stream them too; our
training loader uses the side-file offsets for random access instead (exact resume, one copy).
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..errors import UserError

FORMAT_NAME = "img-lightning-cache"
# 1: 16-bit tensors. 2: adds 8-bit guidance + per-token scales. A cache records the lowest version
# that can read it, so a 16-bit cache stays readable by version-1 readers.
FORMAT_VERSION = 2
FP8_FORMAT_VERSION = 2
MANIFEST_NAME = "manifest.json"
TENSOR_EXT = "safetensors"
META_EXT = "json"
INDEX_SUFFIX = ".index.json"
SHARD_PATTERN = "shard-{:06d}.tar"

TENSOR_KEYS = ("guidance", "ip_lose", "ip_win")
SCALE_KEY = "guidance_scale"  # per-token float32 scales of 8-bit guidance
OUTLIER_INDEX_KEY = "guidance_outlier_index"  # [K] int32: channels kept 16-bit beside 8-bit guidance
OUTLIER_KEY = "guidance_outlier"  # [T, K] their values, in the cache's 16-bit dtype
QUANT_KEYS = (SCALE_KEY, OUTLIER_INDEX_KEY, OUTLIER_KEY)  # present with 8-bit guidance only
REQUIRED_META = ("pair_id", "caption", "winner_uid", "loser_uid", "template_id", "num_tokens")
CACHE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}  # IP tokens (and 16-bit guidance)
FP8_DTYPE = torch.float8_e4m3fn
GUIDANCE_DTYPES = {**CACHE_DTYPES, "float8_e4m3fn": FP8_DTYPE}
SCALE_DTYPE = torch.float32
INDEX_DTYPE = torch.int32
_KEY_RE = re.compile(r"^[A-Za-z0-9_\-]+$")

# safetensors dtype names -> torch
_ST_DTYPES = {
    "F8_E4M3": torch.float8_e4m3fn,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


class CacheFormatError(UserError, ValueError):
    """Bytes that are not a valid cache sample/shard; the message names the file and key."""


def check_key(key: str) -> str:
    # WebDataset splits member names at the first dot, so keys must not contain one.
    if not _KEY_RE.match(key):
        raise ValueError(f"sample key {key!r} must match {_KEY_RE.pattern} (no dots or slashes)")
    return key


def member_name(key: str, ext: str) -> str:
    """The tar member name of a sample's ``ext`` part: the writer's rule, which verify enforces."""
    return f"{check_key(key)}.{ext}"


def split_member_name(name: str) -> tuple[str, str]:
    """``(key, ext)`` of a member named by :func:`member_name`; ValueError for any other name (an
    absolute or ``../`` path, a folder part, another extension): such a shard was not written here."""
    key, dot, ext = name.partition(".")
    if not dot or ext not in (META_EXT, TENSOR_EXT) or not _KEY_RE.match(key):
        raise ValueError(f"member name {name!r} breaks the writer's rule {{key}}.{META_EXT} / {{key}}.{TENSOR_EXT} "
                         f"with a key of {_KEY_RE.pattern} (no folders, no dots)")
    return key, ext


@dataclass(frozen=True)
class TensorSpec:
    """Where one tensor sits inside a safetensors payload."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # byte offset from the start of the payload
    end: int


def parse_safetensors_header(prefix: bytes | bytearray | memoryview) -> tuple[int, dict[str, TensorSpec]]:
    """Parse the header of a safetensors payload from its first ``8 + header_len`` bytes.

    Returns ``(data_start, specs)`` where ``specs[name].begin`` is relative to the payload start.
    We parse the (simple, documented) header ourselves so tensors can be read straight into a
    batch buffer without an intermediate copy.
    """
    if len(prefix) < 8:
        raise CacheFormatError("safetensors payload shorter than its 8-byte header length")
    (header_len,) = struct.unpack_from("<Q", prefix, 0)
    if header_len > 100_000_000 or len(prefix) < 8 + header_len:
        raise CacheFormatError(f"safetensors header length {header_len} is implausible or truncated")
    try:
        header = json.loads(bytes(prefix[8 : 8 + header_len]))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CacheFormatError(f"safetensors header is not JSON: {err}") from None
    data_start = 8 + header_len
    specs: dict[str, TensorSpec] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = _ST_DTYPES[info["dtype"]]
            begin, end = info["data_offsets"]
            shape = tuple(int(s) for s in info["shape"])
        except (KeyError, TypeError, ValueError) as err:
            raise CacheFormatError(f"safetensors entry {name!r} malformed: {err}") from None
        specs[name] = TensorSpec(dtype, shape, data_start + int(begin), data_start + int(end))
    return data_start, specs


def encode_sample(tensors: Mapping[str, Tensor], meta: Mapping[str, Any]) -> dict[str, bytes]:
    """Serialise one sample to its tar members (extension -> bytes). Deterministic byte output."""
    from safetensors.torch import save

    missing = [k for k in TENSOR_KEYS if k not in tensors]
    if missing:
        raise ValueError(f"sample lacks tensors {missing}")
    missing_meta = [k for k in REQUIRED_META if k not in meta]
    if missing_meta:
        raise ValueError(f"sample metadata lacks {missing_meta}")
    guidance = tensors["guidance"]
    if guidance.ndim != 2 or int(meta["num_tokens"]) != guidance.shape[0]:
        raise ValueError(
            f"guidance must be [T, D] with T == meta num_tokens; got {tuple(guidance.shape)} "
            f"and num_tokens={meta['num_tokens']}"
        )
    if tensors["ip_lose"].shape != tensors["ip_win"].shape or tensors["ip_lose"].ndim != 2:
        raise ValueError("ip_lose and ip_win must both be [N, D] with equal shapes")
    if guidance.dtype not in GUIDANCE_DTYPES.values():
        raise ValueError(f"guidance must be one of {sorted(GUIDANCE_DTYPES)}, got {guidance.dtype}")
    names = list(TENSOR_KEYS)
    if guidance.dtype == FP8_DTYPE:
        names += _check_quant_tensors(tensors, guidance.shape[0], guidance.shape[1])
    elif any(k in tensors for k in QUANT_KEYS):
        raise ValueError(f"{', '.join(k for k in QUANT_KEYS if k in tensors)} belong to 8-bit guidance only; "
                         f"guidance is {guidance.dtype}")
    for name in ("ip_lose", "ip_win"):
        if tensors[name].dtype not in CACHE_DTYPES.values():
            raise ValueError(f"{name} must be float16 or bfloat16, got {tensors[name].dtype}")
    payload = save({k: tensors[k].detach().cpu().contiguous() for k in names})
    meta_bytes = json.dumps(dict(meta), sort_keys=True, ensure_ascii=False).encode("utf-8")
    return {TENSOR_EXT: payload, META_EXT: meta_bytes}


def _check_quant_tensors(tensors: Mapping[str, Tensor], t: int, d: int) -> list[str]:
    """Shapes/dtypes of the tensors that come with 8-bit guidance; returns their names."""
    scale = tensors.get(SCALE_KEY)
    if scale is None or scale.dtype != SCALE_DTYPE or tuple(scale.shape) != (t,):
        got = None if scale is None else (tuple(scale.shape), scale.dtype)
        raise ValueError(f"8-bit guidance needs {SCALE_KEY} [{t}] float32, got {got}")
    index, values = tensors.get(OUTLIER_INDEX_KEY), tensors.get(OUTLIER_KEY)
    if index is None and values is None:
        return [SCALE_KEY]
    if index is None or values is None:
        raise ValueError(f"{OUTLIER_INDEX_KEY} and {OUTLIER_KEY} come together")
    k = index.shape[0] if index.ndim == 1 else -1
    if index.dtype != INDEX_DTYPE or not 0 < k <= d:
        raise ValueError(f"{OUTLIER_INDEX_KEY} must be [K] int32 with 0 < K <= {d}, "
                         f"got {tuple(index.shape)} {index.dtype}")
    if tuple(values.shape) != (t, k) or values.dtype not in CACHE_DTYPES.values():
        raise ValueError(f"{OUTLIER_KEY} must be [{t}, {k}] float16/bfloat16, got {tuple(values.shape)} {values.dtype}")
    return [SCALE_KEY, OUTLIER_INDEX_KEY, OUTLIER_KEY]


def decode_tensors(payload: bytes | bytearray | memoryview) -> dict[str, Tensor]:
    """Tensors of a ``.safetensors`` member as views into ``payload`` (no copy)."""
    _, specs = parse_safetensors_header(payload)
    out = {}
    for name, spec in specs.items():
        if spec.end > len(payload):
            raise CacheFormatError(f"tensor {name!r} runs past the end of the payload")
        count = (spec.end - spec.begin) // torch.empty((), dtype=spec.dtype).element_size()
        if count == 0:
            out[name] = torch.empty(spec.shape, dtype=spec.dtype)
            continue
        flat = torch.frombuffer(payload, dtype=spec.dtype, count=count, offset=spec.begin)
        out[name] = flat.view(spec.shape)
    return out


def format_version(tensors: Mapping[str, Any]) -> int:
    """The lowest format version that can read a cache with this tensor spec (manifest ``tensors``)."""
    return FP8_FORMAT_VERSION if tensors.get("guidance", {}).get("dtype") == "float8_e4m3fn" else 1


def decode_meta(payload: bytes) -> dict[str, Any]:
    try:
        return json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CacheFormatError(f"sample metadata is not UTF-8 JSON: {err}") from None
