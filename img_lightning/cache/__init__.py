"""Feature cache: format, writer, manifest, reader (DESIGN §3)."""

from .format import CacheFormatError, decode_meta, decode_tensors, encode_sample
from .key import cache_key
from .manifest import Manifest, ShardEntry, finalize_manifest, read_shard_index, scan_shard
from .reader import BatchReader, CacheView
from .writer import CacheWriter, ShardWriter, shard_is_complete

__all__ = [
    "BatchReader",
    "CacheFormatError",
    "CacheView",
    "CacheWriter",
    "Manifest",
    "ShardEntry",
    "ShardWriter",
    "cache_key",
    "decode_meta",
    "decode_tensors",
    "encode_sample",
    "finalize_manifest",
    "read_shard_index",
    "scan_shard",
    "shard_is_complete",
]
