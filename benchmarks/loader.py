"""Loader throughput vs raw read throughput of the same shard files, measured in one run, for
16-bit and 8-bit guidance; the cost of the per-sample NaN/Inf check and of ``verify_checksums``.

    python benchmarks/loader.py                      # builds full-size caches (fp16, fp8) in a temp dir
    python benchmarks/loader.py --cache /data/cache  # or measures an existing one

(a) raw: sequential ``readinto`` of every shard file into one reusable buffer (page-cached: the
    files are read once to warm the cache first) -> GB/s of file bytes; the best of several buffer
    sizes, so the reference is as fast as plain reading gets on this machine. Small buffers stay in
    the CPU cache, so this is a ceiling no loader that keeps its batches can reach with one thread;
(a') raw into a batch-sized buffer: the same reads into a reusable buffer as large as one collated
    batch, i.e. the memory traffic any loader must do to hand over a batch;
(b) loader: the training DataLoader of ``FeatureCacheDataModule``, batches fully collated
    (padded guidance + mask + IP tokens), for 0, 1 and 2 workers -> GB/s of tensor payload
    (the real, unpadded tensor bytes) and pairs/s.
Prints (b)/(a) and (b)/(a') per worker count, for a float16 cache and for the same pairs with
float8_e4m3fn guidance (+ per-token scales; batches stay 8-bit, so pairs/s is the figure to compare).
(d) where the per-sample NaN/Inf check runs: 1 reader thread with ``data.finite_check=reader`` (the
    check on the reader thread) and with ``data.finite_check=device`` (what a GPU run does: the reader
    skips it, :func:`img_lightning.data.device_check.check_batch` runs on the batch after the copy),
    each as a ratio of (a'), the raw read into a batch-sized buffer; plus what ``check_batch`` costs
    per batch on this machine's device (CPU here: on a GPU it is one reduction, see gpu_suite.py).
(e) ``data.verify_checksums``: the sha256 pass over every shard at start-up, in GB/s and in loader
epochs (how many full reads of the cache the loader does in the time the checksum pass takes).
(f) torchdata, the same reads: our loader next to the same ``read`` of the same requests through
    ``torchdata``'s ``StatefulDataLoader`` (worker processes) and ``torchdata.nodes`` (``ParallelMapper``
    threads), pairs/s for each worker count, measured in turns (benchmarks/torchdata_compare.py; only
    when torchdata is installed).
For contrast, (c): the textbook pipeline over the same shards, ``webdataset.WebDataset`` ->
safetensors decode -> padded collate in a DataLoader with one worker process. Samples are LLaVA-13B
shaped by default: guidance ~600 x 5120, IP tokens 16 x 2048 for the loser and the winner.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from img_lightning.cache import BatchReader, CacheView, CacheWriter, Manifest, cache_key  # noqa: E402
from img_lightning.cache.format import OUTLIER_INDEX_KEY, OUTLIER_KEY, SCALE_KEY  # noqa: E402
from img_lightning.cache.quant import quantize_guidance  # noqa: E402
from img_lightning.config.loading import load_config  # noqa: E402
from img_lightning.config.train import TrainConfig  # noqa: E402
from img_lightning.data import ExpectedFeatures, FeatureCacheDataModule  # noqa: E402


def build_cache(root: Path, pairs: int, guidance_dim: int, ip_tokens: int, ip_dim: int, tokens: tuple[int, int],
                fp8: bool = False) -> None:
    recipe = {"benchmark": "loader", "guidance_dim": guidance_dim, "ip": [ip_tokens, ip_dim], "fp8": fp8}
    rng = np.random.default_rng(0)
    # Random values are as good as features for I/O; make them once and slice.
    pool = torch.from_numpy(rng.standard_normal((tokens[1] + 2 * ip_tokens) * guidance_dim).astype(np.float16))
    guidance = {"guidance": pool[: tokens[1] * guidance_dim].view(tokens[1], guidance_dim)}
    if fp8:
        guidance = quantize_guidance(guidance["guidance"])  # 8-bit + scales + 16-bit outlier channels
    with CacheWriter(root, cache_key(recipe), recipe, shard_size=32) as writer:
        for i in range(pairs):
            t = int(rng.integers(tokens[0], tokens[1] + 1))
            ip = pool[-2 * ip_tokens * ip_dim :].view(2, ip_tokens, ip_dim)
            tensors = {k: v if k == OUTLIER_INDEX_KEY else v[:t] for k, v in guidance.items()}
            tensors.update(ip_lose=ip[0], ip_win=ip[1])
            meta = {"pair_id": str(i), "caption": "benchmark", "winner_uid": "w", "loser_uid": "l",
                    "template_id": 0, "num_tokens": t}
            writer.write(f"b{i:07d}", tensors, meta)


def _raw_pass(paths: list[Path], view: memoryview) -> float:
    """GB/s of one sequential pass over ``paths`` into the reusable buffer ``view``."""
    total = sum(p.stat().st_size for p in paths)
    start = time.perf_counter()
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            while f.readinto(view):
                pass
    return total / (time.perf_counter() - start) / 1e9


def raw_read_gbps(paths: list[Path], repeats: int, buffer_mib: tuple[int, ...] = (1, 4, 16, 64)) -> tuple[float, int]:
    """Best GB/s over buffer sizes and repeats, and the buffer size (MiB) that gave it."""
    best, best_mib = 0.0, 0
    for mib in buffer_mib:
        view = memoryview(bytearray(mib << 20))
        for _ in range(repeats + 1):  # the first pass only warms the page cache
            gbps = _raw_pass(paths, view)
            if gbps > best:
                best, best_mib = gbps, mib
    return best, best_mib


def training_loader(root: Path, key: str, dims: tuple[int, int, int], workers: int, batch: int,
                    finite_check: str = "reader"):
    """The training loader of ``FeatureCacheDataModule`` over ``root`` (CPU batches, not pinned)."""
    overrides = [f"data.cache={root}", f"data.cache_key={key}", f"data.batch_size={batch}",
                 f"data.num_workers={workers}", "data.pin_memory=false", f"data.finite_check={finite_check}"]
    cfg = load_config(TrainConfig, [], overrides)
    dm = FeatureCacheDataModule(cfg.data, ExpectedFeatures(key, *dims))
    dm.setup("fit")
    return dm.train_dataloader()


def loader_pass(loader, dims: tuple[int, int, int]) -> tuple[float, float]:
    """(GB/s of stored tensor bytes, pairs/s) of one pass of ``loader``."""
    payload = pairs = 0
    start = time.perf_counter()
    for b in loader:
        n = b["index"].numel()
        real_tokens = int(b["guidance_mask"].sum())
        payload += (real_tokens * dims[0] * b["guidance"].element_size()
                    + 2 * n * dims[1] * dims[2] * b["ip_lose"].element_size())
        if SCALE_KEY in b:
            payload += real_tokens * b[SCALE_KEY].element_size()
        if OUTLIER_KEY in b:
            k = b[OUTLIER_KEY].shape[-1]
            payload += real_tokens * k * b[OUTLIER_KEY].element_size() + n * k * b[OUTLIER_INDEX_KEY].element_size()
        pairs += n
    elapsed = time.perf_counter() - start
    return payload / elapsed / 1e9, pairs / elapsed


def loader_throughput(root: Path, key: str, dims: tuple[int, int, int], workers: int, batch: int, epochs: int,
                      finite_check: str = "reader"):
    """Best (GB/s of stored tensor bytes, pairs/s) over ``epochs`` passes of the training loader."""
    loader = training_loader(root, key, dims, workers, batch, finite_check)
    best_gbps, best_pairs = 0.0, 0.0
    for epoch in range(epochs + 1):  # epoch 0 starts the workers and is not counted
        gbps, pairs = loader_pass(loader, dims)
        if epoch > 0:
            best_gbps, best_pairs = max(best_gbps, gbps), max(best_pairs, pairs)
    loader.close()
    return best_gbps, best_pairs


def finite_check_placement(root: Path, key: str, dims: tuple[int, int, int], batch: int, batch_mib: int,
                           repeats: int) -> dict[str, float]:
    """(d): best GB/s of the raw read into a batch-sized buffer (a') and of one reader thread with
    the NaN/Inf check on the reader and on the device, measured in turns (raw, reader, device, raw,
    ...), so a machine whose load changes during the run shifts all three alike."""
    paths = CacheView.open(root).shard_paths
    loaders = {mode: training_loader(root, key, dims, 1, batch, mode) for mode in ("reader", "device")}
    view = memoryview(bytearray(batch_mib << 20))
    best = {"raw_batch": 0.0, "reader": 0.0, "device": 0.0}
    for turn in range(repeats + 1):  # turn 0 warms the page cache and starts the threads
        results = {"raw_batch": _raw_pass(paths, view)}
        results.update({mode: loader_pass(loader, dims)[0] for mode, loader in loaders.items()})
        if turn > 0:
            best = {k: max(v, results[k]) for k, v in best.items()}
    for loader in loaders.values():
        loader.close()
    return best


def torchdata_turns(root: Path, key: str, dims: tuple[int, int, int], workers: Sequence[int], batch: int,
                    repeats: int) -> dict[int, dict[str, float]]:
    """(f): best pairs/s of our loader and of the same reads (reader per thread or process, recycled
    buffers) through torchdata's two loaders, per worker count, in turns."""
    import torchdata_compare as tdc

    results = {}
    for w in workers:
        ours = training_loader(root, key, dims, w, batch)
        reads = training_loader(root, key, dims, w, batch)  # its _read: what our threads call
        requests = list(reads.plan)
        loaders = {"StatefulDataLoader": tdc.stateful_dataloader(reads._read, requests, w),
                   "nodes": tdc.nodes_loader(reads._read, requests, w), "ours": ours}
        best = {name: 0.0 for name in loaders}
        for turn in range(repeats + 1):  # turn 0 starts the workers and is not counted
            for name in tdc.rotated(list(loaders), turn):  # each goes first in turn: load drifts hit all alike
                rate = tdc.pass_rate(loaders[name], lambda b: b["index"].numel())
                if turn:
                    best[name] = max(best[name], rate)
        results[w] = best
        ours.close()
        reads.close()
    return results


def device_check_ms(root: Path, batch: int, repeats: int) -> tuple[float, str]:
    """Milliseconds of ``check_batch`` (dequantize + per-sample isfinite + masking) per batch, best of
    ``repeats``, on the GPU when there is one (after the copy, as in training), else on the CPU."""
    from img_lightning.data.device_check import check_batch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cpu_batch = BatchReader(CacheView.open(root)).read(range(batch), check_finite=False)
    best = float("inf")
    for _ in range(repeats + 1):
        on_device = {k: v.to(device) for k, v in cpu_batch.items()}
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        check_batch(on_device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best * 1e3, device.type


def checksum_gbps(root: Path, repeats: int) -> float:
    """GB/s of ``CacheView.open(verify_checksums=True)`` (sha256 of every shard), best of ``repeats``."""
    size = sum(p.stat().st_size for p in CacheView.open(root).shard_paths)
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        view = CacheView.open(root, verify_checksums=True)
        best = max(best, size / (time.perf_counter() - start) / 1e9)
        assert not view.skipped
    return best


def _naive_collate(samples):
    from torch.nn.utils.rnn import pad_sequence

    guidance = [s["guidance"] for s in samples]
    lengths = torch.tensor([g.shape[0] for g in guidance])
    return {
        "guidance": pad_sequence(guidance, batch_first=True),
        "guidance_mask": torch.arange(int(lengths.max()))[None, :] < lengths[:, None],
        "ip_lose": torch.stack([s["ip_lose"] for s in samples]),
        "ip_win": torch.stack([s["ip_win"] for s in samples]),
    }


def naive_webdataset_gbps(paths: list[Path], dims: tuple[int, int, int], batch: int, epochs: int) -> float:
    """(c) webdataset + safetensors decode + DataLoader(num_workers=1) collate."""
    import webdataset as wds
    from safetensors.torch import load as st_load
    from torch.utils.data import DataLoader

    dataset = wds.WebDataset([str(p) for p in paths], shardshuffle=False).map(lambda s: st_load(s["safetensors"]))
    loader = DataLoader(dataset, batch_size=batch, num_workers=1, collate_fn=_naive_collate)
    best = 0.0
    for _ in range(epochs):
        payload, start = 0, time.perf_counter()
        for b in loader:
            payload += int(b["guidance_mask"].sum()) * dims[0] * 2 + 2 * b["ip_lose"].numel() * 2
        best = max(best, payload / (time.perf_counter() - start) / 1e9)
    return best


def measure_cache(root: Path, args, label: str) -> dict:
    manifest = Manifest.load(root)
    view = CacheView.open(root)
    dims = (view.guidance_dim, *view.ip_shape)
    paths = view.shard_paths
    size = sum(p.stat().st_size for p in paths)
    print(f"\n[{label}] cache: {view.num_samples} pairs, {len(paths)} shards, {size / 1e9:.2f} GB, "
          f"{size / view.num_samples / 1e6:.2f} MB/pair, guidance {view.guidance_dtype}")
    raw, mib = raw_read_gbps(paths, args.repeats)
    batch_mib = max(1, round(args.batch_size * size / view.num_samples / 2**20))
    raw_batch, _ = raw_read_gbps(paths, args.repeats, (batch_mib,))
    print(f"(a)  raw sequential read, page-cached: {raw:.2f} GB/s (best buffer: {mib} MiB)")
    print(f"(a') raw sequential read into a batch-sized ({batch_mib} MiB) buffer: {raw_batch:.2f} GB/s")
    print(f"{'workers':>8} {'GB/s':>8} {'pairs/s':>9} {'b/a':>6} {'b/a_':>6}")
    result = {"pairs_per_s": {}, "gbps": {}}
    for workers in args.workers:
        gbps, pairs = loader_throughput(root, manifest.cache_key, dims, workers, args.batch_size, args.repeats)
        result["pairs_per_s"][workers], result["gbps"][workers] = pairs, gbps
        print(f"{workers:>8} {gbps:>8.2f} {pairs:>9.1f} {gbps / raw:>6.2f} {gbps / raw_batch:>6.2f}")
    turns = finite_check_placement(root, manifest.cache_key, dims, args.batch_size, batch_mib, args.check_repeats)
    raw_b, on_reader, on_device = turns["raw_batch"], turns["reader"], turns["device"]
    check_ms, device = device_check_ms(root, args.batch_size, args.repeats)
    print(f"(d) NaN/Inf check with 1 reader thread, in turns with (a') ({raw_b:.2f} GB/s this time, best of "
          f"{args.check_repeats}): on the reader {on_reader:.2f} GB/s = {on_reader / raw_b:.2f} of (a'); "
          f"on the device (data.finite_check=device) {on_device:.2f} GB/s = **{on_device / raw_b:.2f} of (a')**; "
          f"check_batch on the {device}: {check_ms:.1f} ms per batch of {args.batch_size}")
    result.update(check_on_reader=on_reader, check_on_device=on_device, check_raw_batch=raw_b, check_ms=check_ms)
    sha = checksum_gbps(root, args.repeats)
    epoch_s = size / (max(result["gbps"].values()) * 1e9)
    print(f"(e) verify_checksums (sha256 of every shard at start-up): {sha:.2f} GB/s, "
          f"{size / (sha * 1e9):.2f} s = {size / (sha * 1e9) / epoch_s:.1f} loader epochs of this cache")
    if not args.no_torchdata:
        import torchdata_compare

        if torchdata_compare.available():
            turns = torchdata_turns(root, manifest.cache_key, dims, args.workers, args.batch_size, args.repeats)
            print(f"(f) torchdata, the same reads, pairs/s (best of {args.repeats} turns) and / ours:")
            print(f"{'workers':>8} {'ours':>9} {'StatefulDataLoader':>26} {'nodes (threads)':>22}")
            for w, r in turns.items():
                sdl, nodes = r["StatefulDataLoader"], r["nodes"]
                print(f"{w:>8} {r['ours']:>9.1f} {sdl:>17.1f} = {sdl / r['ours']:.2f} "
                      f"{nodes:>13.1f} = {nodes / r['ours']:.2f}")
            result["torchdata"] = turns
        else:
            print("(f) torchdata not installed: `pip install torchdata` to compare its loaders")
    result.update(dims=dims, paths=paths, raw=raw, raw_batch=raw_batch, size=size, sha=sha)
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", type=Path, help="existing cache (default: build fp16 and fp8 ones in a temp dir)")
    parser.add_argument("--pairs", type=int, default=256, help="pairs in the built caches (must fit in RAM)")
    parser.add_argument("--guidance-dim", type=int, default=5120)
    parser.add_argument("--ip-tokens", type=int, default=16)
    parser.add_argument("--ip-dim", type=int, default=2048)
    parser.add_argument("--min-tokens", type=int, default=580)
    parser.add_argument("--max-tokens", type=int, default=640)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--check-repeats", type=int, default=5, help="turns of (d) (raw, reader check, device check)")
    parser.add_argument("--no-naive", action="store_true", help="skip (c), the textbook WebDataset pipeline")
    parser.add_argument("--no-torchdata", action="store_true", help="skip (f), torchdata's loaders")
    args = parser.parse_args(argv)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # keep the table readable
    print(f"cpus={os.cpu_count()} torch threads={torch.get_num_threads()}")

    tmp = None
    caches = {}
    if args.cache is not None:
        caches["given"] = args.cache
    else:
        tmp = tempfile.TemporaryDirectory(prefix="img-loader-bench-")
        for label, fp8 in (("fp16", False), ("fp8", True)):
            root = Path(tmp.name) / label
            t0 = time.perf_counter()
            build_cache(root, args.pairs, args.guidance_dim, args.ip_tokens, args.ip_dim,
                        (args.min_tokens, args.max_tokens), fp8=fp8)
            caches[label] = root
            print(f"built {args.pairs} pairs ({label} guidance) in {time.perf_counter() - t0:.1f}s at {root}")
    results = {label: measure_cache(root, args, label) for label, root in caches.items()}
    if {"fp16", "fp8"} <= results.keys():
        print("\nfp8 / fp16 pairs/s (same pairs, same loader):  "
              + "  ".join(f"{w} workers {results['fp8']['pairs_per_s'][w] / results['fp16']['pairs_per_s'][w]:.2f}"
                          for w in args.workers))
    label, first = next(iter(results.items()))
    if not args.no_naive and not CacheView.open(caches[label]).quantized:  # its collate knows 16-bit only
        naive = naive_webdataset_gbps(first["paths"], first["dims"], args.batch_size, args.repeats)
        print(f"(c) webdataset + safetensors + DataLoader(1 worker process), {label} cache: {naive:.2f} GB/s, "
              f"b/a {naive / first['raw']:.2f}, b/a' {naive / first['raw_batch']:.2f}")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
