"""Does torchdata's ``StatefulDataLoader`` resume exactly under Lightning (its own ``state_dict``,
which Lightning saves in the checkpoint and restores)? A check, not a timing; needs ``pip install
torchdata``.

    python benchmarks/torchdata_resume.py

For each case - sequential or seeded-shuffle sampling, killed mid-epoch or right after an epoch's last
batch, 0 or 2 worker processes, with and without ``configure_optimizers`` reading
``trainer.estimated_stepping_batches`` (as both IMG modules do) - an uninterrupted run is compared
with a run killed one step after a checkpoint and resumed from it: the batches trained on must be
the same. Prints one line per case and exits 1 when any differs.
"""

from __future__ import annotations

import glob
import logging
import signal
import sys
import tempfile
import warnings

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint


class Numbers(torch.utils.data.Dataset):
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.tensor([float(i)])


class Recorder(L.LightningModule):
    def __init__(self, estimate: bool) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(1, 1)
        self.estimate = estimate
        self.seen: list[list[int]] = []

    def training_step(self, batch, batch_idx):
        self.seen.append(batch[:, 0].int().tolist())
        return self.layer(batch).pow(2).mean()

    def configure_optimizers(self):
        if self.estimate:
            _ = self.trainer.estimated_stepping_batches
        return torch.optim.SGD(self.parameters(), lr=0.01)


class KillAt(Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            raise KeyboardInterrupt


def run(root: str, n: int, every: int, steps: int, shuffle: bool, workers: int, estimate: bool,
        kill: bool = False, ckpt: str | None = None) -> list[list[int]]:
    from torchdata.stateful_dataloader import StatefulDataLoader

    L.seed_everything(0, verbose=False)
    module = Recorder(estimate)
    loader = StatefulDataLoader(Numbers(n), batch_size=2, shuffle=shuffle, num_workers=workers)
    callbacks = [ModelCheckpoint(dirpath=root, every_n_train_steps=every, save_top_k=-1, filename="s{step}")]
    if kill:
        callbacks.append(KillAt(every + 1))
    trainer = L.Trainer(max_steps=steps, callbacks=callbacks, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=root)
    try:
        trainer.fit(module, loader, ckpt_path=ckpt)
    except (KeyboardInterrupt, SystemExit):  # Lightning turns the interrupt into an exit
        signal.signal(signal.SIGINT, signal.default_int_handler)  # and ignores SIGINT from then on
    return module.seen


def main() -> int:
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning").setLevel(logging.ERROR)
    # (samples, checkpoint every N steps, max steps): mid-epoch, and right after an epoch's last batch
    cases = [(40, 2, 6), (8, 4, 8)]
    failed = 0
    for n, every, steps in cases:
        for shuffle in (False, True):
            for workers in (0, 2):
                for estimate in (False, True):
                    with tempfile.TemporaryDirectory() as tmp:
                        straight = run(f"{tmp}/a", n, every, steps, shuffle, workers, estimate)
                        first = run(f"{tmp}/b", n, every, steps, shuffle, workers, estimate, kill=True)
                        ckpt = sorted(glob.glob(f"{tmp}/b/*step={every}*"))[0]
                        rest = run(f"{tmp}/b", n, every, steps, shuffle, workers, estimate, ckpt=ckpt)
                    exact = first[:every] + rest == straight
                    failed += not exact
                    print(f"{n} samples, checkpoint every {every} steps, {'shuffled' if shuffle else 'in order'}, "
                          f"{workers} workers, estimated_stepping_batches {'read' if estimate else 'unread'}: "
                          f"{'exact' if exact else 'DIFFERS'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
