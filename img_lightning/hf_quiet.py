"""Hide Hugging Face model-loading progress bars unless the user asked for verbose output."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator


def quiet_hf_progress() -> None:
    """Honour ``HF_HUB_DISABLE_PROGRESS_BARS=1`` (set by our CLIs unless -v) in transformers and
    diffusers, which read it inconsistently (diffusers not at all)."""
    if os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS") != "1":
        return
    for name in ("transformers", "diffusers"):
        module = sys.modules.get(name)
        if module is not None:
            module.utils.logging.disable_progress_bar()


@contextlib.contextmanager
def diffusers_errors_only() -> Iterator[None]:
    """Silence diffusers' warnings for a call whose warnings describe what we do on purpose."""
    from diffusers.utils import logging as dlog

    previous = dlog.get_verbosity()
    dlog.set_verbosity_error()
    try:
        yield
    finally:
        dlog.set_verbosity(previous)
