"""The distributed setup of the finetune, built here even though FSDP cannot run on these CPUs:
the FSDP strategy object (wrap policy, activation checkpointing, sharding, checkpoint format), the
DDP/LoRA choice, reading a sharded checkpoint offline, and the memory arithmetic of the 13B recipe."""

from __future__ import annotations

import pytest
import torch

from finetune_utils import tiny_finetune_config
from img_lightning.config.finetune_mllm import FinetuneMLLMConfig
from img_lightning.config.loading import load_config


def _cfg(model_dir, backend="llava", **extra):
    return tiny_finetune_config("unused.parquet", model_dir, "runs", "x", backend=backend, **extra)


@pytest.mark.parametrize("backend", ["llava", "qwen2_5_vl"])
def test_fsdp_strategy_wraps_decoder_layers_checkpoints_them_and_shards_checkpoints(backend, tiny_llava_dir,
                                                                                    tiny_qwen_dir):
    from lightning.pytorch.strategies import FSDPStrategy
    from torch.distributed.fsdp import ShardingStrategy
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    from img_lightning.finetune.strategy import build_strategy

    if backend == "llava":
        from transformers.models.clip.modeling_clip import CLIPEncoderLayer as Vision
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer as Decoder
        path = tiny_llava_dir
    else:
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLDecoderLayer as Decoder
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLVisionBlock as Vision
        path = tiny_qwen_dir
    strategy = build_strategy(_cfg(path, backend, **{"trainer.strategy": "fsdp",
                                                     "finetune.gradient_checkpointing": True}))
    assert isinstance(strategy, FSDPStrategy)
    wrap = strategy.kwargs["auto_wrap_policy"]
    assert isinstance(wrap, ModuleWrapPolicy) and set(wrap._module_classes) == {Decoder, Vision}
    checkpointing = strategy._activation_checkpointing_kwargs["auto_wrap_policy"]
    assert set(checkpointing._module_classes) == {Decoder}  # every decoder layer, nothing else
    assert strategy.sharding_strategy == ShardingStrategy.FULL_SHARD
    assert strategy._state_dict_type == "sharded"
    assert strategy.kwargs["use_orig_params"] is True and strategy.kwargs["limit_all_gathers"] is True
    assert strategy.cpu_offload.offload_params is False
    # bf16-mixed under FSDP: bf16 compute and reduction over the float32 shards
    from lightning.pytorch.plugins.precision.fsdp import FSDPPrecision

    mp = FSDPPrecision("bf16-mixed").mixed_precision_config
    assert (mp.param_dtype, mp.reduce_dtype) == (torch.bfloat16, torch.bfloat16)


def test_recipes_pick_their_strategies_and_refuse_fsdp_lora(tiny_llava_dir):
    from lightning.pytorch.strategies import DDPStrategy

    from img_lightning.finetune.model import build_trainable_model
    from img_lightning.finetune.strategy import build_strategy

    assert isinstance(build_strategy(_cfg(tiny_llava_dir, **{"trainer.strategy": "ddp"})), DDPStrategy)
    assert build_strategy(_cfg(tiny_llava_dir)) == "auto"
    with pytest.raises(ValueError, match="LoRA runs under ddp"):
        build_strategy(_cfg(tiny_llava_dir, **{"trainer.strategy": "fsdp", "finetune.method": "lora"}))
    # built for FSDP: one dtype (float32) everywhere, decoder checkpointing left to the strategy
    cfg = _cfg(tiny_llava_dir, **{"mllm.dtype": "bfloat16", "finetune.gradient_checkpointing": True})
    sharded = build_trainable_model(cfg.mllm, cfg.finetune, sharded=True)
    assert {p.dtype for p in sharded.parameters()} == {torch.float32}
    assert not sharded.model.language_model.gradient_checkpointing
    ddp = build_trainable_model(cfg.mllm, cfg.finetune, sharded=False)
    assert {p.dtype for p in ddp.model.vision_tower.parameters()} == {torch.bfloat16}  # frozen: mllm.dtype
    assert {p.dtype for p in ddp.parameters() if p.requires_grad} == {torch.float32}  # trained: fp32 masters
    assert not any(p.requires_grad for p in ddp.model.vision_tower.parameters())
    assert ddp.model.language_model.gradient_checkpointing
    for name in ("llava13b_full", "llava13b_lora", "qwen25vl7b_lora", "demo"):
        full = load_config(FinetuneMLLMConfig, [f"configs/finetune_mllm/{name}.yaml"], require_complete=False)
        assert (full.trainer.strategy.value == "fsdp") == (name == "llava13b_full"), name


