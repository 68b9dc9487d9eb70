"""Image generation for evaluation: base images, IMG re-generation and the control arm.

- :mod:`.runner`       the resumable generate stage (``GenerationRun``), arm by arm
- :mod:`.pipeline`     ``DiffusionBackend``: SDXL (optionally another UNet) and FLUX, one seed per prompt
- :mod:`.flux_sampler` XLabs' FLUX sampling on the FluxPipeline's components
- :mod:`.ip_inject`    aligned tokens fed after the IP-Adapter's projection
- :mod:`.conditioner`  image -> (MLLM guidance, IP tokens) -> aligner x passes -> aligned tokens
- :mod:`.requirements` every model of the stage checked (and the aligner loaded) before the first image
- :mod:`.seeds`        per-prompt seeds
- :mod:`.provenance`   what each image was made from, and the check that a reused run dir still matches
"""
