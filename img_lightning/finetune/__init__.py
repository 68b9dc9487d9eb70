"""The MLLM finetuning stage (``img-finetune-mllm``): teach an MLLM to say how an image must change
to match a prompt, the misalignment detector whose hidden states IMG uses as guidance.

Paper setting: LLaVA-1.5-13B, one epoch on the CLIP-filtered InstructPix2Pix triplets {original
image I0, edited prompt T1, edit instruction TE}: the model sees I0 and one misalignment question
about T1 and learns to answer TE, with LLaVA-1.5's finetuning recipe (full, or LoRA).

Modules, one job each:

* :mod:`.triplets` - streaming reader of the InstructPix2Pix parquet layout, held-out split;
* :mod:`.seed_edit` - reader of a user-supplied SEED-Data-Edit sample (evaluation);
* :mod:`.samples` - sample -> token ids / labels / pixels, in the guidance encoder's format;
* :mod:`.plan`, :mod:`.loader`, :mod:`.datamodule` - on the shared data stack (:mod:`img_lightning.data`):
  the epoch ordering, parquet rows -> token batches, skip lists and counts;
* :mod:`.module`, :mod:`.strategy`, :mod:`.training` - LightningModule, FSDP/DDP, the stage the job
  assembly (:mod:`img_lightning.job`) runs;
* :mod:`.export`, :mod:`.manifest` - llava-hf / Qwen folder + manifest (cache-key identity);
* :mod:`.merge` - LoRA merged from float32 sums, rounded once to the export dtype, and checked;
* :mod:`.evaluate`, :mod:`.metrics`, :mod:`.judge`, :mod:`.report` - ``img-finetune-mllm eval``;
* :mod:`.memory` - the memory arithmetic of the full recipe.

Submodules are imported explicitly; importing the package is free.
"""
