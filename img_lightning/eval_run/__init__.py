"""What the evaluation stages share, below both generation and evaluation.

``img-eval`` runs in stages (generate, score, report) that meet only in the run directory. The
types and names they agree on live here, so the generation layer and the evaluation layer each
import them downwards and neither imports the other's internals:

- :mod:`.prompts` :class:`PromptRecord` (one prompt with its stable uid) and :func:`chunk` (a SLURM
  array task's share of the prompts)
- :mod:`.store`   :class:`ImageStore`: ``{run}/images/{arm}/{uid}.png`` with JSONL metadata
- :mod:`.arms`    the arm names (``base``, ``control``, ``img_r{r}``) and a task's chunk tag
"""

from .arms import arm_names, chunk_tag, img_arm, source_arm
from .prompts import PromptRecord, chunk
from .store import ImageStore, safe_uid

__all__ = ["ImageStore", "PromptRecord", "arm_names", "chunk", "chunk_tag", "img_arm", "safe_uid", "source_arm"]
