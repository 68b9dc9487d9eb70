"""Typed schema of ``img-eval`` configs (``configs/eval/*.yaml``).

Defaults follow the paper and the authors' released demos: 3 aligner passes, IP scale 0.2, SDXL
50 steps / CFG 7.5 (FLUX: 30 steps / guidance 3.5, see ``configs/eval/backbones/flux.yaml`` for
XLabs' true CFG). The base image and the re-generation have separate negative-prompt settings
(``generation.base`` and ``img``), as in the demos. ``encoders`` is the very block of the
preprocessing recipe the aligner was trained on; ``recipe: PATH`` copies it from that YAML so
inference features come from exactly the training-time settings (loaded by
:mod:`.eval_loading`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from .checks import at_least, between, non_negative, optional, positive
from .choices import Choice, Dtype
from .encoders import EncodersConfig, MLLMConfig


class FluxShift(Choice):
    """How FLUX's timestep shift ``mu`` is computed (the schedule is ``exp(mu)/(exp(mu)+1/t-1)``)."""

    # XLabs' x-flux sampler (the released IMG FLUX demo): mu from (W // 8) * (H // 8) // 256,
    # i.e. 64 at 1024x1024 (mu ~ 0.47).
    xlabs = "xlabs"
    # diffusers' FluxPipeline and BFL's reference: mu from the packed latent length (4096 at 1024x1024, mu = 1.15).
    diffusers = "diffusers"


class PipelineKind(Choice):
    sdxl = "sdxl"  # StableDiffusionXLPipeline (SDXL, SDXL-DPO with another UNet)
    flux = "flux"  # FLUX.1 with XLabs' IP-Adapter and sampler


class ImageFormat(Choice):
    png = "png"
    jpeg = "jpeg"
    webp = "webp"


class NegativeIPImage(Choice):
    """Which image gives the negative (unconditional) IP tokens of the re-generation."""

    auto = "auto"  # the released choice for the IP encoder: sdxl_plus -> zero_pixels, flux_xlabs -> black
    # CLIP on an all-zero pixel_values tensor (IP-Adapter's generate_from_feat, diffusers' SDXL pipeline)
    zero_pixels = "zero_pixels"
    black = "black"  # a black RGB image through the CLIP processor (XLabs' FLUX demo, diffusers' FluxPipeline)



@dataclass
class PromptSetConfig:
    name: str = "???"  # short name; images go to {run}/images/{arm}/{uid}.png
    format: str = "???"  # text | partiprompts | drawbench | hpd_benchmark | hpd_csv | pickapic | t2i_compbench
    path: str = "???"  # the official file (or directory for hpd_benchmark)
    categories: list[str] = field(default_factory=list)  # keep only these categories
    limit: Optional[int] = None  # first N prompts (after the category filter)
    subset_dir: Optional[str] = None  # t2i_compbench complex: where complex_val_{spatial,action}.txt are


@dataclass
class SamplerConfig:
    """Sampling settings shared by every arm (base, IMG rounds, control), as in the demos."""

    steps: int = 50
    guidance_scale: float = 7.5  # SDXL: CFG; FLUX: the distilled guidance
    height: Optional[int] = None  # None: the pipeline default (1024 for SDXL and FLUX)
    width: Optional[int] = None
    # FLUX only, XLabs' sampler semantics. true_cfg_scale != 1 adds a second transformer pass with
    # the negative prompt (and negative IP tokens) from step `true_cfg_start_step` (0-based; XLabs'
    # timestep_to_start_cfg) on: pred = neg + true_cfg_scale * (pos - neg).
    true_cfg_scale: float = 1.0
    true_cfg_start_step: int = 0
    shift: FluxShift = FluxShift.xlabs


@dataclass
class BaseImageConfig:
    """The base image (arm ``base``): the plain pipeline, no IP-Adapter."""

    # None: the pipeline's default, i.e. SDXL's zero negative embeddings (force_zeros_for_empty_prompt,
    # what the demos' plain `pipe(prompt)` does) and, with FLUX true CFG, the encoded empty prompt "".
    # A string (even "") is encoded as text.
    negative_prompt: Optional[str] = None


