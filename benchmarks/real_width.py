"""What the paper's run costs: every stage on the real-width world, the FLOPs of the full-size
models counted from their configs, and the paper's run projected in GPU-hours.

    python benchmarks/real_width.py                       # builds the world in a temp dir (~5 GB), minutes
    python benchmarks/real_width.py --out /tmp/rw --keep  # keep (and next time reuse) models and outputs
    python benchmarks/real_width.py --projection-only     # the FLOP table and the projection (seconds)

1. Measured, on this machine: the stages of ``img-demo --real-width`` (models with the released
   widths and 1-2 layers, ``preprocessing/demo_real_width.py``), each in its own process so its peak
   RSS is its own: wall time, the steady-state time per item (the stage's own throughput figure:
   preprocessing's extraction loop, the trainers' ``perf/*`` logs; fixed costs such as loading
   models excluded), peak RSS, bytes written per item, and the FLOPs per item of the real-width
   models with the rate they imply.
2. Counted: FLOPs per item of the full-size models (``benchmarks/flop_model.py`` says what is
   counted and what approximated): LLaVA-1.5-13B guidance per pair, IP-Adapter-Plus per image, the
   aligner's training step per pair, the MLLM finetune per triplet, an evaluated prompt with SDXL
   (base + control + IMG, 50 steps, CFG) and with FLUX.1-dev (30 steps, true CFG).
3. Projected: the paper's run - 313K finetuning triplets (1 epoch, full finetune with gradient
   checkpointing), 851K pairs preprocessed, 100K aligner steps at global batch 8, and the
   evaluation sets - in GPU-hours on A100 and H100 at a stated MFU, every line's arithmetic printed.
   A projection, not a measurement: no GPU was available to calibrate the MFU (see gpu_suite.py).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import flop_model as fm  # noqa: E402

from img_lightning.tiny import sizes  # noqa: E402

# -- the paper's run -----------------------------------------------------------------------------
PAPER = {
    "finetune_triplets": 313_000,  # CLIP-filtered InstructPix2Pix, 1 epoch (paper App. A.3)
    "pairs": 851_000,  # labelled, non-tied Pick-a-Pic v2 train pairs
    "steps": 100_000,
    "global_batch": 8,
    # T2I-CompBench 6 x 300 val, HPD v2 4 x 800, PartiPrompts 1632, Pick-a-Pic test 500, DrawBench 200
    "eval_prompts": {"t2i_compbench": 1800, "hpd_v2": 3200, "partiprompts": 1632, "pickapic_test": 500,
                     "drawbench": 200},
}
GUIDANCE_TOKENS = 670  # ~576 image tokens + the v0 system prompt and a released question (sdxl_llava13b.yaml)
ANSWER_TOKENS = 20  # an edit instruction, the finetune's target
SDXL_EVAL = dict(steps=50, cfg=2, size=1024, arms=3)  # base, control, IMG; CFG: 2 UNet evaluations per step
FLUX_EVAL = dict(steps=30, cfg=2, size=1024, arms=3)  # true CFG from step 1 on every arm (the released demo)
GPUS = {"A100": 312e12, "H100": 989e12}  # dense bf16 peak FLOP/s (SXM)
STAGE_ORDER = ("data", "finetune", "preprocess", "train", "eval")


def tensor_bytes(tokens: float) -> float:
    """A pair's tensor bytes in the paper's cache: bf16 guidance [T, 5120] + fp16 IP tokens 2 x [16, 2048]."""
    return tokens * 5120 * 2 + 2 * 16 * 2048 * 2


def full_flops(guidance_tokens: int = GUIDANCE_TOKENS) -> dict[str, float]:
    """FLOPs per item of the full-size models (flop_model.py)."""
    llava, text = sizes.LLAVA_15_13B, guidance_tokens - (sizes.CLIP_L_336.tokens - 1)
    ip = fm.ip_plus(sizes.CLIP_H_224, sizes.IP_PLUS_RESAMPLER, sizes.SDXL_BASE.cross_attention_dim)
    aligner = fm.aligner(sizes.ALIGNER_SDXL, guidance_tokens)
    guidance = fm.llava(llava, text)
    ft_tokens = guidance_tokens + ANSWER_TOKENS
    # full finetune, gradient checkpointing: LM forward + recompute + backward (2x) = 4 forwards; the
    # projector 3; the frozen tower 1
    patches = sizes.CLIP_L_336.tokens - 1
    projector = fm.llava(llava, 0) - fm.clip_vision(llava.vision) - fm.llama(llava.text, patches)
    finetune = (4 * fm.llama(llava.text, ft_tokens, logits_tokens=ft_tokens) + 3 * projector
                + fm.clip_vision(llava.vision))
    s = SDXL_EVAL
    img_features = guidance + ip + 3 * aligner  # the MLLM reads the base image; the aligner runs 3 passes
    sdxl_prompt = (s["arms"] * s["steps"] * s["cfg"] * fm.sdxl_unet(sizes.SDXL_BASE, s["size"], s["size"], ip_tokens=16)
                   + img_features)
    f = FLUX_EVAL
    flux_ip = fm.clip_vision(sizes.CLIP_L_224, projection=True) + fm.linear(1, 768, 4 * 4096)
    flux_aligner = fm.aligner(sizes.AlignerSize(5120, 4096, 4, 20, 64, 4), guidance_tokens)
    flux_step = fm.flux_transformer(sizes.FLUX_1_DEV, f["size"], f["size"], ip_tokens=4)
    flux_prompt = f["arms"] * f["steps"] * f["cfg"] * flux_step + guidance + flux_ip + 3 * flux_aligner
    return {"guidance (LLaVA-13B fwd)": guidance, "ip (IP-Adapter-Plus, 1 image)": ip,
            "preprocess / pair": guidance + 2 * ip, "aligner fwd": aligner,
            "train / pair (fwd, ref fwd, bwd)": 4 * aligner, "finetune / triplet": finetune,
            "eval / prompt, SDXL": sdxl_prompt, "eval / prompt, FLUX": flux_prompt}


def real_width_flops(tokens_per_pair: float, eval_size: int = 64, eval_steps: int = 2) -> dict[str, float]:
    """FLOPs per item of the real-width models as the CPU stages run them (bf16 LoRA finetune:
    forward + input-gradient backward of the frozen LM = 2 forwards; the projector 3; the tower 1)."""
    llava = sizes.REAL_WIDTH_LLAVA
    text = tokens_per_pair - (llava.vision.tokens - 1)
    ip = fm.ip_plus(sizes.REAL_WIDTH_IP_VISION, sizes.IP_PLUS_RESAMPLER, 2048)
    patches = llava.vision.tokens - 1
    projector = fm.llava(llava, 0) - fm.clip_vision(llava.vision) - fm.llama(llava.text, patches)
    ft_tokens = tokens_per_pair + 10
    unet = fm.sdxl_unet(sizes.REAL_WIDTH_SDXL, eval_size, eval_size, ip_tokens=16)
    return {
        "finetune": 2 * fm.llama(llava.text, ft_tokens, ft_tokens) + 3 * projector + fm.clip_vision(llava.vision),
        "preprocess": fm.llava(llava, text) + 2 * ip,
        "train": 4 * fm.aligner(sizes.ALIGNER_SDXL, tokens_per_pair),
        "eval": (3 * eval_steps * 2 * unet + fm.llava(llava, text) + ip
                 + 3 * fm.aligner(sizes.ALIGNER_SDXL, tokens_per_pair)),
    }


# -- measuring the stages ------------------------------------------------------------------------
def _last_scalar(event_dir: Path, tag: str) -> Optional[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(event_dir)).Reload()
    return float(acc.Scalars(tag)[-1].value) if tag in acc.Tags().get("scalars", []) else None


def _dir_bytes(paths: list[Path]) -> int:
    return sum(f.stat().st_size for p in paths for f in Path(p).rglob("*") if f.is_file() and not f.is_symlink())


def _stage_child(stage: str, run_kwargs: dict, conn) -> None:
    """Runs in a fresh interpreter: one stage, its wall time and peak RSS sent back."""
    import logging
    import resource

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    from preprocessing.demo_real_width import STAGES, RealWidthRun

    try:
        run = RealWidthRun(**run_kwargs)
        start = time.perf_counter()
        result = STAGES[stage](run)
        result["wall"] = time.perf_counter() - start
        result["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        conn.send({k: (str(v) if isinstance(v, Path) else v) for k, v in result.items() if k != "outputs"}
                  | {"outputs": [str(p) for p in result.get("outputs", [])]})
    except BaseException as err:  # noqa: BLE001 - reported by the parent
        conn.send({"error": f"{type(err).__name__}: {err}"})
        raise


def run_stage(stage: str, run_kwargs: dict) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_stage_child, args=(stage, run_kwargs, child))
    proc.start()
    child.close()
    result = parent.recv() if parent.poll(timeout=3600) else {"error": "no result within an hour"}
    proc.join()
    if "error" in result or proc.exitcode != 0:
        raise RuntimeError(f"stage {stage} failed: {result.get('error', f'exit {proc.exitcode}')}")
    return result


def steady_seconds(stage: str, result: dict, run_kwargs: dict) -> Optional[float]:
    """Seconds per item from the stage's own throughput figure (fixed costs excluded)."""
    out = Path(run_kwargs["out"])
    if stage == "preprocess":
        return result.get("loop_seconds", 0) / max(1, result["items"])
    if stage == "train":
        rate = _last_scalar(out / "runs" / "real-width" / "tensorboard", "perf/samples_per_s")
        return 1 / rate if rate else None
    if stage == "finetune":
        rate = _last_scalar(out / "runs" / "real-width-mllm" / "tensorboard", "perf/samples_per_s")
        return 1 / rate if rate else None
    return None


