"""Does training from an 8-bit guidance cache end where training from a 16-bit one does? The demo,
over several seeds.

    python benchmarks/fp8_demo.py                       # 3 seeds x {fp16, fp8}, ~10 min on 2 CPU cores
    python benchmarks/fp8_demo.py --seeds 0 1 2 3 4 --steps 1000

What runs, through the same entry points a user calls: the tiny demo models and the demo
Pick-a-Pic-schema parquet (as ``img-demo``), then ``img-preprocess`` (``preprocessing.cli.main``)
into a 16-bit and an 8-bit (``cache.guidance_dtype=float8_e4m3fn``) cache of the same pairs, train
and held-out, then ``img-train`` (``img_lightning.cli.train.main``, ``configs/train/demo.yaml``)
once per seed and storage. A seed sets f_theta's and f_ref's initialisations and the data order
(``run.seed``, ``reference.seed``, ``data.seed``); the data and the caches are the same for every
run, so the spread between seeds is the run-to-run spread of training itself.

The held-out metric is ``||c_w - f(c)||^2`` (mean per element, as ``val/base``) of each exported
aligner on the held-out pairs, computed on the **16-bit** held-out cache for every run, so both
storages are judged on the same inputs (at inference the guidance comes straight from the MLLM,
never from the cache); the runs' own validation (each on its own storage) is printed beside it.
Prints every run, the mean and standard deviation per storage, the seed-by-seed (paired)
difference, and whether the fp8 mean lies within the range of the fp16 runs. ``--out DIR --reuse``
re-evaluates the runs already in DIR instead of training them again.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from img_lightning.aligner import ImplicitAligner, load_state_dict_file  # noqa: E402
from img_lightning.cache import BatchReader, CacheView, Manifest  # noqa: E402
from img_lightning.cache.quant import dequantize_batch  # noqa: E402
from img_lightning.cli.train import main as train_main  # noqa: E402
from img_lightning.objective import squared_distance  # noqa: E402
from preprocessing.cli import main as preprocess_main  # noqa: E402

PREPROCESS = REPO / "configs" / "preprocess" / "demo.yaml"
TRAIN = REPO / "configs" / "train" / "demo.yaml"
STORAGES = {"fp16": [], "fp8": ["cache.guidance_dtype=float8_e4m3fn"]}


def build_caches(out: Path, pairs: int, val_pairs: int) -> dict[tuple[str, str], Path]:
    from img_lightning.tiny.world import build_tiny_world, preprocess_overrides
    from preprocessing.demo_data import write_demo_parquet

    models = build_tiny_world(out / "models", seed=0)
    parquets = {"train": out / "data" / "train.parquet", "val": out / "data" / "val.parquet"}
    write_demo_parquet(parquets["train"], pairs, seed=0)
    write_demo_parquet(parquets["val"], val_pairs, seed=1)
    caches = {}
    for storage, extra in STORAGES.items():
        for split, parquet in parquets.items():
            cache = out / "cache" / f"{split}-{storage}"
            code = preprocess_main(["run", str(PREPROCESS), f"data.input={parquet}", f"data.output={cache}",
                                    *preprocess_overrides(models), *extra, "--no-progress"])
            if code != 0:
                raise SystemExit(f"img-preprocess failed for {cache} (exit {code})")
            caches[(split, storage)] = cache
    return caches


def guidance_error(caches: dict[tuple[str, str], Path]) -> float:
    """Relative L2 difference of the training guidance, 8-bit (widened) vs 16-bit cache."""
    batches = {}
    for storage in STORAGES:
        view = CacheView.open(caches[("train", storage)])
        batches[storage] = dequantize_batch(BatchReader(view).read(range(view.num_samples)))
    mask = batches["fp16"]["guidance_mask"]
    g16, g8 = batches["fp16"]["guidance"].float()[mask], batches["fp8"]["guidance"].float()[mask]
    return float((g8 - g16).norm() / g16.norm())


@torch.no_grad()
def held_out(export: Path, cache: Path) -> tuple[float, float]:
    """(mean ||c_w - f(c)||^2, mean ||c_w - c_l||^2) per sample over the whole cache."""
    info = json.loads((export / "aligner.json").read_text())
    dims = {k: info[k] for k in ("guidance_dim", "dim", "depth", "heads", "dim_head", "ff_mult")}
    aligner = ImplicitAligner(**dims)
    aligner.load_state_dict(load_state_dict_file(export / "aligner.safetensors"))
    view = CacheView.open(cache)
    batch = dequantize_batch(BatchReader(view).read(range(view.num_samples)))
    lose, win = batch["ip_lose"].float(), batch["ip_win"].float()
    pred = aligner(batch["guidance"].float(), lose, batch["guidance_mask"])
    return float(squared_distance(win, pred, "mean").mean()), float(squared_distance(win, lose, "mean").mean())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="working directory (default: a temporary one)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: configs/train/demo.yaml)")
    parser.add_argument("--pairs", type=int, default=640)
    parser.add_argument("--val-pairs", type=int, default=128)
    parser.add_argument("--reuse", action="store_true",
                        help="with --out: keep runs that already exported an aligner (re-evaluate them only)")
    parser.add_argument("--torch-threads", type=int, default=1,
                        help="intra-op threads (1: tiny models on a shared CPU run fastest single-threaded)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.torch_threads)
    tmp = tempfile.TemporaryDirectory(prefix="img-fp8-demo-") if args.out is None else None
    out = Path(tmp.name) if tmp is not None else args.out.resolve()

    t0 = time.perf_counter()
    caches = build_caches(out, args.pairs, args.val_pairs)
    sizes = {s: Manifest.load(caches[("train", s)]).num_bytes for s in STORAGES}
    print(f"caches built in {time.perf_counter() - t0:.0f} s; train cache bytes fp8/fp16 = "
          f"{sizes['fp8'] / sizes['fp16']:.3f} (tiny demo shapes: 64-wide guidance, so tar headers weigh more); "
          f"guidance rounding, fp8 vs fp16: {guidance_error(caches):.2e} relative L2")
    results: dict[str, list[tuple[int, float, float]]] = {s: [] for s in STORAGES}
    identity = None
    for seed in args.seeds:
        for storage in STORAGES:
            key = Manifest.load(caches[("train", storage)]).cache_key
            name = f"{storage}-seed{seed}"
            argv_train = [str(TRAIN), f"data.cache={caches[('train', storage)]}",
                          f"data.val_cache={caches[('val', storage)]}", "data.recipe=null", f"data.cache_key={key}",
                          f"run.root={out / 'runs'}", f"run.name={name}", f"run.seed={seed}",
                          f"reference.seed={1000 + seed}", f"data.seed={seed}", "trainer.enable_progress_bar=false"]
            if args.steps is not None:
                argv_train.append(f"trainer.max_steps={args.steps}")
            t1 = time.perf_counter()
            export = out / "runs" / name / "export"
            if not (args.reuse and (export / "aligner.safetensors").is_file()):
                code = train_main(argv_train)
                if code != 0:
                    raise SystemExit(f"img-train failed for {name} (exit {code})")
            common, identity = held_out(export, caches[("val", "fp16")])
            own, _ = held_out(export, caches[("val", storage)])
            results[storage].append((seed, common, own))
            print(f"   {name}: held-out (16-bit inputs) {common:.5f}, own-storage validation {own:.5f} "
                  f"({time.perf_counter() - t1:.0f} s)", flush=True)

    print(f"\nheld-out ||c_w - f(c)||^2 on the 16-bit held-out cache ({args.val_pairs} pairs; "
          f"identity {identity:.5f}):")
    print(f"{'seed':>6} " + " ".join(f"{s:>10}" for s in STORAGES))
    for i, seed in enumerate(args.seeds):
        print(f"{seed:>6} " + " ".join(f"{results[s][i][1]:>10.5f}" for s in STORAGES))
    stats = {}
    for s in STORAGES:
        values = [r[1] for r in results[s]]
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        stats[s] = (statistics.mean(values), spread, min(values), max(values))
        print(f"{s}: mean {stats[s][0]:.5f}, std {stats[s][1]:.5f}, range {stats[s][2]:.5f} .. {stats[s][3]:.5f}")
    paired = [b[1] - a[1] for a, b in zip(results["fp16"], results["fp8"], strict=True)]
    if len(paired) > 1:
        sd = statistics.stdev(paired)
        t = statistics.mean(paired) / (sd / len(paired) ** 0.5) if sd > 0 else float("inf")
        print(f"paired by seed, fp8 - fp16: mean {statistics.mean(paired):+.5f}, std {sd:.5f}, t = {t:.2f} over "
              f"{len(paired)} seeds; fp8 lower in {sum(d < 0 for d in paired)} of {len(paired)}")
    diff = stats["fp8"][0] - stats["fp16"][0]
    inside = stats["fp16"][2] <= stats["fp8"][0] <= stats["fp16"][3]
    in_std = f"{diff / stats['fp16'][1]:+.2f} fp16 std" if stats["fp16"][1] > 0 else "one seed: no spread"
    print(f"fp8 mean - fp16 mean = {diff:+.5f} ({in_std}); the fp8 mean is "
          f"{'inside' if inside else 'outside'} the range of the fp16 runs")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
