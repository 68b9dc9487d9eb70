"""Feature encoders shared by preprocessing (training cache) and evaluation (inference), so both
compute identical features:

* :mod:`.mllm` - ``GuidanceEncoder``: MLLM hidden states for (image, templated question);
* :mod:`.ip` - ``IPEncoder`` / ``build_ip_encoder``: IP-Adapter tokens (SDXL plus, FLUX XLabs);
* :mod:`.templates` - the versioned question templates and the per-pair template choice;
* :mod:`.common` - model resolution (local path or HF cache, never a download) and errors.

Submodules are imported explicitly (``from img_lightning.encoders.ip import build_ip_encoder``)
so importing the package stays cheap.
"""