def measure(out: Path, seed: int) -> dict[str, dict]:
    from preprocessing.demo_real_width import RealWidthRun, world

    run_kwargs = {"out": str(out), "seed": seed}
    t0 = time.perf_counter()
    world(RealWidthRun(out, seed=seed), log=lambda m: print(m, flush=True))
    print(f"real-width models ready under {out / 'models'} ({time.perf_counter() - t0:.0f} s)", flush=True)
    results = {}
    for stage in STAGE_ORDER:
        print(f"-- {stage} ...", flush=True)
        r = run_stage(stage, {**run_kwargs, "out": out})
        r["written"] = _dir_bytes([Path(p) for p in r["outputs"]])
        r["steady"] = steady_seconds(stage, r, run_kwargs)
        results[stage] = r
        print(f"   {r['wall']:.0f} s, peak RSS {r['peak_rss'] / 2**30:.2f} GiB", flush=True)
    return results


def print_measured(results: dict[str, dict]) -> dict[str, float]:
    tokens = results["preprocess"].get("tokens_per_pair", GUIDANCE_TOKENS)
    cache_bytes = results["preprocess"]["cache_bytes_per_pair"]
    flops = real_width_flops(tokens)
    print(f"\n1. Measured on this machine (real-width models, CPU; {tokens:.0f} guidance tokens per pair with the "
          f"tiny tokenizer)")
    print(f"{'stage':<11} {'items':<28} {'wall s':>7} {'s/item':>8} {'peak RSS':>9} {'written/item':>13} "
          f"{'GFLOP/item':>11} {'GFLOP/s':>8}")
    for stage in STAGE_ORDER:
        r = results[stage]
        per = r["steady"] if r["steady"] else r["wall"] / r["items"]
        mark = "" if r["steady"] else "*"
        written = cache_bytes if stage == "preprocess" else r["written"] / r["items"]
        f = flops.get(stage)
        print(f"{stage:<11} {r['items']:>3} {r['unit']:<24} {r['wall']:>7.1f} {per:>7.2f}{mark:1} "
              f"{r['peak_rss'] / 2**30:>6.2f} GiB {_bytes(written):>13} "
              f"{f / 1e9 if f else float('nan'):>11.1f} {f / 1e9 / per if f else float('nan'):>8.1f}")
    print("   s/item: the stage's steady-state rate (preprocessing's extraction loop, the trainers' "
          "perf/samples_per_s); * = wall / items (model loading included). written/item: the cache's bytes "
          "per pair for preprocessing; all files the stage wrote (checkpoints, exports, images) per item otherwise.")
    return {"tokens_per_pair": tokens, "cache_bytes_per_pair": cache_bytes}


