"""The one base class of errors a user can act on; CLIs turn them into one line and exit code 2.

Kept free of heavy imports (no torch) so a CLI can catch every user error, and answer ``--help``
and ``--version``, without loading the libraries its commands need.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


class UserError(Exception):
    """Bad input, a missing file or model, a mismatched cache or checkpoint: the message names the
    file, row or config key and says what to do. Every project error of that kind derives from it."""


class NonFiniteError(UserError, FloatingPointError):
    """A NaN/Inf that would make a result silently wrong (diverged training, a broken checkpoint,
    damaged features): the run stops, and the message says where it appeared and what to do."""


class Problems:
    """Collects every problem a user can fix instead of stopping at the first, so a check before a
    long run reports them all in one error.

    :meth:`check` runs a function and records the message of a :class:`UserError` (or a missing
    file) it raises; a value OmegaConf reports as missing (``???``) is skipped: the caller lists
    missing keys itself. Any other exception is a bug and propagates.
    """

    def __init__(self) -> None:
        self.items: list[str] = []

    def add(self, message: str) -> None:
        if message not in self.items:
            self.items.append(message)

    def check(self, fn: Callable[..., T], *args: Any, where: str | None = None, **kwargs: Any) -> T | None:
        """``fn(*args, **kwargs)``, or None after recording its error (prefixed by ``where``, the
        config key it concerns, unless the message starts with it)."""
        try:
            return fn(*args, **kwargs)
        except (UserError, FileNotFoundError) as err:
            text = str(err)
            self.add(f"{where}: {text}" if where and not text.startswith(where) else text)
        except Exception as err:  # noqa: BLE001 - only OmegaConf's "no value" is expected here
            from omegaconf.errors import MissingMandatoryValue

            if not isinstance(err, MissingMandatoryValue):
                raise
        return None

    def __bool__(self) -> bool:
        return bool(self.items)

    def __len__(self) -> int:
        return len(self.items)

    def message(self, headline: str) -> str:
        return headline + "\n  - " + "\n  - ".join(self.items)
