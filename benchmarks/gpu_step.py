"""Training steps/s of the full-size aligner on one GPU, fed by the real loader from a local cache
(16-bit and 8-bit guidance), against the same step on batches already in GPU memory.

    python benchmarks/gpu_step.py                     # on a GPU: bf16-mixed, batch 8, full size
    python benchmarks/gpu_step.py --pairs 512 --steps 300 --workers 4 8
    python benchmarks/gpu_step.py --smoke             # tiny shapes on CPU: checks that it runs

What runs is what ``img-train`` runs: ``AlignerModule`` (f_theta + frozen f_ref + the preference
objective, AdamW) under a Lightning ``Trainer`` with the ``ReferenceSwap`` and ``Throughput``
callbacks, fed by ``FeatureCacheDataModule`` (reader threads, batches read straight into pinned
memory, 8-bit guidance widened on the GPU after the copy). Caches of full-size LLaVA-13B/SDXL pairs
(580-640 x 5120 guidance, 2 x 16 x 2048 IP tokens) are written to a local temporary directory first
(page-cached when the machine has the memory; ``--cache-dir`` to put them on the storage to test).

Per storage it prints: steps/s and pairs/s with the loader; the data-wait share (time the step loop
waited for the loader / wall time); mean GPU utilisation (NVML via ``pynvml``, else ``nvidia-smi``
polled every 0.2 s; "n/a" when neither exists); peak GPU memory; the loader's read rate (cache
bytes per second); and steps/s of the same step on batches of the same cache preloaded into GPU
memory (no loader, no host-to-device copy: the upper bound), with the ratio loader / upper bound.

Without a GPU (or with ``--smoke``) it runs tiny shapes for a few steps on the CPU, so the script
is exercised by the test suite (``tests/test_benchmarks.py``); its figures then mean nothing.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Optional

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import lightning as L  # noqa: E402
from lightning.pytorch.callbacks import Callback  # noqa: E402
from loader import build_cache  # noqa: E402

from img_lightning.cache import BatchReader, CacheView, Manifest  # noqa: E402
from img_lightning.callbacks import ReferenceSwap, Throughput  # noqa: E402
from img_lightning.config.loading import load_config  # noqa: E402
from img_lightning.config.train import TrainConfig  # noqa: E402
from img_lightning.data import ExpectedFeatures, FeatureCacheDataModule  # noqa: E402
from img_lightning.module import AlignerModule  # noqa: E402

FULL = dict(guidance_dim=5120, dim=2048, depth=4, heads=20, dim_head=64, ip_tokens=16, tokens=(580, 640))
# Lightning notices that are expected here (no validation loop, in-memory batches).
for _message in (r".*isinstance\(treespec, LeafSpec\)` is deprecated.*", r".*no `val_dataloader`.*",
                 r"Total length of .* across ranks is zero.*"):
    warnings.filterwarnings("ignore", message=_message)

SMOKE = dict(guidance_dim=64, dim=32, depth=1, heads=2, dim_head=16, ip_tokens=4, tokens=(8, 16))


class UtilSampler:
    """Mean GPU utilisation over a window, polled in a thread (NVML, else nvidia-smi)."""

    def __init__(self, index: int, interval: float = 0.2) -> None:
        self.index, self.interval = index, interval
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._read = self._nvml() or self._smi()

    def _nvml(self):
        try:
            import pynvml

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(self.index)
            return lambda: float(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu)
        except Exception:
            return None

    def _smi(self):
        if shutil.which("nvidia-smi") is None:
            return None
        cmd = ["nvidia-smi", f"--id={self.index}", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"]
        return lambda: float(subprocess.run(cmd, capture_output=True, text=True, timeout=5).stdout.split()[0])

    def start(self) -> None:
        if self._read is None:
            return
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.samples.append(self._read())
            except Exception:
                return

    def stop(self) -> str:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        return f"{statistics.mean(self.samples):.0f} %" if self.samples else "n/a"


class Window(Callback):
    """Times steps ``warmup .. last``; reads the loader's wait time and GPU utilisation over them."""

    def __init__(self, warmup: int, last: int, device: torch.device, loader_of=lambda trainer: None) -> None:
        self.warmup, self.last, self.device, self.loader_of = warmup, last, device, loader_of
        self.start = self.end = None
        self.wait0 = self.wait1 = 0.0
        self.util = UtilSampler(device.index or 0) if device.type == "cuda" else None
        self.util_text = "n/a"

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _wait(self, trainer) -> float:
        loader = self.loader_of(trainer)
        return float(getattr(loader, "wait_seconds", 0.0))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == self.warmup:
            self._sync()
            self.start, self.wait0 = time.perf_counter(), self._wait(trainer)
            if self.util is not None:
                torch.cuda.reset_peak_memory_stats(self.device)
                self.util.start()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx == self.last:
            self._sync()
            self.end, self.wait1 = time.perf_counter(), self._wait(trainer)
            if self.util is not None:
                self.util_text = self.util.stop()

    @property
    def seconds(self) -> float:
        return self.end - self.start


