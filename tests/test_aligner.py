"""Implicit Aligner: official layout, identity at init, padding invariance, checkpoint round trips."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from img_lightning.aligner import CheckpointError, ImplicitAligner

DIMS = dict(guidance_dim=24, dim=32, depth=2, heads=4, dim_head=8)


def _randomised(seed: int = 0, **dims) -> ImplicitAligner:
    """An aligner whose zero-initialised output layer is randomised, so it is not the identity."""
    torch.manual_seed(seed)
    model = ImplicitAligner(**(dims or DIMS))
    with torch.no_grad():
        model.zero_linear.weight.normal_(0, 0.2)
        model.zero_linear.bias.normal_(0, 0.2)
    return model.eval()


def official_key_shapes(guidance_dim, dim, depth, heads, dim_head, ff_mult=4) -> dict[str, tuple]:
    """Parameter names and shapes of the released module (``aligner_sdxl.pth`` / ``aligner_flux.pth``), written out."""
    inner = heads * dim_head
    keys = {
        "proj_in.weight": (dim, guidance_dim),
        "proj_in.bias": (dim,),
        "proj_out.weight": (dim, dim),
        "proj_out.bias": (dim,),
        "norm_out.weight": (dim,),
        "norm_out.bias": (dim,),
        "zero_linear.weight": (dim, dim),
        "zero_linear.bias": (dim,),
    }
    for i in range(depth):
        a, f = f"layers.{i}.0", f"layers.{i}.1"
        keys.update(
            {
                f"{a}.norm1.weight": (dim,),
                f"{a}.norm1.bias": (dim,),
                f"{a}.norm2.weight": (dim,),
                f"{a}.norm2.bias": (dim,),
                f"{a}.to_q.weight": (inner, dim),
                f"{a}.to_kv.weight": (2 * inner, dim),
                f"{a}.to_out.weight": (dim, inner),
                f"{f}.0.weight": (dim,),
                f"{f}.0.bias": (dim,),
                f"{f}.1.weight": (ff_mult * dim, dim),
                f"{f}.3.weight": (dim, ff_mult * dim),
            }
        )
    return keys


def test_parameter_names_and_shapes_match_official_layout():
    model = ImplicitAligner(guidance_dim=5120, dim=2048, depth=4, heads=20, dim_head=64)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == official_key_shapes(5120, 2048, 4, 20, 64)


def test_identity_at_initialisation():
    torch.manual_seed(0)
    model = ImplicitAligner(**DIMS)
    ip = torch.randn(2, 16, DIMS["dim"])
    out = model(torch.randn(2, 9, DIMS["guidance_dim"]), ip)
    assert torch.equal(out, ip)


def _reference_attention_block(attn, x, latents):
    """The attention block computed another way: SDPA with the usual 1/sqrt(d) scale, batch of one."""
    x, lat = attn.norm1(x), attn.norm2(latents)
    q = attn.to_q(lat)
    k, v = attn.to_kv(torch.cat([x, lat], dim=1)).chunk(2, dim=-1)

    def split(t):
        return t.view(t.shape[0], t.shape[1], attn.heads, attn.dim_head).transpose(1, 2)

    out = F.scaled_dot_product_attention(split(q), split(k), split(v))
    return attn.to_out(out.transpose(1, 2).reshape(lat.shape[0], lat.shape[1], -1))


def test_forward_matches_an_independent_computation():
    model = _randomised(1)
    g = torch.randn(1, 11, DIMS["guidance_dim"])
    ip = torch.randn(1, 16, DIMS["dim"])
    x = model.proj_in(g)
    lat = ip
    for attn, ff in model.layers:
        lat = _reference_attention_block(attn, x, lat) + lat
        lat = ff(lat) + lat
    expected = ip + model.zero_linear(model.norm_out(model.proj_out(lat)))
    torch.testing.assert_close(model(g, ip), expected, atol=1e-5, rtol=1e-5)


def test_padded_batch_gives_each_sample_its_solo_output():
    model = _randomised(2)
    lengths = [5, 13, 9]
    guidance = [torch.randn(t, DIMS["guidance_dim"]) for t in lengths]
    ips = torch.randn(len(lengths), 16, DIMS["dim"])
    t_max = max(lengths)
    padded = torch.full((len(lengths), t_max, DIMS["guidance_dim"]), 7.0)  # junk in the padding
    mask = torch.zeros(len(lengths), t_max, dtype=torch.bool)
    for i, g in enumerate(guidance):
        padded[i, : len(g)] = g
        mask[i, : len(g)] = True
    batched = model(padded, ips, mask)
    for i, g in enumerate(guidance):
        alone = model(g[None], ips[i : i + 1])
        torch.testing.assert_close(batched[i : i + 1], alone, atol=1e-5, rtol=1e-5)
    # and the mask really matters: without it the junk padding changes the shorter samples
    unmasked = model(padded, ips)
    assert not torch.allclose(unmasked[0], batched[0], atol=1e-4)


def test_refine_applies_the_aligner_repeatedly():
    model = _randomised(3)
    g, ip = torch.randn(2, 7, DIMS["guidance_dim"]), torch.randn(2, 16, DIMS["dim"])
    once = model(g, ip)
    thrice = model(g, model(g, once))
    torch.testing.assert_close(model.refine(g, ip, passes=1), once)
    torch.testing.assert_close(model.refine(g, ip, passes=3), thrice)
    assert not torch.allclose(thrice, once)
    with pytest.raises(ValueError):
        model.refine(g, ip, passes=0)


def test_official_checkpoint_round_trip_with_ddp_prefix(tmp_path):
    model = _randomised(4)
    path = model.save_official(tmp_path / "aligner_sdxl.pth")
    # What the official demo does: plain torch.load of a state dict and strict load_state_dict.
    state = torch.load(path, map_location="cpu", weights_only=True)
    assert set(state) == set(official_key_shapes(**DIMS))
    fresh = ImplicitAligner(**DIMS)
    fresh.load_state_dict(state, strict=True)
    # A DDP-saved release carries "module." prefixes.
    torch.save({f"module.{k}": v for k, v in state.items()}, tmp_path / "ddp.pth")
    loaded = ImplicitAligner.load_official(tmp_path / "ddp.pth", dim_head=DIMS["dim_head"])
    assert loaded.dims == {**DIMS, "ff_mult": 4}
    g, ip = torch.randn(1, 6, DIMS["guidance_dim"]), torch.randn(1, 16, DIMS["dim"])
    torch.testing.assert_close(loaded(g, ip), model(g, ip))
    # safetensors export loads back identically
    model.save_safetensors(tmp_path / "a.safetensors")
    again = ImplicitAligner.load_official(tmp_path / "a.safetensors", dim_head=DIMS["dim_head"])
    torch.testing.assert_close(again(g, ip), model(g, ip))


def test_load_official_rejects_wrong_dims(tmp_path):
    _randomised(5).save_official(tmp_path / "a.pth")
    with pytest.raises(ValueError, match="guidance_dim"):
        ImplicitAligner.load_official(tmp_path / "a.pth", guidance_dim=999, dim_head=DIMS["dim_head"])
    with pytest.raises(FileNotFoundError):
        ImplicitAligner.load_official(tmp_path / "missing.pth")


def test_dims_come_from_the_checkpoints_own_metadata(tmp_path):
    """An export records its head split; loading never guesses it (4 heads of 8 is not 1 of 32)."""
    model = _randomised(6)
    g, ip = torch.randn(1, 6, DIMS["guidance_dim"]), torch.randn(1, 16, DIMS["dim"])
    st = model.save_safetensors(tmp_path / "aligner.safetensors")
    pth = model.save_official(tmp_path / "aligner.pth")
    (tmp_path / "aligner.json").write_text(json.dumps({**model.dims, "cache_key": "x"}))
    for path in (st, pth):
        loaded = ImplicitAligner.load_official(path)  # no dims given: the metadata has them
        assert loaded.dims == model.dims
        torch.testing.assert_close(loaded(g, ip), model(g, ip))
        with pytest.raises(CheckpointError, match="dim_head=32 but the checkpoint records 8"):
            ImplicitAligner.load_official(path, dim_head=32)
    # The same tensors under a wrong head split give other outputs: why guessing is refused.
    wrong = ImplicitAligner(**{**DIMS, "heads": 1, "dim_head": 32})
    wrong.load_state_dict(model.state_dict())
    assert not torch.allclose(wrong(g, ip), model(g, ip))


def test_evaluation_warns_when_passes_differ_from_the_export(tmp_path, caplog):
    from omegaconf import OmegaConf

    from img_lightning.aligner import recorded_passes
    from img_lightning.generation.requirements import load_aligner

    pth = _randomised(6).save_official(tmp_path / "aligner.pth")
    assert recorded_passes(pth) is None  # a bare released .pth records nothing
    (tmp_path / "aligner.json").write_text(json.dumps({**DIMS, "passes": 2}))
    assert recorded_passes(pth) == 2
    cfg = OmegaConf.create({"checkpoint": str(pth), "dim_head": None, "heads": None, "passes": 3})
    with caplog.at_level("WARNING"):
        load_aligner(cfg)
    assert "exported for 2 passes" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        load_aligner(OmegaConf.merge(cfg, {"passes": 2}))
    assert "passes" not in caplog.text


def test_bare_official_pth_needs_the_head_split(tmp_path):
    model = _randomised(7)
    bare = tmp_path / "released" / "aligner_sdxl.pth"
    model.save_official(bare)
    with pytest.raises(CheckpointError, match="img.aligner.dim_head"):
        ImplicitAligner.load_official(bare)
    assert ImplicitAligner.load_official(bare, heads=DIMS["heads"]).dims == model.dims
    assert ImplicitAligner.load_official(bare, dim_head=DIMS["dim_head"]).dims == model.dims


def test_non_finite_or_foreign_checkpoints_are_refused(tmp_path):
    model = _randomised(8)
    with torch.no_grad():
        model.proj_out.weight[0, 0] = float("nan")
    with pytest.raises(CheckpointError, match="NaN"):
        model.save_official(tmp_path / "nan.pth")
    assert not (tmp_path / "nan.pth").exists() and not list(tmp_path.iterdir())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    torch.save(state, tmp_path / "nan_released.pth")
    with pytest.raises(CheckpointError, match="NaN"):
        ImplicitAligner.load_official(tmp_path / "nan_released.pth", dim_head=DIMS["dim_head"])
    (tmp_path / "garbage.pth").write_bytes(b"\x00garbage" * 20)
    with pytest.raises(CheckpointError, match="not a readable aligner checkpoint") as err:
        ImplicitAligner.load_official(tmp_path / "garbage.pth", dim_head=8)
    assert "weights_only=False" not in str(err.value)
    # A pickled object (not a plain state dict) is refused without being unpickled.
    torch.save({"weights": state, "optimizer": object.__new__(ImplicitAligner)}, tmp_path / "pickled.pth")
    with pytest.raises(CheckpointError):
        ImplicitAligner.load_official(tmp_path / "pickled.pth", dim_head=8)
