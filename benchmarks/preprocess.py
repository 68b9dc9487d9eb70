"""How close does `img-preprocess` get to the speed of its encoders alone?

Measured in one process on the same models and the same pairs:

* end-to-end: ``run_preprocess`` into a fresh directory (parquet reads, JPEG decoding, processors,
  encoders, fp16 cast, shard writing, index/sha256), model loading and the metadata scan excluded;
* encoders: the same pairs, images already decoded in memory, the same batches through
  ``FeatureExtractor.prepare`` + ``forward`` (exactly the encoder calls, nothing else);
* forward only: ``forward`` on batches prepared beforehand (pure model compute).

Prints pairs/s of each and the ratios end-to-end / encoders (the target: >= 0.85) and
end-to-end / forward-only. Tiny models and a generated demo parquet by default; give a recipe
and paths to measure real models, e.g.::

    python benchmarks/preprocess.py --config configs/preprocess/sdxl_llava13b.yaml \\
        --input /data/pickapic_v2/data/validation-00000-of-00005.parquet --pairs 512 \\
        encoders.mllm.path=/models/llava-1.5-13b-hf encoders.ip.image_encoder_path=/models/IP-Adapter \\
        encoders.ip.adapter_path=/models/IP-Adapter
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _cfg(args, workdir: Path, out: Path):
    from img_lightning.config.loading import load_config
    from img_lightning.config.preprocess import PreprocessConfig

    overrides = [f"data.input={args.input}", f"data.output={out}", f"data.limit={args.pairs}", *args.overrides]
    if args.tiny:
        from img_lightning.tiny.world import build_tiny_world, preprocess_overrides

        overrides = preprocess_overrides(build_tiny_world(workdir / "tiny")) + overrides
    return load_config(PreprocessConfig, [args.config], overrides)


def encoder_only(extractor, table, indices, batch_size: int):
    """(seconds for prepare+forward, seconds for forward only) over ``indices`` in batches."""
    from preprocessing.extract import PairItem
    from preprocessing.pickapic import ImageFetcher, decode_image

    raw = ImageFetcher(table, 64).fetch(indices)
    decoded = []
    for i, (w, lose) in zip(indices, raw, strict=True):
        wi, li = decode_image(w)[0], decode_image(lose)[0]
        if wi is not None and li is not None:
            decoded.append((i, wi, li))

    def items(chunk):
        return [PairItem(i, table.pair_id[i], table.caption[i], extractor.template_id(table.pair_id[i]), {}, w, lose)
                for i, w, lose in chunk]

    chunks = [decoded[j : j + batch_size] for j in range(0, len(decoded), batch_size)]
    extractor.forward(extractor.prepare(items(chunks[0])))  # warm-up
    t0 = time.perf_counter()
    for c in chunks:
        extractor.forward(extractor.prepare(items(c)))
    encode_s = time.perf_counter() - t0
    prepared = [extractor.prepare(items(c)) for c in chunks]
    t0 = time.perf_counter()
    for b in prepared:
        extractor.forward(b)
    forward_s = time.perf_counter() - t0
    return encode_s, forward_s, len(decoded)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(REPO / "configs/preprocess/demo.yaml"), help="preprocessing recipe")
    p.add_argument("--input", default=None, help="Pick-a-Pic parquet (default: a generated demo parquet)")
    p.add_argument("--pairs", type=int, default=384, help="pairs to process")
    p.add_argument("--repeats", type=int, default=3, help="measurements of each kind (the median is reported)")
    p.add_argument("--workdir", default=None, help="scratch directory (default: a temporary one)")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    p.add_argument("overrides", nargs="*", help="key=value config overrides (model paths, batch sizes, device)")
    args = p.parse_args(argv)
    local_mllm = any(o.startswith("encoders.mllm.path=") for o in args.overrides)
    args.tiny = args.config.endswith("demo.yaml") and not local_mllm
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from preprocessing.extract import FeatureExtractor
    from preprocessing.pickapic import scan_pairs
    from preprocessing.plan import build_plan
    from preprocessing.run import run_preprocess

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="img-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    if args.input is None:
        from preprocessing.demo_data import write_demo_parquet

        args.input = str(workdir / "demo.parquet")
        write_demo_parquet(args.input, args.pairs)
    cfg = _cfg(args, workdir, workdir / "cache-0")
    extractor = FeatureExtractor.from_config(cfg.encoders)
    table = scan_pairs(cfg.data.input, split=cfg.data.split, limit=cfg.data.limit)
    plan = build_plan(table, cfg.cache.shard_size, cfg.cache.seed, cfg.cache.shuffle)
    indices = [int(i) for i in plan.order]  # the same pairs in the same order as the run

    import torch

    if cfg.run.torch_threads:  # what run_preprocess uses, so both sides get the same threads
        torch.set_num_threads(int(cfg.run.torch_threads))
    e2e, enc, fwd = [], [], []
    for r in range(args.repeats):
        encode_s, forward_s, n_ok = encoder_only(extractor, table, indices, extractor.batch_size)
        enc.append(n_ok / encode_s)
        fwd.append(n_ok / forward_s)
        out = workdir / f"cache-{r}"
        shutil.rmtree(out, ignore_errors=True)
        cfg.data.output = str(out)
        result = run_preprocess(cfg, progress=False, extractor=extractor)
        e2e.append(result.pairs_written / result.seconds)
    fig = {
        "device": str(extractor.mllm.device),
        "torch_threads": torch.get_num_threads(),
        "pairs": len(indices),
        "batch_size": extractor.batch_size,
        "end_to_end_pairs_per_s": statistics.median(e2e),
        "encoder_pairs_per_s": statistics.median(enc),
        "forward_only_pairs_per_s": statistics.median(fwd),
        "runs": {"end_to_end": e2e, "encoder": enc, "forward_only": fwd},
    }
    fig["ratio_end_to_end_over_encoder"] = fig["end_to_end_pairs_per_s"] / fig["encoder_pairs_per_s"]
    fig["ratio_end_to_end_over_forward_only"] = fig["end_to_end_pairs_per_s"] / fig["forward_only_pairs_per_s"]
    print(f"pairs {fig['pairs']} on {fig['device']}, batch {fig['batch_size']}, median of {args.repeats}")
    print(f"end-to-end       {fig['end_to_end_pairs_per_s']:9.1f} pairs/s")
    print(f"encoders         {fig['encoder_pairs_per_s']:9.1f} pairs/s  (prepare + forward)")
    print(f"forward only     {fig['forward_only_pairs_per_s']:9.1f} pairs/s")
    print(f"ratio end-to-end / encoders     = {fig['ratio_end_to_end_over_encoder']:.3f}  (target >= 0.85)")
    print(f"ratio end-to-end / forward only = {fig['ratio_end_to_end_over_forward_only']:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(fig, indent=1))
    if args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
