"""Per-prompt seeds that do not depend on which other prompts are in the same run or chunk."""

from __future__ import annotations

import hashlib


def seed_for(uid: str, base_seed: int) -> int:
    digest = hashlib.sha256(f"{base_seed}:{uid}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF
