"""Bytes per pair on disk vs raw tensor bytes, and the projected cache size per shipped recipe.

    python benchmarks/cache_size.py
    python benchmarks/cache_size.py --pairs 851293 --text-tokens 90 --image-side 1024

Measured: a cache of full-size samples (LLaVA-13B guidance 650 x 5120 + 2 x 16 x 2048 IP tokens,
fp16) is written with the real writer; (tar + index files + manifest) / raw tensor bytes - 1 is the
format overhead. Projected: for each configs/preprocess/*.yaml recipe (the tiny demo excepted),
raw bytes per pair from its encoders' shapes plus the measured fixed per-pair overhead, times the
number of Pick-a-Pic v2 train pairs. Token counts are estimates (stated in the output): LLaVA-1.5
has 576 image tokens (336 px / 14 px patches); Qwen2.5-VL has (H/28) x (W/28) after its resize
rule; the question adds roughly `--text-tokens`.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from img_lightning.cache import CacheWriter, Manifest, cache_key  # noqa: E402
from img_lightning.config.loading import load_config  # noqa: E402
from img_lightning.config.preprocess import PreprocessConfig  # noqa: E402

# Facts about the public checkpoints (hidden sizes from their configs).
MLLM_HIDDEN = {
    "llava-hf/llava-1.5-7b-hf": 4096,
    "llava-hf/llava-1.5-13b-hf": 5120,
    "Qwen/Qwen2.5-VL-3B-Instruct": 2048,
    "Qwen/Qwen2.5-VL-7B-Instruct": 3584,
    "Qwen/Qwen2.5-VL-72B-Instruct": 8192,
}
IP_SHAPE = {"sdxl_plus": (16, 2048), "flux_xlabs": (16, 4096)}
DTYPE_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4}


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


def recipe_shapes(cfg, text_tokens: int, image_side: int) -> tuple[int, int, tuple[int, int], int, str]:
    mllm = cfg.encoders.mllm
    hidden = MLLM_HIDDEN.get(mllm.model)
    if hidden is None:
        raise KeyError(f"unknown MLLM {mllm.model}: add its hidden size to MLLM_HIDDEN")
    if mllm.backend == "llava":
        image_tokens, note = 576, "576 image"
    else:
        image_tokens = qwen_image_tokens(image_side, mllm.get("min_pixels"), mllm.get("max_pixels"))
        note = f"{image_tokens} image @{image_side}px"
    return hidden, image_tokens + text_tokens, IP_SHAPE[cfg.encoders.ip.kind], DTYPE_BYTES[cfg.cache.dtype], note


def measure_overhead(pairs: int, tokens: int, hidden: int, ip: tuple[int, int]) -> tuple[float, float]:
    """Returns (bytes on disk per pair, raw tensor bytes per pair) for a real cache of this shape."""
    recipe = {"benchmark": "cache_size"}
    g = torch.zeros(tokens, hidden, dtype=torch.float16)
    lose, win = torch.zeros(*ip, dtype=torch.float16), torch.ones(*ip, dtype=torch.float16)
    with tempfile.TemporaryDirectory() as tmp:
        with CacheWriter(tmp, cache_key(recipe), recipe, shard_size=16) as writer:
            for i in range(pairs):
                meta = {"pair_id": f"{i:012d}", "caption": "a caption of typical length " * 3,
                        "winner_uid": "f3b9c7a2-1d2e-4b7f-9a41-0c6d8e5f7a10", "loser_uid": "0a1b2c3d-4e5f-6071-8293-a4b5c6d7e8f9",
                        "winner_index": 0, "template_id": 42, "num_tokens": tokens}
                writer.write(f"{i:09d}", {"guidance": g, "ip_lose": lose, "ip_win": win}, meta)
        disk = sum(p.stat().st_size for p in Path(tmp).iterdir())
        assert Manifest.load(tmp).num_samples == pairs
    raw = (tokens * hidden + 2 * ip[0] * ip[1]) * 2
    return disk / pairs, raw


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=851_293, help="Pick-a-Pic v2 train pairs (labelled, no ties)")
    parser.add_argument("--text-tokens", type=int, default=80, help="estimated question tokens (template + caption)")
    parser.add_argument("--image-side", type=int, default=768, help="Pick-a-Pic image side for Qwen's token count")
    parser.add_argument("--measure-pairs", type=int, default=48)
    args = parser.parse_args(argv)

    disk, raw = measure_overhead(args.measure_pairs, 650, 5120, (16, 2048))
    fixed = disk - raw
    print(f"measured on {args.measure_pairs} full-size pairs (650 x 5120 guidance + 2 x 16 x 2048 IP, fp16):")
    print(f"  raw tensor bytes/pair {raw:,.0f}; on disk {disk:,.0f} (tar + index + manifest); "
          f"overhead {100 * (disk / raw - 1):.3f}% ({fixed:,.0f} B/pair)")
    print(f"\nprojected cache for {args.pairs:,} pairs (+{args.text_tokens} text tokens per question):")
    print(f"{'recipe':<22} {'tokens':>24} {'hidden':>6} {'IP':>9} {'MB/pair':>8} {'total TB':>9}")
    for path in sorted((REPO / "configs" / "preprocess").glob("*.yaml")):
        if path.stem == "demo":
            continue
        cfg = load_config(PreprocessConfig, [path], require_complete=False)
        hidden, tokens, ip, elsize, note = recipe_shapes(cfg, args.text_tokens, args.image_side)
        per_pair = (tokens * hidden + 2 * ip[0] * ip[1]) * elsize + fixed
        print(f"{path.stem:<22} {f'{tokens} ({note})':>24} {hidden:>6} {f'{ip[0]}x{ip[1]}':>9} "
              f"{per_pair / 1e6:>8.2f} {per_pair * args.pairs / 1e12:>9.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