def test_sharded_checkpoint_directory_is_resumed_and_exported_offline(tiny_llava_dir, tmp_path):
    """A Lightning FSDP sharded checkpoint (torch.distributed.checkpoint directory + meta.pt) is found
    by run.ckpt_path=last and read back into the full model in one process."""
    import torch.distributed.checkpoint as dcp

    from img_lightning.finetune.export import load_sharded_checkpoint
    from img_lightning.finetune.module import MLLMFinetuneModule
    from img_lightning.run_dir import resolve_resume

    cfg = _cfg(tiny_llava_dir, **{"trainer.strategy": "fsdp"})
    source = MLLMFinetuneModule(cfg.mllm, cfg.finetune, cfg.optim, strategy="fsdp")
    source.configure_model()
    with torch.no_grad():
        for p in source.parameters():
            p.add_(0.5)
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    dcp.save({"model": source.state_dict()}, checkpoint_id=str(ckpt))
    torch.save({"global_step": 7, "EditTripletDataModule": {"world_size": 8}}, ckpt / "meta.pt")
    assert resolve_resume(tmp_path / "run", "last") == str(ckpt)
    target = MLLMFinetuneModule(cfg.mllm, cfg.finetune, cfg.optim, strategy="fsdp")
    target.configure_model()
    meta = load_sharded_checkpoint(target, ckpt)
    assert meta["global_step"] == 7
    for (name, a), b in zip(source.state_dict().items(), target.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, msg=name)


def test_memory_of_the_13b_full_recipe_fits_80_gb():
    from img_lightning.finetune.memory import count_parameters, full_finetune_memory, llava_1_5_13b_config, meta_model

    counts = count_parameters(meta_model(llava_1_5_13b_config()))
    assert 13.3e9 < counts.total < 13.4e9 and counts.layers == 40 and counts.hidden == 5120
    assert counts.trainable == counts.total - counts.vision
    at_max = full_finetune_memory(counts, world=8, batch=16, seq=2048)
    assert at_max["total"] < 80 and at_max["total"] == pytest.approx(sum(v for k, v in at_max.items() if k != "total"))
    # 16 bytes of state per trainable parameter, split over the ranks
    states = sum(at_max[k] for k in ("parameter shards (fp32)", "gradient shards (fp32)", "AdamW states (2 x fp32)"))
    assert states == pytest.approx((4 * counts.total + 12 * counts.trainable) / 8 / 1e9)
    on_four = full_finetune_memory(counts, world=4, batch=16, seq=2048)
    assert on_four["AdamW states (2 x fp32)"] == pytest.approx(2 * at_max["AdamW states (2 x fp32)"])


def test_fsdp_gradient_clipping_and_export_paths(tiny_llava_dir, tmp_path):
    """Under FSDP the global grad norm is the root module's clip_grad_norm_ (Lightning's FSDP precision
    refuses norm clipping); the export rebuilds a plain model from the gathered weights and writes
    exactly what the unsharded export writes."""
    from types import SimpleNamespace

    from safetensors.torch import load_file
    from transformers import AutoProcessor

    from img_lightning.finetune.export import export_model, plain_model
    from img_lightning.finetune.module import MLLMFinetuneModule

    cfg = _cfg(tiny_llava_dir, **{"trainer.strategy": "fsdp"})
    module = MLLMFinetuneModule(cfg.mllm, cfg.finetune, cfg.optim, strategy="fsdp")
    calls = []
    root = SimpleNamespace(clip_grad_norm_=lambda value: calls.append(value))
    module._trainer = SimpleNamespace(strategy=SimpleNamespace(model=root))
    module.configure_gradient_clipping(None, gradient_clip_val=1.0, gradient_clip_algorithm="norm")
    module.configure_gradient_clipping(None, gradient_clip_val=None)
    assert calls == [1.0]
    module._trainer = None

    module.configure_model()
    processor = AutoProcessor.from_pretrained(tiny_llava_dir)
    direct = export_model(module.core, processor, tmp_path / "direct", {}, dtype="float32")
    gathered = {k: v.clone() for k, v in module.core.state_dict().items()}  # what rank 0 receives
    rebuilt = export_model(plain_model(module.core.config, "llava", gathered), processor, tmp_path / "rebuilt", {},
                           dtype="float32")
    a, b = load_file(direct / "model.safetensors"), load_file(rebuilt / "model.safetensors")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(RuntimeError, match="do not fit"):
        plain_model(module.core.config, "llava", {"nope": torch.zeros(1)})
