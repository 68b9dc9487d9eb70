"""Small single-purpose callbacks; each saves its own state in the checkpoint."""

from .reference_swap import ReferenceSwap, weights_fingerprint
from .requeue import RequeueOnSignal
from .throughput import Throughput

__all__ = ["ReferenceSwap", "RequeueOnSignal", "Throughput", "weights_fingerprint"]
