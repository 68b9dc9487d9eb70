"""Proof that an export holds the weights training ended with.

The export is written after the final ``trainer.validate()``, and Lightning may load a checkpoint
into the module inside ``validate()``/``test()`` with nothing to show for it but one log line (under
SLURM it restores the newest ``hpc_ckpt_*.ckpt`` of its root directory when no ``ckpt_path`` is
given: a requeued run once exported the requeue point's weights with ``global_step`` saying the
final step). So the trainable weights are fingerprinted when ``fit`` returns and checked before the
export; a difference is a bug, and nothing is exported.
"""

from __future__ import annotations

import hashlib

import torch


class WeightsChangedError(RuntimeError):
    """The module's weights changed where nothing may change them (a bug of ours, not the user's)."""


def weights_fingerprint(module: torch.nn.Module) -> str:
    """sha256 over the names and bytes of every trainable parameter (this rank's shard under FSDP).

    Trainable ones only: frozen weights are the same in every checkpoint, and hashing a frozen 13B
    base model on every rank would cost minutes.
    """
    digest = hashlib.sha256()
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        data = param.detach().contiguous().reshape(-1)
        digest.update(f"{name}:{data.dtype}:{data.numel()};".encode())
        if data.numel():
            digest.update(data.view(torch.uint8).cpu().numpy().tobytes())
    return digest.hexdigest()


def check_weights_unchanged(module: torch.nn.Module, fingerprint: str, since: str) -> None:
    """Raise :class:`WeightsChangedError` when ``module``'s trainable weights are not the ones
    ``fingerprint`` was taken of (``since``: what ran in between, for the message)."""
    if weights_fingerprint(module) != fingerprint:
        raise WeightsChangedError(
            f"the trained weights changed during {since} (a checkpoint was loaded into the module?): "
            f"nothing is exported, because the export must hold the weights training ended with. The run's "
            f"checkpoints are intact; please report this"
        )