class Preloaded:
    """Batches already in device memory, cycled: the loader-free upper bound."""

    def __init__(self, batches: list[dict], steps: int) -> None:
        self.batches, self.steps = batches, steps

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        return (self.batches[i % len(self.batches)] for i in range(self.steps))


def train_config(dims: dict, cache: Path, key: str, batch: int, workers: int, precision: str, steps: int):
    return load_config(TrainConfig, [], [
        f"model.guidance_dim={dims['guidance_dim']}", f"model.dim={dims['dim']}", f"model.depth={dims['depth']}",
        f"model.heads={dims['heads']}", f"model.dim_head={dims['dim_head']}", f"model.num_tokens={dims['ip_tokens']}",
        f"data.cache={cache}", f"data.cache_key={key}", f"data.batch_size={batch}", f"data.num_workers={workers}",
        f"trainer.precision={precision}", f"trainer.max_steps={steps}",
    ])


def trainer_for(cfg, accelerator: str, window: Window) -> L.Trainer:
    return L.Trainer(
        accelerator=accelerator, devices=1, precision=cfg.trainer.precision, max_steps=cfg.trainer.max_steps,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, use_distributed_sampler=False, log_every_n_steps=cfg.trainer.log_every_n_steps,
        callbacks=[ReferenceSwap(cfg.reference.patience), Throughput(), window],
    )


def with_loader(cfg, accelerator: str, device: torch.device, warmup: int) -> dict[str, Any]:
    steps = cfg.trainer.max_steps
    expected = ExpectedFeatures(cfg.data.cache_key, cfg.model.guidance_dim, cfg.model.num_tokens, cfg.model.dim)
    dm = FeatureCacheDataModule(cfg.data, expected)
    window = Window(warmup, steps - 1, device, loader_of=lambda trainer: dm.train_loader)
    module = AlignerModule(cfg.model, cfg.objective, cfg.reference, cfg.optim, seed=0)
    trainer_for(cfg, accelerator, window).fit(module, datamodule=dm)
    manifest = dm.train_view.manifest
    timed = steps - warmup
    return {
        "steps_per_s": timed / window.seconds,
        "pairs_per_s": timed * cfg.data.batch_size / window.seconds,
        "read_gbps": timed * cfg.data.batch_size * manifest.num_bytes / manifest.num_samples / window.seconds / 1e9,
        "wait_share": (window.wait1 - window.wait0) / window.seconds,
        "util": window.util_text,
        "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan"),
    }


