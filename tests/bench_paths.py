"""Where the tests find the official prompt files (never copied into the project).

``../shared/benchmarks`` beside the checkout, or ``IMG_BENCHMARKS_DIR``. Tests that read them are
skipped, with the reason shown, when neither exists.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

BENCH = Path(os.environ.get("IMG_BENCHMARKS_DIR")
             or Path(__file__).resolve().parents[1].parent / "shared" / "benchmarks")
requires_bench = pytest.mark.skipif(
    not BENCH.is_dir(), reason=f"official prompt files not found at {BENCH} (set IMG_BENCHMARKS_DIR)"
)
