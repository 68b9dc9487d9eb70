"""The one base class of errors a user can act on; CLIs turn them into one line and exit code 2.

Kept free of heavy imports (no torch) so a CLI can catch every user error, and answer ``--help``
and ``--version``, without loading the libraries its commands need.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input, a missing file or model, a mismatched cache or checkpoint: the message names the
    file, row or config key and says what to do. Every project error of that kind derives from it."""


class NonFiniteError(UserError, FloatingPointError):
    """A NaN/Inf that would make a result silently wrong (diverged training, a broken checkpoint,
    damaged features): the run stops, and the message says where it appeared and what to do."""
