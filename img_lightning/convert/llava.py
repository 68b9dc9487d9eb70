"""Original LLaVA-1.5 checkpoint -> llava-hf ``LlavaForConditionalGeneration`` + ``LlavaProcessor``.

The released IMG-finetuned MLLM (``shi-labs/IMG``, folder ``llava/``) is in the original LLaVA
repository's format; the guidance encoder loads llava-hf folders. :func:`convert_llava` maps one
to the other the way transformers' own llava-1.5 conversion does, with every step checked:

* **config**: ``LlavaLlamaForCausalLM`` with ``mm_projector_type: mlp2x_gelu``,
  ``mm_vision_select_layer: -2``, ``mm_vision_select_feature: patch``, ``image_aspect_ratio: pad``,
  no image start/end or patch tokens - anything else (or an unknown field) is refused. It becomes
  ``vision_feature_layer=-2``, ``vision_feature_select_strategy="default"`` (drop CLS), a GELU
  projector, and a Llama text config from the same fields.
* **weights** (key mapping, recorded in ``conversion.json``): ``model.embed_tokens``,
  ``model.layers.*``, ``model.norm`` -> the language model; ``lm_head`` -> the LM head;
  ``model.mm_projector.0`` / ``.2`` -> ``multi_modal_projector.linear_1`` / ``linear_2``; rotary
  ``inv_freq`` buffers are checked against the config and dropped (they are recomputed). Any other
  key is refused. Target names are taken from the installed transformers' own modules, and the
  folder is written by its ``save_pretrained``, so the layout is the installed version's.
* **vision tower**: not part of LLaVA checkpoints; loaded from ``mm_vision_tower`` (or
  ``--vision-tower``: a local ``CLIPVisionModel``/``CLIPModel`` folder or a hub id in the local
  cache). ``model.vision_tower.vision_tower.*`` keys, if present, are used when
  ``unfreeze_mm_vision_tower`` is set (LLaVA then loads them) and otherwise must equal the tower.
* **tokenizer**: the source tokenizer (with its pad token) plus ``<image>`` as a special token.
  New embedding rows (the image token, then padding to a multiple of 64 like llava-hf's models)
  are the mean of the source rows, in the embedding and in ``lm_head`` (LLaVA's own rule for added
  tokens): deterministic, and never seen by the guidance features (image positions are replaced by
  image features).
* **dtype**: float16 for everything by default, because that is what LLaVA's loader computes
  with whatever the checkpoint's stored dtype: it loads the model with ``torch_dtype=float16`` and
  casts the (float32) CLIP tower to float16 too. A bf16 run of the converted folder (the recipes'
  ``encoders.mllm.dtype``) then holds exactly the released code's weights (stored -> fp16 -> bf16);
  ``dtype`` chooses another one (``float32`` keeps a float32 tiny model exact).
* **context**: LLaVA cuts the embedded sequence (image features spliced in) at the config's
  ``tokenizer_model_max_length`` (2048 for LLaVA-1.5), not at ``max_position_embeddings``. The
  value is kept in the llava-hf config under the same name, and the guidance encoder refuses
  longer inputs (it never truncates: see ``GuidanceEncoder.check_length``).

The output is written into a temporary folder next to ``dst`` and renamed when complete.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from ..atomic import check_writable
from ..models import ModelNotFoundError, model_dir, resolve_model_root
from .llava_source import ConversionError, find_weight_files, iter_state, read_json, sha256_files

FORMAT = "img-lightning-llava-conversion"
IMAGE_TOKEN = "<image>"
ARCHITECTURE = "LlavaLlamaForCausalLM"

# config.json fields that become LlamaConfig arguments of the same name
LLAMA_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "hidden_act", "max_position_embeddings", "initializer_range", "rms_norm_eps",
    "bos_token_id", "eos_token_id", "pad_token_id", "attention_bias", "attention_dropout", "mlp_bias", "head_dim",
)
# fields that must hold one of these values (missing -> LLaVA's own default, in the tuple's 2nd slot)
_MISSING = object()
REQUIRED_VALUES: dict[str, tuple[tuple, Any]] = {
    "mm_projector_type": (("mlp2x_gelu",), "linear"),
    "mm_vision_select_layer": ((-2,), _MISSING),
    "mm_vision_select_feature": (("patch",), "patch"),
    "image_aspect_ratio": (("pad",), _MISSING),
    "mm_use_im_start_end": ((False,), False),
    "mm_use_im_patch_token": ((False,), True),
    "mm_patch_merge_type": (("flat",), "flat"),
    "mm_resampler_type": ((None,), None),
    "mm_vision_resampler": ((None,), None),
    "s2": ((False,), False),
    "hidden_act": (("silu",), "silu"),
    "rope_scaling": ((None,), None),
    "tie_word_embeddings": ((False,), False),
    "attention_bias": ((False,), False),
    "mlp_bias": ((False,), False),
    "pretraining_tp": ((1,), 1),
}
# read elsewhere (mm_vision_tower, mm_hidden_size, rope_theta, unfreeze_mm_vision_tower,
# tokenizer_model_max_length: CONTEXT_FIELD) or used
# only by training / generation / bookkeeping, so they do not change the forward pass
OTHER_FIELDS = frozenset({
    "mm_vision_tower", "mm_hidden_size", "rope_theta", "unfreeze_mm_vision_tower", "tokenizer_model_max_length",
    "_name_or_path", "architectures", "model_type", "torch_dtype", "dtype", "transformers_version", "use_cache",
    "freeze_mm_mlp_adapter", "tune_mm_mlp_adapter", "tune_mm_vision_resampler", "use_mm_proj", "mm_projector_lr",
    "mm_vision_tower_lr", "tokenizer_padding_side", "image_grid_pinpoints",
    "image_crop_resolution", "image_split_resolution", "s2_scales", "max_length", "max_sequence_length",
    "output_attentions", "output_hidden_states", "return_dict", "chunk_size_feed_forward", "is_encoder_decoder",
    "id2label", "label2id", "problem_type", "torchscript", "use_return_dict", "tie_encoder_decoder",
    "pruned_heads", "add_cross_attention", "cross_attention_hidden_size", "is_decoder", "finetuning_task",
    "tokenizer_class", "prefix", "sep_token_id", "decoder_start_token_id", "task_specific_params",
    "min_length", "do_sample", "early_stopping", "num_beams", "num_beam_groups", "diversity_penalty",
    "temperature", "top_k", "top_p", "typical_p", "repetition_penalty", "length_penalty", "no_repeat_ngram_size",
    "encoder_no_repeat_ngram_size", "bad_words_ids", "num_return_sequences", "output_scores",
    "return_dict_in_generate", "forced_bos_token_id", "forced_eos_token_id", "remove_invalid_values",
    "exponential_decay_length_penalty", "suppress_tokens", "begin_suppress_tokens", "tf_legacy_loss",
    "torch_compile",
})

# LLaVA's length limit on the embedded sequence; carried into the llava-hf config under this name
CONTEXT_FIELD = "tokenizer_model_max_length"
DEFAULT_DTYPE = "float16"  # LLaVA's loader (see the module docstring)

# original key prefix -> role; the target prefix comes from the installed model's modules
KEY_RULES = (
    ("model.embed_tokens.", "text", "embed_tokens."),
    ("model.layers.", "text", "layers."),
    ("model.norm.", "text", "norm."),
    ("lm_head.", "head", ""),
    ("model.mm_projector.0.", "projector", "linear_1."),
    ("model.mm_projector.2.", "projector", "linear_2."),
)
TOWER_PREFIX = "model.vision_tower.vision_tower."


@dataclass
class ConversionResult:
    dst: Path
    record: dict


# -- LLaVA's conversation rule ------------------------------------------------------------------------
def model_name_from_path(path: str | Path) -> str:
    """The model name LLaVA derives from a folder (``checkpoint-*`` folders get their parent's)."""
    parts = str(path).strip("/").split("/")
    return f"{parts[-2]}_{parts[-1]}" if parts[-1].startswith("checkpoint-") and len(parts) > 1 else parts[-1]


def conversation_for_name(name: str) -> str:
    """The conversation LLaVA's ``run_llava`` picks for a model name (the released IMG code's rule)."""
    lowered = name.lower()
    for needle, mode in (("llama-2", "llava_llama_2"), ("mistral", "mistral_instruct"),
                         ("v1.6-34b", "chatml_direct"), ("v1", "llava_v1"), ("mpt", "mpt")):
        if needle in lowered:
            return mode
    return "llava_v0"


# -- config -------------------------------------------------------------------------------------------
def check_config(cfg: dict, where: Path) -> dict:
    """LlamaConfig keyword arguments from an original config; refuses what we cannot reproduce."""
    problems = []
    if ARCHITECTURE not in (cfg.get("architectures") or []):
        problems.append(f"architectures={cfg.get('architectures')!r} (supported: [{ARCHITECTURE!r}])")
    for key, (allowed, default) in REQUIRED_VALUES.items():
        value = cfg.get(key, default)
        if value is _MISSING:
            problems.append(f"{key} is missing (supported: {list(allowed)})")
        elif value not in allowed or (isinstance(value, bool) != isinstance(allowed[0], bool)):
            shown = "missing, which LLaVA reads as " if key not in cfg else ""
            problems.append(f"{key} is {shown}{value!r} (supported: {list(allowed)})")
    if not isinstance(cfg.get("mm_hidden_size"), int):
        problems.append("mm_hidden_size is missing")
    if not cfg.get("mm_vision_tower"):
        problems.append("mm_vision_tower is missing")
    unknown = sorted(set(cfg) - set(LLAMA_FIELDS) - set(REQUIRED_VALUES) - OTHER_FIELDS)
    if unknown:
        problems.append(f"unknown fields {unknown} (their effect cannot be checked)")
    if problems:
        raise ConversionError(f"{where} cannot be converted: " + "; ".join(problems))
    kwargs = {k: cfg[k] for k in LLAMA_FIELDS if k in cfg and k not in ("attention_bias", "mlp_bias")}
    kwargs["rope_theta"] = float(cfg.get("rope_theta", 10000.0))
    return kwargs


# -- vision tower -------------------------------------------------------------------------------------
def resolve_tower(ref: str) -> Path:
    """A local folder, or a hub id already in the local Hugging Face cache (never downloaded)."""
    if Path(ref).expanduser().is_dir():
        return model_dir(Path(ref).expanduser(), "", ref, "--vision-tower")
    root = resolve_model_root(ref, None, None, "--vision-tower")
    return model_dir(root, "", ref, "--vision-tower")


def load_tower(folder: Path):
    from transformers import CLIPVisionModel

    try:
        loaded: Any = CLIPVisionModel.from_pretrained(folder, output_loading_info=True)  # (model, loading info)
        tower, info = loaded
    except (OSError, ValueError) as err:
        raise ConversionError(f"cannot load a CLIP vision tower from {folder}: {err}") from None
    if info.get("missing_keys") or info.get("mismatched_keys"):
        raise ConversionError(f"vision tower {folder}: missing weights {sorted(info.get('missing_keys') or [])[:5]}, "
                              f"mismatched {sorted(info.get('mismatched_keys') or [])[:5]}")
    return tower.eval()


def tower_from_checkpoint(config, tensors: dict[str, torch.Tensor], scratch: Path):
    """A ``CLIPVisionModel`` from the checkpoint's own tower tensors, loaded by transformers (so its
    key conversion applies) with nothing missing and nothing left over."""
    from safetensors.torch import save_file
    from transformers import CLIPVisionModel

    scratch.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(scratch)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(scratch / "model.safetensors"),
              metadata={"format": "pt"})
    loaded: Any = CLIPVisionModel.from_pretrained(scratch, output_loading_info=True)  # (model, loading info)
    tower, info = loaded
    bad = {k: sorted(info.get(k) or [])[:5] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if any(bad.values()):
        raise ConversionError(f"the checkpoint's {TOWER_PREFIX}* weights do not form the vision tower: {bad}")
    return tower.eval()


def _weight_files_of(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin") and p.is_file())


# -- the model ----------------------------------------------------------------------------------------
def _module_prefixes(model) -> dict[str, str]:
    """Where the installed transformers keeps each part of LlavaForConditionalGeneration."""
    from transformers import CLIPVisionModel, LlamaModel
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

    head = model.get_output_embeddings()
    found: dict[str, str] = {}
    for name, module in model.named_modules():
        if isinstance(module, LlamaModel):
            found.setdefault("text", name)
        elif isinstance(module, LlavaMultiModalProjector):
            found.setdefault("projector", name)
        elif isinstance(module, CLIPVisionModel):
            found.setdefault("tower", name)
        elif module is head:
            found.setdefault("head", name)
    if set(found) != {"text", "projector", "tower", "head"}:
        raise ConversionError(f"the installed transformers' LlavaForConditionalGeneration has an unexpected "
                              f"structure ({found}); this converter supports transformers 5.x")
    return found


def _rope_inv_freq(head_dim: int, theta: float) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))


