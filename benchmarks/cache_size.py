"""Bytes per pair on disk, 16-bit vs 8-bit guidance, and the projected cache size per shipped recipe.

    python benchmarks/cache_size.py
    python benchmarks/cache_size.py --pairs 851293 --text-tokens 90 --image-side 1024
    python benchmarks/cache_size.py --hidden-size sdxl_llava13b=5120   # a model id we do not know

Measured: caches of full-size samples (LLaVA-13B guidance 656 x 5120 + 2 x 16 x 2048 IP tokens) are
written with the real writer, once with float16 guidance and once with float8_e4m3fn guidance +
per-token float32 scales + 8 outlier channels kept 16-bit; (tar + index files + manifest) / raw
tensor bytes - 1 is the format
overhead, (bytes on disk per pair, fp8) / (fp16) the saving. Projected: for each
configs/preprocess/*.yaml recipe (the tiny demo excepted), raw bytes per pair from its encoders'
shapes plus the measured fixed per-pair overhead, for both guidance dtypes, times the number of
Pick-a-Pic v2 train pairs. Token counts are estimates (stated in the output): LLaVA-1.5 has 576
image tokens (336 px / 14 px patches); Qwen2.5-VL has (H/28) x (W/28) after its resize rule; the
question adds roughly `--text-tokens`.

The MLLM's hidden size comes from, in order: ``--hidden-size RECIPE=N``; an ``encoders.mllm.
hidden_size`` key in the recipe (if the schema has one); the model's own ``config.json`` when
``encoders.mllm.path``/``model`` is a local folder; the table of public checkpoints below. An
unknown model is an error that says which of these to use.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path
from typing import Optional

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from img_lightning.cache import CacheWriter, Manifest, cache_key  # noqa: E402
from img_lightning.cache.format import FP8_DTYPE  # noqa: E402
from img_lightning.cache.quant import DEFAULT_OUTLIER_CHANNELS, to_storage  # noqa: E402
from img_lightning.config.loading import load_config  # noqa: E402
from img_lightning.config.preprocess import PreprocessConfig  # noqa: E402

# Facts about the public checkpoints (hidden sizes from their configs). The IMG-finetuned
# LLaVA-1.5-13B (HF `shi-labs/IMG`, folder `llava/`) keeps LLaVA-1.5-13B's shape.
MLLM_HIDDEN = {
    "llava-hf/llava-1.5-7b-hf": 4096,
    "llava-hf/llava-1.5-13b-hf": 5120,
    "liuhaotian/llava-v1.5-7b": 4096,
    "liuhaotian/llava-v1.5-13b": 5120,
    "shi-labs/IMG": 5120,
    "shi-labs/IMG/llava": 5120,  # the IMG-finetuned LLaVA-1.5-13B (its llava/ folder), as the recipes name it
    "Qwen/Qwen2.5-VL-3B-Instruct": 2048,
    "Qwen/Qwen2.5-VL-7B-Instruct": 3584,
    "Qwen/Qwen2.5-VL-72B-Instruct": 8192,
}
# IP tokens per image: SDXL IP-Adapter-Plus (Resampler, 16 x 2048); XLabs FLUX IP-Adapter v1
# (ImageProjModel, 4 x 4096).
IP_SHAPE = {"sdxl_plus": (16, 2048), "flux_xlabs": (4, 4096)}
DTYPE_BYTES = {"float16": 2, "bfloat16": 2}
MEASURE_SHAPE = (656, 5120, (16, 2048))  # tokens, hidden, IP: the paper recipe


def _value(x):
    return getattr(x, "value", x)  # Enum-typed config fields and plain strings alike


def _hidden_from_folder(folder: Optional[str]) -> Optional[int]:
    config = Path(folder) / "config.json" if folder else None
    if config is None or not config.is_file():
        return None
    raw = json.loads(config.read_text(encoding="utf-8"))
    text = raw.get("text_config", raw)
    return int(text["hidden_size"]) if "hidden_size" in text else None


def mllm_hidden_size(name: str, cfg, explicit: dict[str, int]) -> int:
    mllm = cfg.encoders.mllm
    if name in explicit:
        return explicit[name]
    if mllm.get("hidden_size"):
        return int(mllm.get("hidden_size"))
    for folder in (mllm.get("path"), mllm.model):
        hidden = _hidden_from_folder(folder)
        if hidden is not None:
            return hidden
    if mllm.model in MLLM_HIDDEN:
        return MLLM_HIDDEN[mllm.model]
    raise SystemExit(
        f"error: recipe {name}: unknown MLLM {mllm.model!r}, so its hidden size is unknown. Pass "
        f"--hidden-size {name}=N, point encoders.mllm.path at the model folder (its config.json is read), "
        f"or add the id to MLLM_HIDDEN in {Path(__file__).name}"
    )


def qwen_image_tokens(side: int, min_pixels: int | None, max_pixels: int | None) -> int:
    """Qwen2.5-VL's resize rule for a square image: sides to multiples of 28 within the pixel budget;
    one merged token per 28 x 28 patch."""
    min_pixels = min_pixels or 56 * 56
    max_pixels = max_pixels or 12_845_056  # the processor default (16384 patches of 28 x 28)
    h = max(28, round(side / 28) * 28)
    if h * h > max_pixels:
        h = math.floor(side / math.sqrt(side * side / max_pixels) / 28) * 28
    elif h * h < min_pixels:
        h = math.ceil(side * math.sqrt(min_pixels / (side * side)) / 28) * 28
    return (h // 28) ** 2


def recipe_shapes(name: str, cfg, text_tokens: int, image_side: int, explicit: dict[str, int]):
    mllm = cfg.encoders.mllm
    hidden = mllm_hidden_size(name, cfg, explicit)
    if _value(mllm.backend) == "llava":
        image_tokens, note = 576, "576 image"
    else:
        image_tokens = qwen_image_tokens(image_side, mllm.get("min_pixels"), mllm.get("max_pixels"))
        note = f"{image_tokens} image @{image_side}px"
    kind = _value(cfg.encoders.ip.kind)
    if kind not in IP_SHAPE:
        raise SystemExit(f"error: recipe {name}: unknown IP encoder kind {kind!r}; add its token shape to IP_SHAPE")
    return hidden, image_tokens + text_tokens, IP_SHAPE[kind], DTYPE_BYTES[_value(cfg.cache.dtype)], note


def raw_bytes(tokens: int, hidden: int, ip: tuple[int, int], elsize: int, fp8: bool,
              outliers: int = DEFAULT_OUTLIER_CHANNELS) -> int:
    """Tensor bytes of one pair; 8-bit guidance: 1 B per value, a float32 scale per token, and the
    16-bit outlier channels (values + int32 indices)."""
    if fp8:
        guidance = tokens * hidden + 4 * tokens + tokens * outliers * elsize + 4 * outliers
    else:
        guidance = tokens * hidden * elsize
    return guidance + 2 * ip[0] * ip[1] * elsize


def measure(pairs: int, tokens: int, hidden: int, ip: tuple[int, int], fp8: bool) -> float:
    """Bytes on disk per pair (shards + index files + manifest) of a real cache of this shape."""
    recipe = {"benchmark": "cache_size", "fp8": fp8}
    raw = {"guidance": torch.randn(tokens, hidden), "ip_lose": torch.zeros(*ip), "ip_win": torch.ones(*ip)}
    stored = to_storage(raw, torch.float16, FP8_DTYPE if fp8 else None, "size")
    with tempfile.TemporaryDirectory() as tmp:
        with CacheWriter(tmp, cache_key(recipe), recipe, shard_size=16) as writer:
            for i in range(pairs):
                meta = {"pair_id": f"{i:012d}", "caption": "a caption of typical length " * 3,
                        "winner_uid": "f3b9c7a2-1d2e-4b7f-9a41-0c6d8e5f7a10",
                        "loser_uid": "0a1b2c3d-4e5f-6071-8293-a4b5c6d7e8f9",
                        "winner_index": 0, "template_id": 42, "num_tokens": tokens}
                writer.write(f"{i:09d}", stored, meta)
        disk = sum(p.stat().st_size for p in Path(tmp).iterdir())
        assert Manifest.load(tmp).num_samples == pairs
    return disk / pairs


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=851_293, help="Pick-a-Pic v2 train pairs (labelled, no ties)")
    parser.add_argument("--text-tokens", type=int, default=80, help="estimated question tokens (template + caption)")
    parser.add_argument("--image-side", type=int, default=768, help="Pick-a-Pic image side for Qwen's token count")
    parser.add_argument("--measure-pairs", type=int, default=48)
    parser.add_argument("--hidden-size", action="append", default=[], metavar="RECIPE=N",
                        help="hidden size of a recipe's MLLM (for model ids not in the built-in table)")
    args = parser.parse_args(argv)
    explicit = {}
    for item in args.hidden_size:
        name, _, value = item.partition("=")
        if not value.isdigit():
            parser.error(f"--hidden-size expects RECIPE=N, got {item!r}")
        explicit[name] = int(value)

    tokens, hidden, ip = MEASURE_SHAPE
    fixed = {}
    print(f"measured on {args.measure_pairs} full-size pairs ({tokens} x {hidden} guidance + 2 x {ip[0]} x {ip[1]} "
          f"IP tokens in float16):")
    for fp8 in (False, True):
        disk = measure(args.measure_pairs, tokens, hidden, ip, fp8)
        raw = raw_bytes(tokens, hidden, ip, 2, fp8)
        fixed[fp8] = disk - raw
        label = "float8_e4m3fn (+scales, 8 ch.)" if fp8 else "float16"
        print(f"  guidance {label:<30} raw tensor bytes/pair {raw:>10,.0f}; on disk {disk:>10,.0f} "
              f"(tar + index + manifest); overhead {100 * (disk / raw - 1):.3f}% ({fixed[fp8]:,.0f} B/pair)")
        fixed[(fp8, "disk")] = disk
    print(f"  measured ratio fp8 / fp16 bytes on disk per pair: {fixed[(True, 'disk')] / fixed[(False, 'disk')]:.4f}")

    print(f"\nprojected cache for {args.pairs:,} pairs (+{args.text_tokens} text tokens per question):")
    print(f"{'recipe':<28} {'tokens':>22} {'hidden':>6} {'IP':>7} {'16-bit MB':>9} {'TB':>5} "
          f"{'fp8 MB':>7} {'TB':>5} {'fp8/16':>6}")
    worst = 0.0
    for path in sorted((REPO / "configs" / "preprocess").glob("*.yaml")):
        if path.stem == "demo":
            continue
        cfg = load_config(PreprocessConfig, [path], require_complete=False)
        hidden, tokens, ip, elsize, note = recipe_shapes(path.stem, cfg, args.text_tokens, args.image_side, explicit)
        per16 = raw_bytes(tokens, hidden, ip, elsize, False) + fixed[False]
        per8 = raw_bytes(tokens, hidden, ip, elsize, True) + fixed[True]
        worst = max(worst, per8 / per16)
        print(f"{path.stem:<28} {f'{tokens} ({note})':>22} {hidden:>6} {f'{ip[0]}x{ip[1]}':>7} "
              f"{per16 / 1e6:>9.2f} {per16 * args.pairs / 1e12:>5.2f} {per8 / 1e6:>7.2f} "
              f"{per8 * args.pairs / 1e12:>5.2f} {per8 / per16:>6.3f}")
    print(f"largest fp8 / 16-bit ratio over the recipes: {worst:.3f} (goal <= 0.52)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
