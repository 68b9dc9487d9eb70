"""One command for the day a GPU is lent: the figures a CPU cannot give, in at most 8 minutes.

    python benchmarks/gpu_suite.py                          # on a GPU: <= 8 min, gpu_suite.json + a table
    python benchmarks/gpu_suite.py --budget 480 --json out.json --world /data/real_width_models
    python benchmarks/gpu_suite.py --smoke                  # tiny models on the CPU: checks that it runs

Each part runs in its own process with its own time box (``--budget`` split by ``BUDGETS``; a part
gets what the earlier ones left over). A part writes its figures as it measures them, so a part
stopped by its box keeps what it had (``status: timed out``); a failing part records its error and
the suite goes on. The parts, on the real-width models (``img_lightning/tiny/real_width.py``):

* ``aligner``: the paper-size aligner's bf16-mixed training step (``img-train``'s module and
  callbacks) fed by the real loader from a local 16-bit and 8-bit cache: steps/s, the share of wall
  time spent waiting for data, peak GPU memory, and steps/s of the same step on batches preloaded
  in GPU memory (no loader: the bound), with the ratio;
* ``check``: the device-side NaN/Inf check (``data.finite_check=device``) on a full-size batch of 8
  pairs after the copy, 16- and 8-bit: ms per batch (what moving it off the reader thread costs);
* ``preprocess``: ``img-preprocess`` of the real-width LLaVA (bf16) + IP-Adapter-Plus (fp16,
  autocast): pairs/s end to end vs the encoders alone (processors + forward, images in memory);
* ``finetune``: the real-width LLaVA fully finetuned under FSDP on one device (bf16-mixed, gradient
  checkpointing, batch 4): tokens/s per device from its ``perf/tokens_per_s_per_device`` log, peak
  GPU memory;
* ``denoise``: one denoiser evaluation at 1024 px, bf16 - the SDXL UNet on the CFG batch of 2 and one
  FLUX transformer pass (true CFG runs two) - without and with the IP-Adapter injection: ms.

Without a GPU (or with ``--smoke``) the same parts run tiny models for a few iterations on the CPU,
in this process, so the test suite exercises the script (``tests/test_benchmarks.py``); its figures
then mean nothing.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE))

BUDGETS = {"world": 90, "aligner": 150, "check": 20, "preprocess": 80, "finetune": 80, "denoise": 60}  # seconds
PARTS = tuple(BUDGETS)


# -- the time box ---------------------------------------------------------------------------------
def write_result(path: Path, result: dict[str, Any]) -> None:
    """Atomically replace the part's result file (a reader never sees half a file)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1, default=str))
    os.replace(tmp, path)