def preloaded(cfg, accelerator: str, device: torch.device, warmup: int, count: int = 8) -> float:
    view = CacheView.open(cfg.data.cache)
    reader = BatchReader(view)
    b = cfg.data.batch_size
    batches = [{k: v.to(device) for k, v in reader.read(range(i * b, (i + 1) * b)).items()}
               for i in range(min(count, view.num_samples // b))]
    steps = cfg.trainer.max_steps
    window = Window(warmup, steps - 1, device)
    module = AlignerModule(cfg.model, cfg.objective, cfg.reference, cfg.optim, seed=0)
    trainer_for(cfg, accelerator, window).fit(module, train_dataloaders=Preloaded(batches, steps))
    return (steps - warmup) / window.seconds


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, a few CPU steps (default without a GPU)")
    parser.add_argument("--pairs", type=int, default=None, help="pairs per cache (default 512; smoke 48)")
    parser.add_argument("--steps", type=int, default=None, help="steps per measurement (default 200; smoke 6)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed first steps (default 20; smoke 2)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, nargs="+", default=[4], help="reader threads (data.num_workers)")
    parser.add_argument("--cache-dir", type=Path, help="where to build the caches (default: a temp dir)")
    args = parser.parse_args(argv)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    smoke = args.smoke or not torch.cuda.is_available()
    dims = SMOKE if smoke else FULL
    pairs = args.pairs or (48 if smoke else 512)
    steps = args.steps or (6 if smoke else 200)
    warmup = args.warmup if args.warmup is not None else (2 if smoke else 20)
    device = torch.device("cpu" if smoke else "cuda")
    accelerator, precision = ("cpu", "32") if smoke else ("gpu", "bf16-mixed")
    name = "smoke run (tiny shapes, CPU; figures mean nothing)" if smoke else torch.cuda.get_device_name(device)
    print(f"{name}: precision {precision}, batch {args.batch_size}, {steps} steps ({warmup} untimed), "
          f"guidance {dims['tokens'][0]}-{dims['tokens'][1]} x {dims['guidance_dim']}, "
          f"IP {dims['ip_tokens']} x {dims['dim']}, aligner depth {dims['depth']} x {dims['heads']} heads")

    threads = torch.get_num_threads()
    if smoke:
        torch.set_num_threads(1)  # tiny models on a shared CPU: one thread is fastest
    try:
        rows = measure(args, dims, pairs, steps, warmup, device, accelerator, precision)
    finally:
        torch.set_num_threads(threads)
    print(f"\n{'storage':>7} {'workers':>7} {'steps/s':>8} {'pairs/s':>8} {'read GB/s':>9} {'wait':>6} "
          f"{'GPU util':>8} {'peak GiB':>8} {'in-mem/s':>9} {'ratio':>6}")
    for storage, workers, r, bound in rows:
        print(f"{storage:>7} {workers:>7} {r['steps_per_s']:>8.2f} {r['pairs_per_s']:>8.1f} {r['read_gbps']:>9.2f} "
              f"{r['wait_share']:>6.2f} {r['util']:>8} {r['peak_gib']:>8.1f} {bound:>9.2f} "
              f"{r['steps_per_s'] / bound:>6.2f}")
    return 0


def measure(args, dims: dict, pairs: int, steps: int, warmup: int, device: torch.device, accelerator: str,
            precision: str) -> list:
    """Build both caches, then time the loader-fed and the preloaded step for each."""
    tmp = tempfile.TemporaryDirectory(prefix="img-gpu-step-", dir=args.cache_dir)
    root = Path(tmp.name)
    rows = []
    for storage in ("fp16", "fp8"):
        cache = root / storage
        t0 = time.perf_counter()
        build_cache(cache, pairs, dims["guidance_dim"], dims["ip_tokens"], dims["dim"], dims["tokens"],
                    fp8=storage == "fp8")
        manifest = Manifest.load(cache)
        print(f"built {storage} cache: {pairs} pairs, {manifest.num_bytes / pairs / 1e6:.2f} MB/pair "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
        for workers in args.workers:
            cfg = train_config(dims, cache, manifest.cache_key, args.batch_size, workers, precision, steps)
            loaded = with_loader(cfg, accelerator, device, warmup)
            bound = preloaded(cfg, accelerator, device, warmup)
            rows.append((storage, workers, loaded, bound))
    tmp.cleanup()
    return rows


if __name__ == "__main__":
    raise SystemExit(main())