@dataclass
class PipelineConfig:
    kind: PipelineKind = PipelineKind.sdxl
    model: str = "stabilityai/stable-diffusion-xl-base-1.0"
    path: Optional[str] = None  # local copy of `model`
    revision: Optional[str] = None
    variant: Optional[str] = None  # e.g. "fp16"
    # SDXL-DPO = the SDXL pipeline with another UNet (mhdang/dpo-sdxl-text2image-v1).
    unet: Optional[str] = None
    unet_path: Optional[str] = None
    unet_subfolder: Optional[str] = None
    dtype: Dtype = Dtype.float16
    device: str = "auto"
    cpu_offload: bool = False  # enable_model_cpu_offload (saves GPU memory, slower)
    batch_size: int = 4


@dataclass
class IPAdapterConfig:
    # Where pipe.load_ip_adapter finds the adapter file (h94's original {"image_proj", "ip_adapter"} layout, or
    # XLabs' FLUX v1 ip_adapter.safetensors).
    model: str = "h94/IP-Adapter"
    path: Optional[str] = None  # local directory holding `subfolder/weight_name`
    subfolder: str = "sdxl_models"
    weight_name: str = "ip-adapter-plus_sdxl_vit-h.safetensors"


@dataclass
class AlignerEvalConfig:
    checkpoint: str = "???"  # official .pth or our .safetensors export
    passes: int = 3
    # The head split is not in the tensor shapes (only heads*dim_head is). Our exports record it
    # (safetensors metadata / the .json beside aligner.pth) and it is taken from there; a released
    # aligner_*.pth records nothing, so set dim_head (64 for the released ones) or heads for it.
    dim_head: Optional[int] = None
    heads: Optional[int] = None


@dataclass
class IMGConfig:
    rounds: int = 1  # multi-round IMG: round r regenerates from round r-1's image
    ip_scale: float = 0.2
    control: bool = True  # the control arm: exactly these re-generation settings at IP scale 0
    ip_adapter: IPAdapterConfig = field(default_factory=IPAdapterConfig)
    aligner: AlignerEvalConfig = field(default_factory=AlignerEvalConfig)
    # Re-generation (IMG rounds and control); same meaning as generation.base.negative_prompt.
    # The released SDXL generate_from_feat builds "monochrome, lowres, bad anatomy, worst quality,
    # low quality" but never passes it to encode_prompt, so its negative text is SDXL's zeros (None).
    negative_prompt: Optional[str] = None
    negative_ip_image: NegativeIPImage = NegativeIPImage.auto
    # FLUX only: IP scale of the negative (true-CFG) pass (XLabs' neg_ip_scale); None = the arm's IP
    # scale. SDXL applies one scale to both CFG halves in one UNet pass, so there it must stay None.
    negative_ip_scale: Optional[float] = None
    free_encoders: bool = True  # drop the MLLM and IP encoder before regenerating (GPU memory)


@dataclass
class GenerationConfig:
    seed: int = 0  # per-prompt seed = hash(seed, prompt uid): stable under chunking and resume
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    base: BaseImageConfig = field(default_factory=BaseImageConfig)
    # IMG rounds read the stored images back for their features, so with img.rounds >= 1 only the
    # lossless png is accepted (jpeg/webp would feed the aligner a compressed image).
    image_format: ImageFormat = ImageFormat.png


class ImageBackend(Choice):
    """Image-processing backend of transformers processors. ``pil`` is what the scorers' reference
    code ran (transformers' "slow" processors); transformers 5 defaults to ``torchvision``, whose
    resampling differs slightly, so the backend is pinned rather than left to the installed version."""

    pil = "pil"
    torchvision = "torchvision"


