"""How much of a LoRA update survives the export's merge, per export dtype.

    python benchmarks/lora_merge_precision.py [--size 4096] [--rank 128] [--update 0.01]

One ``size x size`` linear layer, its weight in bf16 (the LoRA recipes' frozen base), a float32
LoRA update whose RMS is ``--update`` times the weight's. For each way of merging it reports the
relative error of the update's effect on random inputs, ``||(W_export - W) x - D x|| / ||D x||``
(``W``: the bf16 base, exact in float32; ``D``: the float32 update):

* ``peft merge_and_unload``: the update added to the bf16 weight in place (rounded to bf16), then
  cast to the export dtype - what the export did before;
* ``merge_lora`` (:mod:`img_lightning.finetune.merge`): float32 base + update, rounded once.

Nothing here runs in the test suite.
"""

from __future__ import annotations

import argparse
import copy

import torch
from torch import nn


class One(nn.Module):
    def __init__(self, size: int) -> None:
        super().__init__()
        self.proj = nn.Linear(size, size, bias=False)


def lora_model(size: int, rank: int, update: float, seed: int = 0) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    base = One(size)
    nn.init.normal_(base.proj.weight, std=0.02)
    base = base.to(torch.bfloat16)
    model = get_peft_model(base, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["proj"]))
    layer = model.base_model.model.proj
    for p in (layer.lora_A["default"].weight, layer.lora_B["default"].weight):
        p.data = torch.randn(p.shape, dtype=torch.float32)
    delta = layer.get_delta_weight("default").detach().float()
    weight = layer.base_layer.weight.detach().float()
    scale = update * weight.pow(2).mean().sqrt() / delta.pow(2).mean().sqrt()
    layer.lora_B["default"].weight.data *= scale
    return model, weight, delta * scale


def effect_error(exported: torch.Tensor, weight: torch.Tensor, delta: torch.Tensor, x: torch.Tensor) -> float:
    got = (exported.detach().float() - weight) @ x
    want = delta @ x
    return float((got - want).norm() / want.norm())


def main() -> None:
    from img_lightning.finetune.merge import merge_lora

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--rank", type=int, default=128)
    parser.add_argument("--update", type=float, default=0.01, help="update RMS / weight RMS")
    args = parser.parse_args()
    model, weight, delta = lora_model(args.size, args.rank, args.update)
    x = torch.randn(args.size, 64)
    print(f"{args.size} x {args.size} weight in bf16, rank-{args.rank} float32 update at {args.update:.0%} of its RMS")
    print(f"{'merge':28s} {'export dtype':12s} relative error of the update's effect")
    for name in ("float16", "bfloat16", "float32"):
        dtype = getattr(torch, name)
        old = copy.deepcopy(model).merge_and_unload().proj.weight.to(dtype)
        print(f"{'peft merge_and_unload':28s} {name:12s} {effect_error(old, weight, delta, x):.4f}")
    for name in ("float16", "bfloat16", "float32"):
        dtype = getattr(torch, name)
        new = merge_lora(copy.deepcopy(model), dtype).proj.weight
        print(f"{'merge_lora (float32, once)':28s} {name:12s} {effect_error(new, weight, delta, x):.4f}")


if __name__ == "__main__":
    main()
