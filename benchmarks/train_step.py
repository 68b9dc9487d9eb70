"""Training-loop overhead: our Lightning loop vs a bare PyTorch loop on the same in-memory batches.

    python benchmarks/train_step.py                 # tiny and full-size aligner on this machine
    python benchmarks/train_step.py --sizes full --device cuda --precision bf16-mixed

Both loops do the same work per optimizer step: f_theta forward, f_ref forward without gradient,
the preference objective, backward, AdamW step, and the reference-swap bookkeeping (global distance
comparison; copy after k wins). The Lightning side is what ``img-train`` runs: AlignerModule with
the ReferenceSwap, Throughput and LearningRateMonitor callbacks and step-level logging to
TensorBoard (progress bar off, as in a batch job). Prints steps/s of each (best of alternating
rounds) and their ratio.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning as L  # noqa: E402
from lightning.pytorch.callbacks import Callback, LearningRateMonitor  # noqa: E402
from lightning.pytorch.loggers import TensorBoardLogger  # noqa: E402

from img_lightning.callbacks import ReferenceSwap, Throughput  # noqa: E402
from img_lightning.config.loading import load_config  # noqa: E402
from img_lightning.config.train import TrainConfig  # noqa: E402
from img_lightning.module import AlignerModule  # noqa: E402
from img_lightning.objective import preference_objective  # noqa: E402

SIZES = {
    # name: (guidance_dim, dim, depth, heads, dim_head, tokens, batch)
    "tiny": (64, 64, 2, 4, 16, 48, 16),
    "full": (5120, 2048, 4, 20, 64, 600, 2),
}


def make_batches(n, guidance_dim, dim, tokens, batch, dtype):
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        lose = torch.randn(batch, 16, dim, generator=g)
        out.append({
            "guidance": torch.randn(batch, tokens, guidance_dim, generator=g).to(dtype),
            "guidance_mask": torch.ones(batch, tokens, dtype=torch.bool),
            "ip_lose": lose.to(dtype),
            "ip_win": (lose + 0.1 * torch.randn(batch, 16, dim, generator=g)).to(dtype),
        })
    return out


class InMemory:
    """An iterable of ready batches (a bare list would be read by Lightning as a list of loaders)."""

    def __init__(self, batches):
        self.batches = batches

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        return iter(self.batches)


def config_for(size, precision, steps):
    gd, dim, depth, heads, dh, _, _ = SIZES[size]
    return load_config(TrainConfig, [], [
        f"model.guidance_dim={gd}", f"model.dim={dim}", f"model.depth={depth}", f"model.heads={heads}",
        f"model.dim_head={dh}", f"trainer.precision={precision}", f"trainer.max_steps={steps}",
    ], require_complete=False)  # no data.cache: batches come from memory


class StepClock(Callback):
    """Wall time from the start of step `warmup` to the end of the last step."""

    def __init__(self, warmup, device):
        self.warmup, self.device, self.start, self.end = warmup, device, None, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == self.warmup:
            _sync(self.device)
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        _sync(self.device)
        self.end = time.perf_counter()


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def lightning_steps_per_s(cfg, batches, warmup, device, accelerator, tmp):
    module = AlignerModule(cfg.model, cfg.objective, cfg.reference, cfg.optim, seed=0)
    clock = StepClock(warmup, device)
    trainer = L.Trainer(
        accelerator=accelerator, devices=1, precision=cfg.trainer.precision, max_steps=len(batches),
        logger=TensorBoardLogger(tmp, name="tb"), enable_progress_bar=False, enable_checkpointing=False,
        enable_model_summary=False, log_every_n_steps=cfg.trainer.log_every_n_steps, num_sanity_val_steps=0,
        callbacks=[ReferenceSwap(cfg.reference.patience), Throughput(),
                   LearningRateMonitor("step"), clock],
    )
    trainer.fit(module, train_dataloaders=InMemory(batches))
    return (len(batches) - warmup) / (clock.end - clock.start)


def bare_steps_per_s(cfg, batches, warmup, device):
    module = AlignerModule(cfg.model, cfg.objective, cfg.reference, cfg.optim, seed=0).to(device)
    aligner, reference = module.aligner, module.reference
    opt = torch.optim.AdamW(aligner.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    autocast = cfg.trainer.precision == "bf16-mixed"
    streak = 0
    start = None
    for i, batch in enumerate(batches):
        if i == warmup:
            _sync(device)
            start = time.perf_counter()
        g = batch["guidance"].to(device, non_blocking=True).float()
        m = batch["guidance_mask"].to(device, non_blocking=True)
        lose = batch["ip_lose"].to(device, non_blocking=True).float()
        win = batch["ip_win"].to(device, non_blocking=True).float()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            pred = aligner(g, lose, m)
            with torch.no_grad():
                ref = reference(g, lose, m)
            out = preference_objective(pred, ref, win, lose, lambda_pref=cfg.objective.lambda_pref,
                                       beta=cfg.objective.beta, reduction=cfg.objective.reduction)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()
        streak = streak + 1 if bool(out["dist_win"].sum() < out["dist_win_ref"].sum()) else 0
        if streak >= cfg.reference.patience:
            with torch.no_grad():
                for d, s in zip(reference.parameters(), aligner.parameters(), strict=True):
                    d.copy_(s)
            streak = 0
    _sync(device)
    return (len(batches) - warmup) / (time.perf_counter() - start)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["tiny", "full"], choices=sorted(SIZES))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default=None, help="default: bf16-mixed on cuda, 32 on cpu")
    parser.add_argument("--steps", type=int, default=None, help="default: 200 tiny / 6 full on cpu, 200 on cuda")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=2, help="alternate bare/Lightning this many times; best of each")
    args = parser.parse_args(argv)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # keep the table readable
    device = torch.device(args.device)
    precision = args.precision or ("bf16-mixed" if device.type == "cuda" else "32")
    accelerator = "gpu" if device.type == "cuda" else "cpu"
    print(f"device={device} precision={precision} torch threads={torch.get_num_threads()}")
    print(f"{'size':>5} {'batch':>5} {'steps':>5} {'lightning/s':>12} {'bare/s':>9} {'ratio':>6}")
    for size in args.sizes:
        gd, dim, _, _, _, tokens, batch = SIZES[size]
        batch = args.batch_size or batch
        steps = args.steps or (200 if size == "tiny" or device.type == "cuda" else 6)
        warmup = max(1, steps // 10)
        cfg = config_for(size, precision, steps)
        dtype = torch.float16
        batches = make_batches(steps, gd, dim, tokens, batch, dtype)
        bare = lit = 0.0
        for _ in range(args.rounds):  # alternating, so drifts in machine speed hit both sides alike
            with tempfile.TemporaryDirectory() as tmp:
                bare = max(bare, bare_steps_per_s(cfg, batches, warmup, device))
                lit = max(lit, lightning_steps_per_s(cfg, batches, warmup, device, accelerator, tmp))
        print(f"{size:>5} {batch:>5} {steps:>5} {lit:>12.2f} {bare:>9.2f} {lit / bare:>6.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
