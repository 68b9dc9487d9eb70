"""Small single-purpose callbacks; each saves its own state in the checkpoint."""

from .reference_swap import ReferenceSwap, weights_fingerprint
from .throughput import Throughput

__all__ = ["ReferenceSwap", "Throughput", "weights_fingerprint"]
