"""Feature encoders shared by preprocessing (training cache) and evaluation (inference), so both
compute identical features:

* :mod:`.mllm` - ``GuidanceEncoder``: MLLM hidden states for (image, question);
* :mod:`.ip` - ``IPEncoder`` / ``build_ip_encoder``: IP-Adapter tokens (SDXL plus, FLUX XLabs);
* :mod:`.conversation` - the conversation formats and LLaVA's token ids (also used by MLLM finetuning);
* :mod:`.questions` / :mod:`.templates` - question files and the built-in question set, and the
  per-sample question choice;
* :mod:`.checks` - "is the model there, how wide are its features?" without loading weights;
* :mod:`.export_manifest` - what the encoders (and the cache key) read of a finetuned-MLLM export
  (``img_finetune.json``), written by :mod:`img_lightning.finetune.export`.

Models are found by :mod:`img_lightning.models` (local path or HF cache, never a download).
Submodules are imported explicitly (``from img_lightning.encoders.ip import build_ip_encoder``)
so importing the package stays cheap.
"""