def run_boxed(cmd: list[str], box_s: float, result_file: Path) -> dict[str, Any]:
    """Run ``cmd`` for at most ``box_s`` seconds; return what it wrote to ``result_file`` plus a
    ``status`` (ok / timed out after N s / failed: ...) and its ``seconds``."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=max(1.0, box_s))
        status = "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode}): {_tail(output)}"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the part and anything it started
        proc.communicate()
        status = f"timed out after {box_s:.0f} s (partial)"
    result = json.loads(result_file.read_text()) if result_file.is_file() else {}
    return {**result, "status": status, "seconds": round(time.perf_counter() - start, 1)}


def _tail(text: str, lines: int = 3) -> str:
    return " | ".join(line.strip() for line in (text or "").strip().splitlines()[-lines:])


# -- the parts ------------------------------------------------------------------------------------
class Ctx:
    """What every part needs: smoke or not, the device, where the models and scratch files live."""

    def __init__(self, smoke: bool, world: Path, work: Path, result: Path) -> None:
        import torch

        self.smoke = smoke
        self.world = world
        self.work = work
        self.result_file = result
        self.result: dict[str, Any] = {}
        self.device = torch.device("cpu" if smoke else "cuda")

    def record(self, **figures: Any) -> None:
        self.result.update(figures)
        write_result(self.result_file, self.result)

    def sync(self) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def peak_gib(self) -> Optional[float]:
        import torch

        return torch.cuda.max_memory_allocated(self.device) / 2**30 if self.device.type == "cuda" else None

    def reset_peak(self) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)

    def models(self) -> dict[str, Path]:
        if self.smoke:
            from img_lightning.tiny.flux import build_tiny_flux_world
            from img_lightning.tiny.world import build_tiny_world

            paths = build_tiny_world(self.world)
            flux_root = self.world / "flux_world"
            if not (flux_root / "ip_adapter" / "ip_adapter.safetensors").is_file():
                build_tiny_flux_world(flux_root)
            return {**paths, "flux": flux_root / "flux", "flux_ip_adapter": flux_root / "ip_adapter"}
        from img_lightning.tiny.real_width import build_real_width_world

        return build_real_width_world(self.world)


def part_world(ctx: Ctx) -> None:
    start = time.perf_counter()
    paths = ctx.models()
    ctx.record(models={k: str(v) for k, v in paths.items()}, build_s=round(time.perf_counter() - start, 1))


def part_aligner(ctx: Ctx) -> None:
    from gpu_step import FULL, SMOKE, preloaded, train_config, with_loader
    from loader import build_cache

    from img_lightning.cache import Manifest

    dims = SMOKE if ctx.smoke else FULL
    pairs, steps, warmup = (40, 4, 1) if ctx.smoke else (256, 120, 20)  # an epoch holds every timed step
    accelerator, precision = ("cpu", "32") if ctx.smoke else ("gpu", "bf16-mixed")
    for storage in ("fp16", "fp8"):
        cache = ctx.work / f"cache-{storage}"
        build_cache(cache, pairs, dims["guidance_dim"], dims["ip_tokens"], dims["dim"], dims["tokens"],
                    fp8=storage == "fp8")
        manifest = Manifest.load(cache)
        cfg = train_config(dims, cache, manifest.cache_key, 8, 4, precision, steps)
        ctx.reset_peak()
        loaded = with_loader(cfg, accelerator, ctx.device, warmup)
        bound = preloaded(cfg, accelerator, ctx.device, warmup)
        ctx.record(**{storage: {
            "steps_per_s": loaded["steps_per_s"], "pairs_per_s": loaded["pairs_per_s"],
            "data_wait_share": loaded["wait_share"], "read_gbps": loaded["read_gbps"],
            "peak_gib": ctx.peak_gib(), "gpu_util": loaded["util"], "preloaded_steps_per_s": bound,
            "ratio": loaded["steps_per_s"] / bound, "mb_per_pair": manifest.num_bytes / manifest.num_samples / 1e6}})
        shutil.rmtree(cache, ignore_errors=True)


def part_check(ctx: Ctx) -> None:
    from gpu_step import FULL, SMOKE
    from loader import build_cache, device_check_ms

    dims = SMOKE if ctx.smoke else FULL
    for storage in ("fp16", "fp8"):
        cache = ctx.work / f"check-{storage}"
        build_cache(cache, 8, dims["guidance_dim"], dims["ip_tokens"], dims["dim"], dims["tokens"],
                    fp8=storage == "fp8")
        ms, device = device_check_ms(cache, 8, 3 if ctx.smoke else 20)
        ctx.record(**{storage: {"ms_per_batch_of_8": ms, "device": device}})
        shutil.rmtree(cache, ignore_errors=True)


def part_preprocess(ctx: Ctx) -> None:
    from preprocess import encoder_only

    from img_lightning.config.loading import load_config
    from img_lightning.config.preprocess import PreprocessConfig
    from img_lightning.tiny.world import preprocess_overrides
    from preprocessing.demo_data import write_demo_parquet
    from preprocessing.extract import FeatureExtractor
    from preprocessing.pickapic import scan_pairs
    from preprocessing.plan import build_plan
    from preprocessing.run import run_preprocess

    pairs = 8 if ctx.smoke else 96
    data = ctx.work / "pairs.parquet"
    write_demo_parquet(data, pairs)
    if ctx.smoke:
        recipe, extra = "configs/preprocess/demo.yaml", []
    else:  # the paper recipe's precisions on the GPU
        recipe = "configs/preprocess/real_width.yaml"
        extra = ["encoders.mllm.device=cuda", "encoders.mllm.dtype=bfloat16", "encoders.mllm.batch_size=8",
                 "encoders.ip.device=cuda", "encoders.ip.dtype=float16", "encoders.ip.autocast=true",
                 "encoders.ip.batch_size=32", "cache.shard_size=32", "run.decode_threads=4", "run.torch_threads=null"]
    out = ctx.work / "cache-pre"
    cfg = load_config(PreprocessConfig, [REPO / recipe], [f"data.input={data}", f"data.output={out}",
                                                          *preprocess_overrides(ctx.models()), *extra])
    extractor = FeatureExtractor.from_config(cfg.encoders)
    table = scan_pairs(cfg.data.input, split=cfg.data.split)
    indices = [int(i) for i in build_plan(table, cfg.cache.shard_size, cfg.cache.seed, cfg.cache.shuffle).order]
    encode_s, forward_s, n = encoder_only(extractor, table, indices, extractor.batch_size)
    ctx.record(encoders_pairs_per_s=n / encode_s, forward_only_pairs_per_s=n / forward_s)
    result = run_preprocess(cfg, progress=False, extractor=extractor)
    e2e = result.pairs_written / result.seconds
    ctx.record(end_to_end_pairs_per_s=e2e, ratio_end_to_end_over_encoders=e2e * encode_s / n, pairs=n)


def part_finetune(ctx: Ctx) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from img_lightning.config.finetune_mllm import FinetuneMLLMConfig
    from img_lightning.config.loading import load_config
    from img_lightning.finetune.training import run_finetune
    from preprocessing.demo_data import write_edit_triplets_parquet

    steps, batch = (3, 2) if ctx.smoke else (10, 4)
    data = ctx.work / "triplets.parquet"
    write_edit_triplets_parquet(data, batch * (steps + 2) + 8, seed=0, bad_rows=False)
    common = [f"data.input={data}", f"mllm.path={ctx.models()['llava']}", f"run.root={ctx.work / 'runs'}",
              "run.name=finetune", f"data.batch_size={batch}", f"trainer.max_steps={steps}",
              "trainer.log_every_n_steps=2", "trainer.val_check_interval=100000",
              "trainer.checkpoint_every_n_steps=100000",
              "trainer.enable_progress_bar=false", "run.export=false", "data.heldout_fraction=0.0"]
    if ctx.smoke:
        cfg = load_config(FinetuneMLLMConfig, [REPO / "configs/finetune_mllm/demo.yaml"], common)
    else:  # the 13B full recipe's settings (llava13b_full.yaml) on one device
        cfg = load_config(FinetuneMLLMConfig, [REPO / "configs/finetune_mllm/real_width.yaml"], common + [
            "finetune.method=full", "finetune.gradient_checkpointing=true", "trainer.accelerator=gpu",
            "trainer.devices=1", "trainer.strategy=fsdp", "trainer.precision=bf16-mixed", "run.torch_threads=null"])
    ctx.reset_peak()
    run_finetune(cfg)
    events = EventAccumulator(str(ctx.work / "runs" / "finetune" / "tensorboard")).Reload()
    rates = [e.value for e in events.Scalars("perf/tokens_per_s_per_device")]
    steady = rates[1:] or rates  # the first window holds the start-up
    ctx.record(strategy=str(cfg.trainer.strategy), tokens_per_s_per_device=sum(steady) / len(steady),
               peak_gib=ctx.peak_gib(), batch=batch, steps=steps)


def _time_ms(ctx: Ctx, fn: Callable[[], Any], repeats: int) -> float:
    fn()
    ctx.sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        ctx.sync()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _denoise_step(kind: str, pipe: Any, size: int, smoke: bool, device: str, dt: Any
                  ) -> tuple[Callable[[dict], Any], Callable[[], dict]]:
    """One denoiser call of ``kind``'s pipeline on random inputs (``step(extra)``, ``extra``: the IP
    inputs or ``{}``) and a maker of its IP inputs."""
    import torch

    if kind == "sdxl":
        h = size // pipe.vae_scale_factor
        cross = pipe.unet.config.cross_attention_dim
        args = (torch.randn(2, 4, h, h, device=device, dtype=dt), torch.tensor([500.0], device=device),
                torch.randn(2, 77, cross, device=device, dtype=dt))
        added = {"text_embeds": torch.randn(2, pipe.text_encoder_2.config.projection_dim, device=device, dtype=dt),
                 "time_ids": torch.tensor([[size, size, 0, 0, size, size]] * 2, device=device, dtype=dt)}

        def sdxl_step(extra: dict) -> Any:
            return pipe.unet(*args, added_cond_kwargs={**added, **extra}, return_dict=False)

        def sdxl_ip() -> dict:
            return {"image_embeds": [torch.randn(2, 1, 16, cross, device=device, dtype=dt)]}

        return sdxl_step, sdxl_ip
    t = pipe.transformer.config
    n_img = (size // 16) ** 2 if not smoke else 64
    inputs = dict(hidden_states=torch.randn(1, n_img, t.in_channels, device=device, dtype=dt),
                  encoder_hidden_states=torch.randn(1, 512, t.joint_attention_dim, device=device, dtype=dt),
                  pooled_projections=torch.randn(1, t.pooled_projection_dim, device=device, dtype=dt),
                  timestep=torch.tensor([0.5], device=device, dtype=dt),
                  img_ids=torch.zeros(n_img, 3, device=device, dtype=dt),
                  txt_ids=torch.zeros(512, 3, device=device, dtype=dt),
                  guidance=torch.tensor([3.5], device=device, dtype=dt), return_dict=False)

    def flux_step(extra: dict) -> Any:
        return pipe.transformer(**inputs, joint_attention_kwargs=extra or None)

    def flux_ip() -> dict:
        return {"ip_adapter_image_embeds": [torch.randn(1, 1, 4, t.joint_attention_dim, device=device, dtype=dt)]}

    return flux_step, flux_ip


def part_denoise(ctx: Ctx) -> None:
    import torch

    from img_lightning.config.eval import EvalConfig
    from img_lightning.config.loading import load_config
    from img_lightning.generation.pipeline import DiffusionBackend

    models = ctx.models()
    dtype = "float32" if ctx.smoke else "bfloat16"
    device = str(ctx.device)
    repeats = 2 if ctx.smoke else 5
    for kind, backbone, ip_key in (("sdxl", "configs/eval/real_width.yaml", "ip_adapter"),
                                   ("flux", "configs/eval/backbones/flux.yaml", "flux_ip_adapter")):
        cfg = load_config(EvalConfig, [REPO / backbone], [
            f"generation.pipeline.path={models[kind]}", f"generation.pipeline.dtype={dtype}",
            f"generation.pipeline.device={device}", f"img.ip_adapter.path={models[ip_key]}"], require_complete=False)
        backend = DiffusionBackend.from_config(cfg.generation.pipeline)
        size = 64 if ctx.smoke else 1024
        step, ip_extra = _denoise_step(kind, backend.pipe, size, ctx.smoke, device, backend.dtype)
        with torch.no_grad():
            ctx.reset_peak()
            plain = _time_ms(ctx, functools.partial(step, {}), repeats)
            ctx.record(**{kind: {"ms_without_ip": plain}})
            backend.load_ip_adapter(cfg.img.ip_adapter)
            backend.set_ip_scale(0.2)
            with_ip = _time_ms(ctx, functools.partial(step, ip_extra()), repeats)
        ctx.record(**{kind: {"ms_without_ip": plain, "ms_with_ip": with_ip, "ip_overhead": with_ip / plain - 1,
                             "pixels": size, "batch": 2 if kind == "sdxl" else 1, "peak_gib": ctx.peak_gib()}})
        backend.close()


PART_FUNCTIONS: dict[str, Callable[[Ctx], None]] = {
    "world": part_world, "aligner": part_aligner, "check": part_check, "preprocess": part_preprocess,
    "finetune": part_finetune, "denoise": part_denoise,
}


# -- the table ------------------------------------------------------------------------------------
def table_rows(results: dict[str, dict]) -> list[tuple[str, str, str]]:
    """(part, figure, value) rows of the printed table."""
    rows = []

    def fmt(v: Any) -> str:
        return "n/a" if v is None else f"{v:.3g}" if isinstance(v, float) else str(v)

    for part in PARTS:
        r = results.get(part, {})
        rows.append((part, "status", f"{r.get('status', 'not run')} ({r.get('seconds', 0)} s)"))
        for key, value in r.items():
            if key in ("status", "seconds", "models"):
                continue
            if isinstance(value, dict):
                rows += [(part, f"{key}.{k}", fmt(v)) for k, v in value.items()]
            else:
                rows.append((part, key, fmt(value)))
    return rows


def print_table(results: dict[str, dict], header: str) -> None:
    print(f"\n{header}")
    print(f"{'part':<11} {'figure':<38} value")
    for part, name, value in table_rows(results):
        print(f"{part:<11} {name:<38} {value}")


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true",
                   help="tiny models on the CPU, in this process (default without a GPU)")
    p.add_argument("--budget", type=float, default=480.0, help="seconds for all parts together (default 480 = 8 min)")
    p.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    p.add_argument("--world", type=Path, help="real-width models (built there if missing; default: in --workdir)")
    p.add_argument("--workdir", type=Path, help="scratch folder (default: a temp dir, removed at the end)")
    p.add_argument("--json", type=Path, default=Path("gpu_suite.json"), help="the results (default ./gpu_suite.json)")
    p.add_argument("--part", choices=PARTS, help=argparse.SUPPRESS)  # internal: run one part (a child process)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    smoke = args.smoke or not torch.cuda.is_available()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="img-gpu-suite-"))
    work.mkdir(parents=True, exist_ok=True)
    world = args.world or work / ("tiny" if smoke else "real_width")
    if args.part:  # a child: one part, figures written as they come
        ctx = Ctx(smoke, world, work / args.part, args.result)
        ctx.work.mkdir(parents=True, exist_ok=True)
        PART_FUNCTIONS[args.part](ctx)
        return 0
    device = "smoke run (tiny models, CPU; figures mean nothing)" if smoke else torch.cuda.get_device_name(0)
    results: dict[str, Any] = {"device": device, "budget_s": args.budget, "torch": torch.__version__}
    deadline = time.perf_counter() + args.budget
    try:
        for part in args.parts:
            result_file = work / f"{part}.json"
            if smoke:  # in this process: seconds, not minutes (no per-part interpreter start-up)
                ctx = Ctx(True, world, work / part, result_file)
                ctx.work.mkdir(parents=True, exist_ok=True)
                start = time.perf_counter()
                try:
                    PART_FUNCTIONS[part](ctx)
                    status = "ok"
                except Exception as err:  # noqa: BLE001 - recorded, the suite goes on
                    status = f"failed: {type(err).__name__}: {err}"
                results[part] = {**ctx.result, "status": status, "seconds": round(time.perf_counter() - start, 1)}
            else:
                left = deadline - time.perf_counter()
                box = left - _planned(args, part)  # its own share + whatever the earlier parts left over
                if box < 5:
                    results[part] = {"status": "skipped: the budget is spent"}
                    continue
                cmd = [sys.executable, str(Path(__file__).resolve()), "--part", part, "--result", str(result_file),
                       "--workdir", str(work), "--world", str(world)]
                results[part] = run_boxed(cmd, box, result_file)
            write_result(args.json, results)
            print(f"{part}: {results[part]['status']} ({results[part].get('seconds', 0)} s)", flush=True)
    finally:
        write_result(args.json, results)
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    print_table(results, f"{device}: {args.json}")
    return 0


def _planned(args, part: str) -> float:
    """Seconds the parts after ``part`` are planned to take (a part may use what the earlier ones left)."""
    later = args.parts[args.parts.index(part) + 1:]
    return sum(BUDGETS[p] for p in later) * args.budget / sum(BUDGETS.values())


if __name__ == "__main__":
    raise SystemExit(main())