def _bytes(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def print_full_flops(flops: dict[str, float]) -> None:
    print(f"\n2. FLOPs per item of the full-size models (counted from their configs; benchmarks/flop_model.py), "
          f"{GUIDANCE_TOKENS} guidance tokens")
    for name, value in flops.items():
        print(f"   {name:<34} {value / 1e12:>10.3f} TFLOP")


def projection(flops: dict[str, float], mfu: float, cache_bytes_per_pair: float, measured: bool) -> dict[str, dict]:
    p = PAPER
    prompts = sum(p["eval_prompts"].values())
    train_pair = flops["train / pair (fwd, ref fwd, bwd)"]
    rows = [
        ("MLLM finetune", f"{p['finetune_triplets']:,} triplets x {flops['finetune / triplet'] / 1e12:.2f} TFLOP",
         p["finetune_triplets"] * flops["finetune / triplet"]),
        ("preprocess", f"{p['pairs']:,} pairs x {flops['preprocess / pair'] / 1e12:.2f} TFLOP",
         p["pairs"] * flops["preprocess / pair"]),
        ("train aligner", f"{p['steps']:,} steps x {p['global_batch']} pairs x {train_pair / 1e9:.0f} GFLOP",
         p["steps"] * p["global_batch"] * train_pair),
        ("eval, SDXL", f"{prompts:,} prompts x {flops['eval / prompt, SDXL'] / 1e12:.0f} TFLOP",
         prompts * flops["eval / prompt, SDXL"]),
        ("eval, SDXL-DPO", "the same as SDXL", prompts * flops["eval / prompt, SDXL"]),
        ("eval, FLUX", f"{prompts:,} prompts x {flops['eval / prompt, FLUX'] / 1e12:.0f} TFLOP",
         prompts * flops["eval / prompt, FLUX"]),
    ]
    print(f"\n3. The paper's run, projected at MFU {mfu:.0%} (dense bf16 peak: A100 312, H100 989 TFLOP/s); "
          f"GPU-hours = FLOP / (peak x MFU) / 3600")
    sets = ", ".join(f"{k} {v}" for k, v in p["eval_prompts"].items())
    print(f"   eval sets: {sets} = {prompts} prompts per backbone")
    out = {}
    total = {gpu: 0.0 for gpu in GPUS}
    for name, arithmetic, value in rows:
        hours = {gpu: value / (peak * mfu) / 3600 for gpu, peak in GPUS.items()}
        for gpu in GPUS:
            total[gpu] += hours[gpu]
        out[name] = {"flop": value, **{f"{gpu}_hours": h for gpu, h in hours.items()}}
        print(f"   {name:<15} {arithmetic:<52} = {value:.3e} FLOP -> A100 {hours['A100']:>8.1f} h, "
              f"H100 {hours['H100']:>7.1f} h")
    print(f"   {'total':<15} {'':<52}   {'':<14}    A100 {total['A100']:>8.1f} h, H100 {total['H100']:>7.1f} h")
    read = p["steps"] * p["global_batch"] * cache_bytes_per_pair
    overhead = "with the format overhead measured above" if measured else "tensor bytes only"
    print(f"   The aligner's FLOPs are not what its time is: at global batch 8 each step is "
          f"~{train_pair * 8 / 1e12:.1f} TFLOP (milliseconds on one GPU), and the run reads {read / 1e12:.1f} TB "
          f"of cache ({_bytes(cache_bytes_per_pair)} per pair at {GUIDANCE_TOKENS} tokens, {overhead}). "
          f"The paper reports 10-15 h on 8 A100 (80-120 A100-h, "
          f"0.36-0.54 s per step): step latency and cache reads, which benchmarks/gpu_suite.py measures on a GPU.")
    out["total"] = {f"{gpu}_hours": h for gpu, h in total.items()}
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="working folder (default: a temp dir, removed unless --keep)")
    parser.add_argument("--keep", action="store_true", help="keep the models and outputs")
    parser.add_argument("--projection-only", action="store_true", help="only the FLOP table and the projection")
    parser.add_argument("--mfu", type=float, default=0.4, help="model FLOP utilisation assumed (default 0.4)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write every figure here")
    args = parser.parse_args(argv)
    report: dict[str, Any] = {"mfu": args.mfu}
    cache_bytes = tensor_bytes(GUIDANCE_TOKENS)
    if not args.projection_only:
        out = args.out or Path(tempfile.mkdtemp(prefix="img-real-width-"))
        try:
            results = measure(out.resolve(), args.seed)
            measured = print_measured(results)
            report["measured"] = results
            # the measured format overhead (headers, index), at the full model's token count
            overhead = measured["cache_bytes_per_pair"] / tensor_bytes(measured["tokens_per_pair"])
            cache_bytes = tensor_bytes(GUIDANCE_TOKENS) * overhead
        finally:
            if not args.keep:
                shutil.rmtree(out, ignore_errors=True)
    flops = full_flops()
    print_full_flops(flops)
    report["full_flops"] = flops
    report["projection"] = projection(flops, args.mfu, cache_bytes, measured="measured" in report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
