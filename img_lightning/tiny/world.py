"""Every tiny model the demo and the tests need, built into one folder, plus the overrides that
point the demo recipe (``configs/preprocess/demo.yaml``) at them."""

from __future__ import annotations

from pathlib import Path


def build_tiny_world(root: str | Path, qwen: bool = False, seed: int = 0) -> dict[str, Path]:
    """Build (or reuse, if already complete) the tiny SDXL pipeline, IP-Adapter-Plus + CLIP tower,
    LLaVA (and optionally Qwen2.5-VL) under ``root``; returns their folders by name."""
    from .ip_adapter import SDXL_PLUS_SUBFOLDER, SDXL_PLUS_WEIGHT, build_tiny_ip_adapter_plus_sdxl
    from .mllm import build_tiny_llava, build_tiny_qwen2_5_vl
    from .sdxl import build_tiny_sdxl

    root = Path(root)
    paths = {"sdxl": root / "sdxl", "ip_adapter": root / "ip_adapter", "llava": root / "llava"}
    if not all((paths["sdxl"] / f).is_file() for f in ("model_index.json", "unet/config.json", "vae/config.json")):
        build_tiny_sdxl(paths["sdxl"], seed=seed)
    if not (paths["ip_adapter"] / SDXL_PLUS_SUBFOLDER / SDXL_PLUS_WEIGHT).is_file():
        build_tiny_ip_adapter_plus_sdxl(paths["ip_adapter"], paths["sdxl"], seed=seed)
    if not (paths["llava"] / "model.safetensors").is_file():
        build_tiny_llava(paths["llava"], seed=seed)
    if qwen:
        paths["qwen2_5_vl"] = root / "qwen2_5_vl"
        if not (paths["qwen2_5_vl"] / "model.safetensors").is_file():
            build_tiny_qwen2_5_vl(paths["qwen2_5_vl"], seed=seed)
    return paths


def preprocess_overrides(paths: dict[str, Path]) -> list[str]:
    """``key=value`` overrides for ``configs/preprocess/demo.yaml`` (local paths are not in the cache key)."""
    return [
        f"encoders.mllm.path={paths['llava']}",
        f"encoders.ip.image_encoder_path={paths['ip_adapter']}",
        f"encoders.ip.adapter_path={paths['ip_adapter']}",
    ]