def _replace_module(model, dotted: str, new) -> None:
    parent_name, _, child = dotted.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def convert_llava(src: str | Path, dst: str | Path, vision_tower: Optional[str] = None,
                  dtype: str = DEFAULT_DTYPE, pad_vocab_multiple: int = 64) -> ConversionResult:
    """Convert ``src`` (original LLaVA folder) into a new llava-hf folder ``dst``."""
    import transformers
    from accelerate import init_empty_weights
    from transformers import (
        AddedToken,
        CLIPImageProcessorPil,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    src, dst = Path(src).expanduser(), Path(dst).expanduser()
    if not src.is_dir():
        raise ConversionError(f"source folder {src} does not exist")
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise ConversionError(f"{dst} already exists; remove it or choose another output folder")
    if pad_vocab_multiple < 1:
        raise ConversionError(f"pad_vocab_multiple must be >= 1, got {pad_vocab_multiple}")
    try:  # before hours of reading and hashing the source
        check_writable(dst.parent)
    except OSError as err:
        raise ConversionError(f"cannot write the output {dst}: {err.filename or dst.parent} is not writable "
                              f"({err.strerror or err}); choose another DST") from None
    raw_config = read_json(src / "config.json", "an original LLaVA folder holds config.json")
    llama_kwargs = check_config(raw_config, src / "config.json")

    tower_ref = vision_tower or str(raw_config["mm_vision_tower"])
    try:
        tower_dir = resolve_tower(tower_ref)
    except ModelNotFoundError as err:
        raise ConversionError(f"vision tower: {err}") from None

    # weights (read, checked, hashed) ---------------------------------------------------------------
    weights = find_weight_files(src)
    hashes = sha256_files(weights.files, desc="hashing source weights")
    head_dim = llama_kwargs.get("head_dim") or llama_kwargs["hidden_size"] // llama_kwargs["num_attention_heads"]
    inv_freq = _rope_inv_freq(int(head_dim), llama_kwargs["rope_theta"])
    by_role: dict[str, dict[str, torch.Tensor]] = {"text": {}, "head": {}, "projector": {}}
    tower_tensors: dict[str, torch.Tensor] = {}
    dropped, unknown = [], []
    for key, tensor in iter_state(weights):
        if key.startswith("model.layers.") and key.endswith(".rotary_emb.inv_freq"):
            if tensor.shape != inv_freq.shape or not torch.allclose(tensor.double(), inv_freq, rtol=1e-3, atol=0):
                raise ConversionError(f"{key} does not match rope_theta={llama_kwargs['rope_theta']} and head_dim "
                                      f"{head_dim}; the checkpoint's rotary embedding differs from its config")
            dropped.append(key)
            continue
        if key.startswith(TOWER_PREFIX):
            tower_tensors[key[len(TOWER_PREFIX):]] = tensor
            continue
        for prefix, role, target in KEY_RULES:
            if key.startswith(prefix):
                by_role[role][target + key[len(prefix):]] = tensor
                break
        else:
            unknown.append(key)
    if unknown:
        raise ConversionError(f"{src}: {len(unknown)} weight keys of unknown role, e.g. {unknown[:5]} "
                              f"(supported: {[p for p, _, _ in KEY_RULES]} and {TOWER_PREFIX}*)")
    embed = by_role["text"].get("embed_tokens.weight")
    head = by_role["head"].get("weight")
    if embed is None or head is None:
        raise ConversionError(f"{src}: model.embed_tokens.weight and lm_head.weight are both required")
    if embed.shape != head.shape or embed.shape[0] != int(llama_kwargs["vocab_size"]):
        raise ConversionError(f"{src}: embed_tokens {tuple(embed.shape)} and lm_head {tuple(head.shape)} must both "
                              f"have vocab_size={llama_kwargs['vocab_size']} rows")
    target_dtype = getattr(torch, str(dtype), None)
    if target_dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ConversionError(f"unknown dtype {dtype!r} (float16, bfloat16 or float32)")
    context = raw_config.get(CONTEXT_FIELD)
    if context is not None and (isinstance(context, bool) or not isinstance(context, int) or context < 1):
        raise ConversionError(f"{src / 'config.json'}: {CONTEXT_FIELD} must be a positive integer, got {context!r}")

    # vision tower ---------------------------------------------------------------------------------
    tower = load_tower(tower_dir)
    tower_source = "tower"
    scratch = dst.parent / f".{dst.name}.converting-{os.getpid()}"
    if scratch.exists():
        shutil.rmtree(scratch)
    try:
        if tower_tensors:
            own = tower_from_checkpoint(tower.config, tower_tensors, scratch / "tower")
            if raw_config.get("unfreeze_mm_vision_tower", False):
                tower, tower_source = own, "checkpoint"
            else:
                ext = tower.state_dict()
                for name, value in own.state_dict().items():
                    if not torch.equal(ext[name].to(value.dtype), value):
                        raise ConversionError(
                            f"the checkpoint carries vision-tower weights that differ from {tower_dir} ({name}); "
                            f"LLaVA ignores them unless unfreeze_mm_vision_tower is set, so pass the tower they "
                            f"came from with --vision-tower")
            shutil.rmtree(scratch / "tower")
        vconf = tower.config
        if int(vconf.hidden_size) != int(raw_config["mm_hidden_size"]):
            raise ConversionError(f"mm_hidden_size={raw_config['mm_hidden_size']} but the tower {tower_dir} "
                                  f"is {vconf.hidden_size} wide; wrong --vision-tower?")
        if not (tower_dir / "preprocessor_config.json").is_file():
            raise ConversionError(f"{tower_dir} has no preprocessor_config.json (the tower's image processor)")
        image_processor = CLIPImageProcessorPil.from_pretrained(tower_dir)
        crop = image_processor.crop_size
        if (int(crop["height"]), int(crop["width"])) != (int(vconf.image_size),) * 2:
            raise ConversionError(f"{tower_dir}: the image processor crops {crop}, the tower takes "
                                  f"{vconf.image_size}x{vconf.image_size} images")

        # tokenizer: the source's, plus <image> ------------------------------------------------------
        tok_cfg = read_json(src / "tokenizer_config.json", "the tokenizer files are part of a LLaVA folder")
        tok_class = str(tok_cfg.get("tokenizer_class", "LlamaTokenizer")).removesuffix("Fast")
        if tok_class != "LlamaTokenizer":
            raise ConversionError(f"{src}: tokenizer_class {tok_cfg.get('tokenizer_class')!r}; only Llama "
                                  f"tokenizers (LLaVA-1.5) are supported")
        tokenizer = transformers.LlamaTokenizer.from_pretrained(src)
        source_tokens = len(tokenizer)
        if IMAGE_TOKEN in tokenizer.get_vocab():
            raise ConversionError(f"{src}: the tokenizer already has a {IMAGE_TOKEN!r} token")
        if source_tokens > embed.shape[0]:
            raise ConversionError(f"{src}: the tokenizer has {source_tokens} tokens but the embedding only "
                                  f"{embed.shape[0]} rows")
        pad_note = "source"
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.unk_token
            pad_note = "none in the source: set to the unk token (LLaVA's v1 convention)"
        tokenizer.add_tokens(AddedToken(IMAGE_TOKEN, special=True, normalized=False), special_tokens=True)
        image_id = int(tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))
        old_rows = int(embed.shape[0])
        rows = max(old_rows, len(tokenizer))
        rows = int(math.ceil(rows / pad_vocab_multiple) * pad_vocab_multiple)

        def grow(weight: torch.Tensor) -> torch.Tensor:
            mean = weight.float().mean(dim=0, keepdim=True)
            return torch.cat([weight, mean.expand(rows - old_rows, -1).to(weight.dtype)], dim=0)

        by_role["text"]["embed_tokens.weight"] = grow(embed)
        by_role["head"]["weight"] = grow(head)

        # the llava-hf model ---------------------------------------------------------------------------
        patch = int(vconf.patch_size)
        text_config = LlamaConfig(**{**llama_kwargs, "vocab_size": rows, "pad_token_id": tokenizer.pad_token_id,
                                     "tie_word_embeddings": False})
        config = LlavaConfig(
            vision_config=vconf, text_config=text_config, image_token_index=image_id,
            vision_feature_layer=-2, vision_feature_select_strategy="default", projector_hidden_act="gelu",
            image_seq_length=(int(vconf.image_size) // patch) ** 2, multimodal_projector_bias=True,
            tie_word_embeddings=False,
        )
        if context is not None:
            setattr(config, CONTEXT_FIELD, int(context))
        with init_empty_weights():
            model = LlavaForConditionalGeneration(config)
        prefixes = _module_prefixes(model)
        _replace_module(model, prefixes["tower"], tower)
        mapped = {}
        mapping = []
        for prefix, role, target in KEY_RULES:
            full = f"{prefixes[role]}.{target}" if target else f"{prefixes[role]}."
            mapping.append({"source": prefix, "target": full})
        mapping.append({"source": f"{TOWER_PREFIX} (or the tower folder's CLIPVisionModel)",
                        "target": f"{prefixes['tower']}."})
        for role, tensors in by_role.items():
            for name, tensor in tensors.items():
                mapped[f"{prefixes[role]}.{name}"] = tensor
        try:
            result = model.load_state_dict(mapped, strict=False, assign=True)
        except RuntimeError as err:
            raise ConversionError(f"{src}: weights do not fit the model its config describes: {err}") from None
        tower_keys = {f"{prefixes['tower']}.{k}" for k in tower.state_dict()}
        missing = sorted(set(result.missing_keys) - tower_keys)
        if result.unexpected_keys or missing:
            raise ConversionError(f"{src}: unexpected weights {sorted(result.unexpected_keys)[:5]}, "
                                  f"missing weights {missing[:5]} for the model its config describes")
        on_meta = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
        if on_meta:
            raise ConversionError(f"internal: tensors left unset after conversion: {on_meta[:5]}")
        model = model.to(target_dtype).eval()
        model.config.dtype = target_dtype
        processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=patch,
                                   vision_feature_select_strategy="default", num_additional_image_tokens=1)

        # write -------------------------------------------------------------------------------------------
        scratch.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(scratch)
        processor.save_pretrained(scratch)
        tok_files = [p for p in sorted(src.iterdir()) if p.is_file() and
                     (p.name.startswith(("tokenizer", "special_tokens_map", "added_tokens")))]
        name = model_name_from_path(src.resolve())
        record = {
            "format": FORMAT, "version": 1,
            "source": {"path": str(src.resolve()), "config": raw_config, "weight_format": weights.format,
                       "weights_sha256": hashes, "ignored_weight_files": weights.ignored,
                       "tokenizer_sha256": sha256_files(tok_files, desc="hashing tokenizer")},
            "vision_tower": {"id": tower_ref, "path": str(tower_dir), "weights_from": tower_source,
                             "weights_sha256": sha256_files(_weight_files_of(tower_dir), desc="hashing tower")},
            "key_mapping": mapping,
            "dropped_keys": {"rotary inv_freq (recomputed from rope_theta, checked equal)": len(dropped)},
            "tokens": {"source_tokenizer_size": source_tokens, "source_embedding_rows": old_rows,
                       "image_token": IMAGE_TOKEN, "image_token_id": image_id, "pad_token": tokenizer.pad_token,
                       "pad_token_id": tokenizer.pad_token_id, "pad_token_source": pad_note,
                       "embedding_rows": rows, "new_rows": [old_rows, rows],
                       "new_rows_init": "mean of the source rows (embed_tokens and lm_head)"},
            "image_tokens_per_image": (int(vconf.image_size) // patch) ** 2,
            "dtype": str(target_dtype).removeprefix("torch."),
            "context": {CONTEXT_FIELD: context, "max_position_embeddings": llama_kwargs["max_position_embeddings"],
                        "rule": "longer inputs are refused by the guidance encoder (LLaVA truncates them)"},
            "conversation_by_folder_name": {"model_name": name, "conversation": conversation_for_name(name)},
            "transformers_version": transformers.__version__,
            "torch_version": torch.__version__,
        }
        (scratch / "conversion.json").write_text(json.dumps(record, indent=2, sort_keys=False) + "\n")
        if dst.exists():
            dst.rmdir()  # empty (checked above)
        os.replace(scratch, dst)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    return ConversionResult(dst=dst, record=record)
