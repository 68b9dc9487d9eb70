"""Speed and memory of the MLLM finetuning stage.

    python benchmarks/finetune_mllm.py                 # tiny LLaVA on CPU (+ the full-size layer stack on a GPU)
    python benchmarks/finetune_mllm.py --gpu-layers 4  # more 13B-sized decoder layers on the GPU

1. **Tiny LLaVA, CPU** (the real code path): tokens/s per device of a bare PyTorch loop over
   prepared batches (forward, answer-only loss, backward, AdamW), and of the whole job -
   ``run_finetune`` on InstructPix2Pix-layout parquet (reader threads, Lightning, checkpoints) -
   from its TensorBoard ``perf/tokens_per_s_per_device``; peak resident memory of the process.
   The loader alone (``--loader-workers``): samples/s of one epoch's batches (parquet read, JPEG
   decode, tokenise, collate) through our reader threads and, when torchdata is installed, through
   its ``StatefulDataLoader`` (worker processes) and ``torchdata.nodes`` (threads), in turns
   (benchmarks/torchdata_compare.py), and the whole job fed by ``StatefulDataLoader`` instead.
2. **LLaVA-1.5-13B-sized decoder layers, GPU** (only when CUDA is available): ``--gpu-layers``
   Llama decoder layers of the 13B shape (hidden 5120, MLP 13824, 40 heads) in float32 with bf16
   autocast and activation checkpointing at batch ``--gpu-batch`` x ``--seq`` tokens: tokens/s
   per device for forward + backward + AdamW, and the peak memory next to what
   :mod:`img_lightning.finetune.memory` predicts for the same stack.
3. **The 13B full recipe**: the per-GPU memory estimate, term by term (FSDP FULL_SHARD over 8
   GPUs, batch 16 per GPU, max length 2048 and a typical 680).

Figures are measured in one run of this script; nothing here runs in the test suite.
"""

from __future__ import annotations

import argparse
import itertools
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def tiny_cpu(work: Path, steps: int, batch: int, loader_workers: list[int], loader_rows: int,
             repeats: int, job_rounds: int) -> None:
    from omegaconf import OmegaConf

    from img_lightning.config.finetune_mllm import FinetuneMLLMConfig
    from img_lightning.config.loading import load_config
    from img_lightning.finetune.datamodule import EditTripletDataModule
    from img_lightning.finetune.module import MLLMFinetuneModule
    from img_lightning.tiny.mllm import build_tiny_llava
    from preprocessing.demo_data import write_edit_triplets_parquet

    torch.set_num_threads(1)
    model_dir = build_tiny_llava(work / "llava")
    data = work / "triplets.parquet"
    write_edit_triplets_parquet(data, max(64, batch * (steps + 4)), seed=0, bad_rows=False)
    overrides = [f"data.input={data}", f"mllm.path={model_dir}", f"run.root={work / 'runs'}", "run.name=bench",
                 f"data.batch_size={batch}", f"trainer.max_steps={steps}", "trainer.log_every_n_steps=5",
                 "trainer.val_check_interval=100000", "trainer.enable_progress_bar=false", "run.export=false",
                 "data.heldout_fraction=0.0", "data.num_workers=1"]
    cfg = load_config(FinetuneMLLMConfig, ["configs/finetune_mllm/demo.yaml"], overrides)

    dm = EditTripletDataModule(cfg.data, cfg.mllm)
    dm.setup()
    batches = list(itertools.islice(dm.train_dataloader(), steps))
    module = MLLMFinetuneModule(cfg.mllm, cfg.finetune, cfg.optim)
    module.configure_model()
    optimizer = torch.optim.AdamW(module.param_groups(), lr=1e-4)
    for b in batches[:2]:  # warm-up
        loss, n = module.answer_loss(b)
        (loss / n).backward()
        optimizer.step()
        optimizer.zero_grad()
    start, tokens = time.perf_counter(), 0
    for b in batches:
        loss, n = module.answer_loss(b)
        (loss / n).backward()
        optimizer.step()
        optimizer.zero_grad()
        tokens += int(b["attention_mask"].sum())
    bare = tokens / (time.perf_counter() - start)
    real = sum(int(b["attention_mask"].sum()) for b in batches)
    padding = 1 - real / sum(b["attention_mask"].numel() for b in batches)

    job_rate = job_tokens_per_s(cfg, work / "runs" / "bench")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB on Linux
    print("== tiny LLaVA on CPU (1 thread), batch", batch, f"x ~{int(batches[0]['input_ids'].shape[1])} tokens")
    print(f"   bare PyTorch loop:  {bare:9.0f} tokens/s per device (padding share {padding:.3f})")
    print(f"   whole job (Lightning, parquet reader threads, checkpoints): {job_rate:9.0f} tokens/s per device "
          f"= {job_rate / bare:.2f} of the bare loop")
    print(f"   peak resident memory of this process: {peak:.0f} MiB")
    del OmegaConf
    if loader_workers:
        loader_alone(cfg, work, loader_rows, loader_workers, repeats)
    if job_rounds:
        job_with_torchdata(cfg, work, [w for w in loader_workers if w > 0], job_rounds)


