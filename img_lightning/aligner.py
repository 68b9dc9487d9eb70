"""The IMG Implicit Aligner ``f_theta(h, c_I) -> c_I'``.

Parameter names and shapes follow the released checkpoints (``aligner_sdxl.pth``,
``aligner_flux.pth``) so that :meth:`ImplicitAligner.load_official` and
:meth:`ImplicitAligner.save_official` round-trip with the official demo. Unlike the official
module (batch size 1 only), this one takes a key-padding mask so variable-length MLLM guidance can
be batched; a padded sample gets exactly the output it gets alone.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Optional, cast

import torch
from torch import Tensor, nn

from .atomic import atomic_path
from .errors import UserError


class AlignerAttention(nn.Module):
    """Perceiver-style attention: IP latents attend to ``[guidance; latents]``."""

    def __init__(self, dim: int, heads: int, dim_head: int) -> None:
        super().__init__()
        self.heads = heads
        self.dim_head = dim_head
        inner = heads * dim_head
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def _split_heads(self, t: Tensor) -> Tensor:
        b, n, _ = t.shape
        return t.view(b, n, self.heads, self.dim_head).transpose(1, 2)

    def forward(self, x: Tensor, latents: Tensor, x_mask: Optional[Tensor] = None) -> Tensor:
        x = self.norm1(x)
        latents = self.norm2(latents)
        b, n_lat, _ = latents.shape
        q = self._split_heads(self.to_q(latents))
        k, v = self.to_kv(torch.cat((x, latents), dim=1)).chunk(2, dim=-1)
        k, v = self._split_heads(k), self._split_heads(v)
        # Scaling q and k by dim_head^-1/4 each (not the product by ^-1/2) keeps fp16 logits small;
        # it is what the released weights were trained with.
        s = self.dim_head**-0.25
        scores = (q * s) @ (k * s).transpose(-2, -1)  # [b, heads, n_lat, n_x + n_lat]
        if x_mask is not None:
            keep = torch.cat((x_mask, x_mask.new_ones(b, n_lat)), dim=1)
            scores = scores.masked_fill(~keep[:, None, None, :], float("-inf"))
        weights = torch.softmax(scores.float(), dim=-1).to(v.dtype)
        out = (weights @ v).transpose(1, 2).reshape(b, n_lat, -1)
        return self.to_out(out)


def _feed_forward(dim: int, mult: int) -> nn.Sequential:
    # Index layout 0..3 is part of the checkpoint format (layers.{i}.1.{0,1,3}).
    return nn.Sequential(
        nn.LayerNorm(dim),
        nn.Linear(dim, dim * mult, bias=False),
        nn.GELU(),
        nn.Linear(dim * mult, dim, bias=False),
    )


class ImplicitAligner(nn.Module):
    """Maps IP tokens ``c_I`` ([B, N, dim]) to aligned tokens, guided by MLLM states ``h``.

    The IP tokens themselves are the queries (no learned latents) and the output layer
    ``zero_linear`` starts at zero, so a fresh aligner is the identity map.
    """

    def __init__(
        self,
        guidance_dim: int,
        dim: int,
        depth: int,
        heads: int,
        dim_head: int,
        ff_mult: int = 4,
    ) -> None:
        super().__init__()
        self.dims = dict(
            guidance_dim=guidance_dim, dim=dim, depth=depth, heads=heads, dim_head=dim_head, ff_mult=ff_mult
        )
        self.proj_in = nn.Linear(guidance_dim, dim)
        self.layers = nn.ModuleList(
            nn.ModuleList([AlignerAttention(dim, heads, dim_head), _feed_forward(dim, ff_mult)])
            for _ in range(depth)
        )
        self.proj_out = nn.Linear(dim, dim)
        self.norm_out = nn.LayerNorm(dim)
        self.zero_linear = nn.Linear(dim, dim)
        nn.init.zeros_(self.zero_linear.weight)
        nn.init.zeros_(self.zero_linear.bias)

    def forward(self, guidance: Tensor, ip_tokens: Tensor, guidance_mask: Optional[Tensor] = None) -> Tensor:
        """One aligner pass.

        Args:
            guidance: MLLM hidden states ``[B, T, guidance_dim]`` (padded along T).
            ip_tokens: IP features ``[B, N, dim]``.
            guidance_mask: ``[B, T]`` bool, True for real tokens; None when nothing is padded.
        """
        if guidance_mask is not None:
            guidance_mask = guidance_mask.to(torch.bool)
        x = self.proj_in(guidance)
        latents = ip_tokens
        for block in self.layers:
            attn, ff = cast(nn.ModuleList, block)  # the official layout: [attention, feed-forward]
            latents = attn(x, latents, guidance_mask) + latents
            latents = ff(latents) + latents
        return ip_tokens + self.zero_linear(self.norm_out(self.proj_out(latents)))

    @torch.no_grad()
    def refine(
        self, guidance: Tensor, ip_tokens: Tensor, guidance_mask: Optional[Tensor] = None, passes: int = 3
    ) -> Tensor:
        """Inference: apply the aligner ``passes`` times, ``c <- f(h, c)`` (paper: 3)."""
        if passes < 1:
            raise ValueError(f"passes must be >= 1, got {passes}")
        out = ip_tokens
        for _ in range(passes):
            out = self(guidance, out, guidance_mask)
        return out

    # ------------------------------------------------------------------ official checkpoints
    @staticmethod
    def infer_dims(state_dict: Mapping[str, Tensor], dim_head: int) -> dict[str, int]:
        """Read guidance_dim, dim, depth, heads and ff_mult off a state dict's shapes.

        ``heads`` and ``dim_head`` are only known through their product, so ``dim_head`` is given.
        """
        sd = _strip_module_prefix(state_dict)
        try:
            dim, guidance_dim = sd["proj_in.weight"].shape
            depth = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"layers\.(\d+)\.", k)))
            inner = sd["layers.0.0.to_q.weight"].shape[0]
            ff_hidden = sd["layers.0.1.1.weight"].shape[0]
        except (KeyError, ValueError) as err:
            raise CheckpointError(f"not an Implicit Aligner state dict (missing {err})") from None
        if inner % dim_head:
            raise CheckpointError(f"attention width {inner} is not a multiple of dim_head={dim_head}")
        return dict(
            guidance_dim=int(guidance_dim),
            dim=int(dim),
            depth=depth,
            heads=inner // dim_head,
            dim_head=dim_head,
            ff_mult=ff_hidden // dim,
        )

    @classmethod
    def load_official(cls, path: str | Path, **dims: Optional[int]) -> ImplicitAligner:
        """Load a released checkpoint (``.pth`` state dict, optional DDP ``module.`` prefix) or one of
        our exports (``.safetensors``, or ``.pth`` with its ``.json`` beside it).

        The head split (``heads`` x ``dim_head``) is not in the tensor shapes, only its product. Our
        exports record every dim (safetensors metadata, the ``.json`` sidecar): those are used, and
        a given dim that contradicts them is refused. A checkpoint without metadata (the released
        ``aligner_*.pth``) needs ``dim_head`` or ``heads`` from the caller. A non-finite weight is
        refused: an aligner that outputs NaN would silently produce black images.
        """
        given = {k: int(v) for k, v in dims.items() if v is not None}
        state_dict = load_state_dict_file(path)
        recorded = checkpoint_dims(path)
        if recorded:
            contradicted = {k: (v, recorded[k]) for k, v in given.items() if k in recorded and recorded[k] != v}
            if contradicted:
                detail = ", ".join(f"{k}={a} but the checkpoint records {b}" for k, (a, b) in contradicted.items())
                raise CheckpointError(f"{path}: the config contradicts the aligner's own metadata ({detail}); "
                                      f"remove those keys or fix them")
            given = {**recorded, **given}
        if "dim_head" not in given and "heads" not in given:
            raise CheckpointError(
                f"{path} records no head split (heads x dim_head): set img.aligner.dim_head (the released "
                f"aligner_sdxl.pth / aligner_flux.pth use 20 heads of 64, i.e. dim_head=64)"
            )
        dim_head = given.get("dim_head") or _dim_head_from_heads(state_dict, given["heads"], path)
        inferred = cls.infer_dims(state_dict, dim_head=dim_head)
        mismatched = {k: (v, inferred[k]) for k, v in given.items() if k in inferred and inferred[k] != v}
        if mismatched:
            detail = ", ".join(f"{k}: asked {a}, checkpoint has {b}" for k, (a, b) in mismatched.items())
            raise CheckpointError(f"{path}: aligner dims do not match the checkpoint ({detail})")
        bad = [k for k, v in state_dict.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
        if bad:
            raise CheckpointError(f"{path}: {len(bad)} tensors hold NaN/Inf (first: {bad[0]}); the training run "
                                  f"that wrote it diverged")
        model = cls(**inferred)
        model.load_state_dict(state_dict, strict=True)
        return model

    def check_finite(self, what: str = "aligner") -> None:
        """Refuse to write or use weights that hold NaN/Inf (a diverged run)."""
        bad = [k for k, v in self.state_dict().items() if not bool(torch.isfinite(v).all())]
        if bad:
            raise CheckpointError(f"{what}: {len(bad)} of its tensors hold NaN/Inf (first: {bad[0]}); "
                                  f"training diverged, nothing was written")

    def save_official(self, path: str | Path) -> Path:
        """Write a plain ``.pth`` state dict the official demo loads with ``load_state_dict``."""
        self.check_finite(str(path))
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            torch.save({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}, tmp)
        return path

    def save_safetensors(self, path: str | Path) -> Path:
        """Same tensors as :meth:`save_official`, in safetensors, with the dims as metadata."""
        from safetensors.torch import save_file

        self.check_finite(str(path))
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata={k: str(v) for k, v in self.dims.items()})
        return path


class CheckpointError(UserError, ValueError):
    """An aligner checkpoint that cannot be used as asked; the message names the file and what to do."""


DIM_KEYS = ("guidance_dim", "dim", "depth", "heads", "dim_head", "ff_mult")


def checkpoint_dims(path: str | Path) -> dict[str, int]:
    """The dims a checkpoint records about itself: safetensors metadata and/or the ``.json`` written
    beside an export (``aligner.pth`` -> ``aligner.json``). Empty for a bare released ``.pth``."""
    path = Path(path)
    found: dict[str, int] = {}
    sources: list[tuple[str, Mapping]] = []
    if path.suffix == ".safetensors" and path.is_file():
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            sources.append((path.name, f.metadata() or {}))
    sidecar = read_sidecar(path)
    if sidecar is not None:
        sources.append((path.with_suffix(".json").name, sidecar))
    for name, meta in sources:
        for key in DIM_KEYS:
            if key not in meta:
                continue
            try:
                value = int(meta[key])
            except (TypeError, ValueError):
                raise CheckpointError(f"{path}: {name} records {key}={meta[key]!r}, not an integer") from None
            if found.setdefault(key, value) != value:
                raise CheckpointError(f"{path}: its metadata disagree on {key} ({found[key]} vs {value} in {name})")
    return found


def read_sidecar(path: str | Path) -> Optional[dict]:
    """The ``.json`` written beside an export (``aligner.pth`` -> ``aligner.json``); None if absent."""
    import json

    sidecar = Path(path).with_suffix(".json")
    if not sidecar.is_file():
        return None
    try:
        meta = json.loads(sidecar.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{sidecar}: not valid JSON ({err}); delete or fix it") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{sidecar}: not a JSON object; delete or fix it")
    return meta


def recorded_passes(path: str | Path) -> Optional[int]:
    """The inference passes an export was trained for (``model.passes`` in its ``.json`` sidecar);
    None for a bare released ``.pth`` or a sidecar that does not record an integer."""
    value = (read_sidecar(path) or {}).get("passes")
    try:
        return int(value) if value is not None else None
    except (TypeError, ValueError):
        return None


def _dim_head_from_heads(state_dict: Mapping[str, Tensor], heads: int, path: str | Path) -> int:
    inner = int(state_dict["layers.0.0.to_q.weight"].shape[0]) if "layers.0.0.to_q.weight" in state_dict else 0
    if heads <= 0 or not inner or inner % heads:
        raise CheckpointError(f"{path}: attention width {inner} cannot be split into {heads} heads")
    return inner // heads


def _strip_module_prefix(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {k[len("module.") :] if k.startswith("module.") else k: v for k, v in state_dict.items()}


def load_state_dict_file(path: str | Path) -> dict[str, Tensor]:
    """Load tensors from ``.safetensors`` or, safely (``weights_only=True``), from ``.pth``/``.pt``/``.bin``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"aligner checkpoint not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch/safetensors raise many types for foreign bytes
        # Never suggest weights_only=False (torch's own message does): that would run pickled code.
        raise CheckpointError(
            f"{path}: not a readable aligner checkpoint ({type(err).__name__}); expected a safetensors file or "
            f"a plain torch state dict of tensors. Files that need unpickling arbitrary objects are refused."
        ) from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: expected a state dict of tensors, found {type(state).__name__}")
    return _strip_module_prefix(state)
