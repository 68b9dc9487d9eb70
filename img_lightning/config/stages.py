"""The two training stages' configs, as the code both stages share takes them.

The job assembly (``job.py``), the run directory and its lock are written once for ``img-train``
and ``img-finetune-mllm train``; they take either stage's config, and mypy checks their code against
each of the two schemas (a constrained type variable), so a key one schema lacks is an error there.
"""

from __future__ import annotations

from typing import TypeVar, Union

from .finetune_mllm import FinetuneMLLMConfig, FinetuneRunConfig, FinetuneTrainerConfig
from .train import RunConfig, TrainConfig, TrainerConfig

# A training stage's whole config: generic code is checked against each schema...
StageConfig = TypeVar("StageConfig", TrainConfig, FinetuneMLLMConfig)
# ... and where one plain function serves both stages, the config or its ``run``/``trainer`` block.
AnyStageConfig = Union[TrainConfig, FinetuneMLLMConfig]
RunBlock = Union[RunConfig, FinetuneRunConfig]
TrainerBlock = Union[TrainerConfig, FinetuneTrainerConfig]
