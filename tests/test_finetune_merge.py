"""The LoRA merge of the export: float32 base + update rounded once to the export dtype, a check of
the merged logits in the manifest, and no non-finite weight written."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from finetune_utils import tiny_finetune_config
from img_lightning.encoders.export_manifest import MANIFEST_NAME
from img_lightning.errors import NonFiniteError
from img_lightning.finetune.samples import SampleEncoder


def _lora_model(tiny_llava_dir, tmp_path, update=0.01):
    """The tiny LLaVA with a bf16 base and float32 adapters whose update is ~``update`` of the weights."""
    from peft.tuners.lora import LoraLayer

    from img_lightning.finetune.model import build_trainable_model

    cfg = tiny_finetune_config(tmp_path / "unused.parquet", tiny_llava_dir, tmp_path, "m", **{
        "mllm.dtype": "bfloat16", "finetune.method": "lora", "finetune.lora.r": 4, "finetune.lora.alpha": 8})
    model = build_trainable_model(cfg.mllm, cfg.finetune, sharded=False)
    generator = torch.Generator().manual_seed(0)
    expected = {}  # layer path in the export -> (bf16 base in float32, the float32 update), by hand
    for name, layer in model.named_modules():
        if not isinstance(layer, LoraLayer):
            continue
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        base = layer.get_base_layer().weight.detach().float()
        b.data = torch.randn(b.shape, generator=generator)
        delta = b.detach() @ a.detach() * (8 / 4)
        b.data *= update * base.pow(2).mean().sqrt() / delta.pow(2).mean().sqrt()
        expected[name.removeprefix("base_model.model.") + ".weight"] = (base, b.detach() @ a.detach() * (8 / 4))
    return model, expected


def _on_disk(written, key, part):
    """The saved name of a module weight (transformers saves llava-hf's legacy key layout)."""
    tail = "." + key.split(f"{part}.", 1)[1]
    return next(w for w in written if part in w and w.endswith(tail))


def test_lora_merge_rounds_the_float32_sum_once_to_the_export_dtype(tiny_llava_dir, tmp_path):
    from transformers import AutoProcessor

    from img_lightning.finetune.export import export_model

    model, expected = _lora_model(tiny_llava_dir, tmp_path)
    tower = {k: v.detach().clone() for k, v in model.named_parameters() if "vision_tower" in k}
    # the training job's export path: export_model on the trained (LoRA) model, checked on a batch with images
    # (a bf16 tower under float16 autocast must not mix the two half types)
    encoder = SampleEncoder.from_config(tiny_finetune_config(tmp_path / "unused.parquet", tiny_llava_dir, tmp_path,
                                                             "m").mllm)
    batch = encoder.collate([encoder.encode(k, Image.new("RGB", (40, 30), c), "a red square", "make it red")
                             for k, c in (("a", (200, 0, 0)), ("b", (0, 0, 200)))])
    out = export_model(model, AutoProcessor.from_pretrained(tiny_llava_dir), tmp_path / "export",
                       {}, dtype="float16", check_batch=batch)
    written = load_file(out / "model.safetensors")
    assert expected and all(v.dtype == torch.float16 for v in written.values())
    lost = []
    for key, (base, delta) in expected.items():
        key = _on_disk(written, key, "language_model")
        assert torch.equal(written[key], (base + delta).to(torch.float16)), key  # rounded once
        in_place = (base.to(torch.bfloat16) + delta.to(torch.bfloat16)).to(torch.float16)  # bf16, then float16
        lost.append(float(((in_place.float() - base) - delta).norm() / delta.norm()))
        assert float(((written[key].float() - base) - delta).norm() / delta.norm()) < 0.05, key
    assert min(lost) > 0.08  # what adding the update to the bf16 weights in place loses: the test can tell
    for k, v in tower.items():  # no adapters: the bf16 weights cast once
        assert torch.equal(written[_on_disk(written, k, "vision_tower")], v.to(torch.float16)), k
    check = json.loads((out / MANIFEST_NAME).read_text())["merge_check"]
    assert check["dtype"] == "float16" and check["input"] == "held-out batch" and check["samples"] == 2
    assert check["positions"] == int((batch["labels"][:, 1:] != -100).sum())  # the answer tokens
    assert 0 <= check["max_abs_logit_diff"] < 0.05 * check["max_abs_logit"]


def test_float32_export_keeps_the_update_exactly_and_float16_overflow_is_refused(tiny_llava_dir, tmp_path):
    import transformers
    from transformers import AutoProcessor

    from img_lightning.finetune.export import export_model

    model, expected = _lora_model(tiny_llava_dir, tmp_path)
    processor = AutoProcessor.from_pretrained(tiny_llava_dir)
    written = load_file(export_model(model, processor, tmp_path / "f32", {}, dtype="float32")
                        / "model.safetensors")
    for key, (base, delta) in expected.items():
        assert torch.equal(written[_on_disk(written, key, "language_model")], base + delta), key
    plain = transformers.LlavaForConditionalGeneration.from_pretrained(tiny_llava_dir)
    plain.lm_head.weight.data[0, 0] = 1e6  # beyond float16's 65504
    with pytest.raises(NonFiniteError, match=r"lm_head.weight is not finite in float16.*run.export_dtype=float32"):
        export_model(plain, processor, tmp_path / "overflow", {}, dtype="float16")
    assert not (tmp_path / "overflow").exists()
