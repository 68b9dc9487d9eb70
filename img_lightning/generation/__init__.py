"""Image generation for evaluation: base images, IMG re-generation and the control arm.

- :mod:`.generator`    ``IMGGenerator``: the steps every arm's image is made with (base, IMG step,
  re-generation, control)
- :mod:`.runner`       the resumable generate stage (``GenerationRun``), arm by arm, into a run directory
- :mod:`.refiner`      ``IMGRefiner``: the same steps on your own prompts or images, in memory
  (``img-generate``, Python)
- :mod:`.refine_outputs` what ``img-generate`` writes (images, strips, ``metadata.jsonl``); :mod:`.strip` the strip
- :mod:`.pipeline`     ``DiffusionBackend``: SDXL (optionally another UNet) and FLUX, one seed per prompt
- :mod:`.flux_sampler` XLabs' FLUX sampling on the FluxPipeline's components
- :mod:`.ip_inject`    aligned tokens fed after the IP-Adapter's projection
- :mod:`.conditioner`  image -> (MLLM guidance, IP tokens) -> aligner x passes -> aligned tokens
- :mod:`.requirements` every model of the stage checked (and the aligner loaded) before the first image
- :mod:`.seeds`        per-prompt seeds
- :mod:`.provenance`   what each image was made from, the check that a reused run dir still matches, and
  which arm's images another arm's are by construction (control = base with the released SDXL settings)
"""
