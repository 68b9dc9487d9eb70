"""IMG Lightning: training, feature caching and evaluation for Implicit Multimodal Guidance.

The public Python API, imported on first use (``import img_lightning`` loads no torch):

- :class:`IMGRefiner` (:mod:`img_lightning.generation.refiner`): a trained aligner on your own
  prompts or images, e.g. ``IMGRefiner.from_config("configs/eval/backbones/sdxl.yaml", ...)``.

Layers, lowest first; a module imports only from its own layer or lower ones (tests/test_layers.py):
foundation (errors, atomic, config, models, hf_quiet, log_steps, run_dir, version) -> cache -> data ->
features (encoders, recipe, convert) -> training (aligner, objective, module, callbacks, training,
finetune) -> eval_run -> generation -> evaluation -> cli -> this package's API; ``tiny`` and the
``preprocessing`` package are applications on top.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .version import __version__

if TYPE_CHECKING:
    from .generation.refiner import IMGRefiner, Refinement

__all__ = ["IMGRefiner", "Refinement", "__version__"]


def __getattr__(name: str) -> Any:
    if name in ("IMGRefiner", "Refinement"):
        from .generation import refiner

        return getattr(refiner, name)
    raise AttributeError(f"module 'img_lightning' has no attribute {name!r}")