@dataclass
class ScorerConfig:
    # hps | pickscore | clip | blip_vqa | spatial_proxy | t2i_non_spatial | t2i_complex | image_reward |
    # aesthetic | mllm_grader
    kind: str = "???"
    name: Optional[str] = None  # the metric's id: score files and report keys (default: kind)
    label: Optional[str] = None  # its column header in the report (default: name)
    model: Optional[str] = None  # HF id, or the open_clip architecture for hps
    path: Optional[str] = None  # local directory of `model` (HF format)
    # HF id of the processor / tokenizer when separate (PickScore: CLIP-H's; image_reward: bert-base-uncased)
    processor: Optional[str] = None
    processor_path: Optional[str] = None
    image_backend: ImageBackend = ImageBackend.pil  # transformers image processors: pinned, see ImageBackend
    # hps: the {"state_dict": ...} file; image_reward: ImageReward.pt; aesthetic: the MLP .pth/.safetensors
    checkpoint: Optional[str] = None
    # hps: an extra open_clip model-config JSON to register; image_reward: med_config.json (optional)
    model_config: Optional[str] = None
    # hps: "v2.0" | "v2.1" (not comparable); read from the checkpoint file name, a mismatch is refused
    version: Optional[str] = None
    antialias: bool = True  # hps: antialiased bicubic resize (hpsv2 on torchvision >= 0.17); False: older
    scale: Optional[float] = None  # multiply the score (hps: 100; clip: 100)
    clamp_zero: Optional[bool] = None  # clip: max(cos, 0) as in CLIPScore
    # blip_vqa / t2i_complex: "auto" (spaCy en_core_web_sm when installed, else the rules) | "rules" |
    # "spacy:MODEL" (T2I-CompBench's own chunker; the rules are a proxy, labelled in the report)
    noun_phrases: str = "auto"
    threshold: float = 0.1  # spatial_proxy: detection score threshold
    reference_size: int = 512  # spatial_proxy: image side the 150 px distance rule refers to
    subset_dir: Optional[str] = None  # t2i_complex: T2I-CompBench dataset dir (complex_val_*.txt)
    # t2i_complex: names of the scorers (in this list) it combines
    attribute: str = "blip_vqa"
    spatial: str = "spatial_proxy"
    action: str = "non_spatial"
    categories: list[str] = field(default_factory=list)  # score only prompts of these categories
    # mllm_grader: the MLLM (an encoders.mllm-style block, loaded as the encoder loads it), the rubric
    # file, the answer budget
    mllm: Optional[MLLMConfig] = None
    rubric: Optional[str] = None  # default: configs/eval/rubrics/diffusion_sharpening.yaml
    max_new_tokens: int = 512
    device: str = "auto"
    dtype: Dtype = Dtype.float32
    batch_size: int = 16


@dataclass
class ReportConfig:
    bootstrap: int = 1000
    seed: int = 0
    tie_tolerance: float = 0.0
    gallery_limit: int = 200  # prompts shown in the HTML gallery
    thumb_size: int = 256


@dataclass
class ChunkConfig:
    index: int = 0  # SLURM_ARRAY_TASK_ID when run under an array (see slurm/eval.sbatch)
    count: int = 1


@dataclass
class EvalConfig:
    run_dir: str = "???"
    prompts: PromptSetConfig = field(default_factory=PromptSetConfig)
    # The preprocessing recipe YAML the aligner's cache came from; its `encoders` block replaces
    # the one below (CLI overrides of encoders.* still apply on top). Loading moves the path to
    # `recipe_applied` (config/eval_loading.py), so a run's saved config.yaml re-runs as it is.
    recipe: Optional[str] = None
    recipe_applied: Optional[str] = None  # a record: the recipe whose encoders block `encoders` holds
    encoders: EncodersConfig = field(default_factory=EncodersConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    img: IMGConfig = field(default_factory=IMGConfig)
    scorers: list[ScorerConfig] = field(default_factory=list)
    report: ReportConfig = field(default_factory=ReportConfig)
    chunk: ChunkConfig = field(default_factory=ChunkConfig)


EvalConfig.CHECKS = {  # type: ignore[attr-defined]  # value ranges, checked at load (config/checks.py)
    "prompts.limit": optional(at_least(1)),
    "generation.sampler.steps": at_least(1),
    "generation.pipeline.batch_size": at_least(1),
    "img.aligner.passes": at_least(1),
    "img.rounds": non_negative,
    "img.ip_scale": non_negative,
    "img.negative_ip_scale": optional(non_negative),
    # every scorer's options (a * is every entry of the list)
    "scorers.*.max_new_tokens": at_least(1),
    "scorers.*.batch_size": at_least(1),
    "scorers.*.threshold": between(0.0, 1.0),
    "scorers.*.reference_size": at_least(1),
    "scorers.*.scale": optional(positive),
    "report.bootstrap": non_negative,
    "report.tie_tolerance": non_negative,
    "report.gallery_limit": non_negative,
    "report.thumb_size": at_least(1),
    "chunk.count": at_least(1),
    "chunk.index": non_negative,
}