def job_tokens_per_s(cfg, run_dir: Path) -> float:
    """Run the job; its mean ``perf/tokens_per_s_per_device`` without the first window (start-up)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from img_lightning.finetune.training import run_finetune

    run_finetune(cfg)
    events = EventAccumulator(str(run_dir / "tensorboard")).Reload()
    rates = [e.value for e in events.Scalars("perf/tokens_per_s_per_device")][1:]
    return sum(rates) / max(1, len(rates))


def job_with_torchdata(cfg, work: Path, workers: list[int], rounds: int) -> None:
    """The whole job fed by StatefulDataLoader worker processes instead of our reader threads (the
    DataModule's train_dataloader swapped for the measurement only: the first epoch's requests, so
    the job must end within it), in rounds that alternate which goes first."""
    import copy

    import torchdata_compare as tdc

    from img_lightning.finetune.datamodule import EditTripletDataModule
    from img_lightning.finetune.loader import TripletBatchLoader
    from img_lightning.finetune.plan import RowGroupWindows

    if not tdc.available():
        return
    ours = EditTripletDataModule.train_dataloader

    def processes(self):
        plan = self.train_plan(RowGroupWindows(self.index.group_of, self.cfg.shuffle_window))
        reads = TripletBatchLoader(self.index, self.images, self.encoder, [], num_workers=0)
        return tdc.stateful_dataloader(reads._read, list(plan), int(self.cfg.num_workers),
                                       int(self.cfg.prefetch_batches))

    rates: dict[tuple[str, int], list[float]] = {}
    try:
        for r in range(rounds):
            for w in workers:
                for name in tdc.rotated(["ours", "StatefulDataLoader"], r):
                    EditTripletDataModule.train_dataloader = ours if name == "ours" else processes
                    job_cfg = copy.deepcopy(cfg)
                    job_cfg.data.num_workers, job_cfg.run.name = w, f"{name}-{w}-{r}"
                    rates.setdefault((name, w), []).append(job_tokens_per_s(job_cfg, work / "runs" / job_cfg.run.name))
    finally:
        EditTripletDataModule.train_dataloader = ours
    print(f"== whole job fed by StatefulDataLoader worker processes instead of our reader threads ({rounds} rounds)")
    for w in workers:
        a, b = rates[("ours", w)], rates[("StatefulDataLoader", w)]
        print(f"   {w} workers: ours best {max(a):7.0f} tokens/s per device, StatefulDataLoader best {max(b):7.0f} "
              f"= {max(b) / max(a):.2f}; per round " + " ".join(f"{y / x:.2f}" for x, y in zip(a, b, strict=True)))


def loader_alone(cfg, work: Path, rows: int, workers: list[int], repeats: int) -> None:
    """Samples/s of the finetune's training batches and parquet row groups read per epoch: our loader
    vs the same reads through torchdata, on ``rows`` triplets (more row groups than the row-group
    cache holds, as on the real data set)."""
    import copy

    import torchdata_compare as tdc
    from torch.utils.data import get_worker_info

    from img_lightning.finetune.datamodule import EditTripletDataModule
    from img_lightning.finetune.loader import TripletBatchLoader
    from img_lightning.finetune.plan import RowGroupWindows
    from img_lightning.finetune.triplets import RowGroupImages
    from preprocessing.demo_data import write_edit_triplets_parquet

    data = work / "loader.parquet"
    write_edit_triplets_parquet(data, rows, seed=1, bad_rows=False)
    cfg = copy.deepcopy(cfg)
    cfg.data.input = str(data)
    dm = EditTripletDataModule(cfg.data, cfg.mllm)
    dm.setup()
    requests = list(dm.train_plan(RowGroupWindows(dm.index.group_of, cfg.data.shuffle_window)))
    prefetch = int(cfg.data.prefetch_batches)

    def loader(w: int) -> TripletBatchLoader:  # its own row-group cache, cold
        images = RowGroupImages(dm.index.files, capacity=cfg.data.row_group_cache)
        return TripletBatchLoader(dm.index, images, dm.encoder, requests, num_workers=w, prefetch=prefetch)

    def counted(reads: TripletBatchLoader):
        """``reads.read_batch`` that reports the row groups its process has read (worker processes
        each have their own copy of the cache and of the counter)."""
        def read(request):
            batch = reads.read_batch(request)
            info = get_worker_info()
            batch["reader"] = torch.tensor(info.id if info is not None else -1)
            batch["row_groups_read"] = torch.tensor(reads.images.row_groups_read)
            return batch
        return read

    have_torchdata = tdc.available()
    print(f"== the finetune's loader alone, {len(requests)} batches of {cfg.data.batch_size}, "
          f"{int(dm.index.group_of.max()) + 1} row groups (data.row_group_cache={cfg.data.row_group_cache}, "
          f"data.shuffle_window={cfg.data.shuffle_window}): samples/s, best of {repeats} turns, and row groups "
          f"read in the first epoch{'' if have_torchdata else '; pip install torchdata to compare its loaders'}")
    for w in workers:
        loaders, counters = {}, {}
        if have_torchdata:
            sdl, nodes = loader(w), loader(w)
            loaders = {"StatefulDataLoader": tdc.stateful_dataloader(counted(sdl), requests, w, prefetch),
                       "nodes": tdc.nodes_loader(counted(nodes), requests, w)}
        loaders["ours"] = loader(w)
        best = {name: 0.0 for name in loaders}
        for turn in range(repeats + 1):  # turn 0 starts the workers and is not counted
            for name in tdc.rotated(list(loaders), turn):  # each goes first in turn: load drifts hit all alike
                if turn == 0:
                    per_reader: dict[int, int] = {}
                    for batch in loaders[name]:
                        if "reader" in batch:
                            per_reader[int(batch["reader"])] = int(batch["row_groups_read"])
                    counters[name] = sum(per_reader.values()) or loaders[name].images.row_groups_read
                    continue
                rate = tdc.pass_rate(loaders[name], lambda b: float(b["num_real"]))
                best[name] = max(best[name], rate)
        line = f"   {w} workers: ours {best['ours']:7.1f} ({counters['ours']} row groups)"
        for name in ("StatefulDataLoader", "nodes"):
            if name in best:
                line += f"   {name} {best[name]:7.1f} = {best[name] / best['ours']:.2f} ({counters[name]} row groups)"
        print(line)


def gpu_layers(layers: int, batch: int, seq: int, steps: int) -> None:
    from torch.utils.checkpoint import checkpoint
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    from img_lightning.finetune.memory import (
        GB,
        count_parameters,
        full_finetune_memory,
        llava_1_5_13b_config,
        meta_model,
    )

    device = torch.device("cuda")
    config = llava_1_5_13b_config().text_config
    config._attn_implementation = "sdpa"
    stack = torch.nn.ModuleList([LlamaDecoderLayer(config, i) for i in range(layers)]).to(device)
    rotary = LlamaRotaryEmbedding(config).to(device)
    optimizer = torch.optim.AdamW(stack.parameters(), lr=1e-5, fused=True)
    x0 = torch.randn(batch, seq, config.hidden_size, device=device, dtype=torch.bfloat16)
    position = torch.arange(seq, device=device)[None].expand(batch, -1)

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            h = x0
            cos_sin = rotary(h, position)
            for layer in stack:
                out = checkpoint(layer, h, position_ids=position, position_embeddings=cos_sin, use_reentrant=False)
                h = out[0] if isinstance(out, tuple) else out
            loss = h.float().pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    wall = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / GB
    counts = count_parameters(meta_model(llava_1_5_13b_config()))
    per_layer = counts.per_layer
    # the same terms for this unsharded stack: fp32 weights + grads + AdamW, autocast's bf16 weight copies,
    # checkpointed inputs, one recomputed layer (FSDP's bf16 param_dtype replaces the autocast copies)
    predicted = (18 * per_layer * layers + 2 * batch * seq * counts.hidden * layers
                 + 2 * 2 * (6 * batch * seq * counts.hidden + 4 * batch * seq * counts.intermediate)) / GB
    print(f"== {layers} LLaVA-1.5-13B decoder layers on {torch.cuda.get_device_name(device)}: batch {batch} x {seq} "
          f"tokens, fp32 weights, bf16 autocast, activation checkpointing")
    print(f"   {steps * batch * seq / wall:9.0f} tokens/s per device for these {layers} layers "
          f"(x {layers}/{counts.layers} -> ~{steps * batch * seq / wall * layers / counts.layers:.0f} tokens/s for "
          f"the 40-layer language model alone, unsharded)")
    print(f"   peak memory {peak:.2f} GB; the arithmetic of img_lightning.finetune.memory predicts {predicted:.2f} GB")
    del full_finetune_memory


def recipe_memory() -> None:
    from img_lightning.finetune.memory import count_parameters, full_finetune_memory, llava_1_5_13b_config, meta_model

    counts = count_parameters(meta_model(llava_1_5_13b_config()))
    print(f"== LLaVA-1.5-13B full finetune, FSDP FULL_SHARD over 8 GPUs, batch 16 per GPU: {counts.total / 1e9:.2f} B "
          f"parameters ({counts.trainable / 1e9:.2f} B trained; tower {counts.vision / 1e6:.0f} M frozen; one decoder "
          f"layer {counts.per_layer / 1e6:.0f} M)")
    tables = {seq: full_finetune_memory(counts, world=8, batch=16, seq=seq) for seq in (2048, 680)}
    print(f"   {'term (GB per GPU)':58s} {'seq 2048':>9s} {'seq 680':>9s}")
    for key in tables[2048]:
        print(f"   {key:58s} {tables[2048][key]:9.2f} {tables[680][key]:9.2f}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--gpu-layers", type=int, default=2)
    p.add_argument("--gpu-batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--skip-cpu", action="store_true")
    p.add_argument("--loader-workers", type=int, nargs="*", default=[0, 1, 2],
                   help="reader threads for the loader-alone line (none: skip it)")
    p.add_argument("--loader-repeats", type=int, default=3)
    p.add_argument("--loader-rows", type=int, default=2048, help="triplets of the loader-alone line's file")
    p.add_argument("--job-rounds", type=int, default=2,
                   help="rounds of the whole job fed by torchdata's StatefulDataLoader (0: skip)")
    args = p.parse_args()
    recipe_memory()
    if not args.skip_cpu:
        with tempfile.TemporaryDirectory() as tmp:
            tiny_cpu(Path(tmp), args.steps, args.batch, args.loader_workers, args.loader_rows, args.loader_repeats,
                     args.job_rounds)
    if torch.cuda.is_available():
        gpu_layers(args.gpu_layers, args.gpu_batch, args.seq, steps=5)
    else:
        print("== no GPU: the full-size layer stack is measured only where CUDA is available")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
