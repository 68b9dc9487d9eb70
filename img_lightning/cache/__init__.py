"""Feature cache: format, writer, manifest, reader, 8-bit guidance (see docs/cache-format.md)."""

from .format import CacheFormatError, decode_meta, decode_tensors, encode_sample
from .key import cache_key
from .manifest import Manifest, ShardEntry, finalize_manifest, read_shard_index, scan_shard
from .quant import dequantize_batch, to_storage
from .reader import BatchReader, BufferPool, CacheView
from .writer import CacheWriter, ShardWriter, shard_is_complete

__all__ = [
    "BatchReader",
    "BufferPool",
    "CacheFormatError",
    "CacheView",
    "CacheWriter",
    "Manifest",
    "ShardEntry",
    "ShardWriter",
    "cache_key",
    "decode_meta",
    "decode_tensors",
    "dequantize_batch",
    "encode_sample",
    "finalize_manifest",
    "read_shard_index",
    "scan_shard",
    "shard_is_complete",
    "to_storage",
]
