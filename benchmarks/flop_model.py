"""FLOPs of the models in IMG's pipeline, counted from their configs (``img_lightning/tiny/sizes.py``).

What is counted: every matrix product - linear layers (``2 * tokens * d_in * d_out``), attention
scores and their weighted sum (``2 * 2 * queries * keys * width``), convolutions (``2 * positions *
k * k * c_in * c_out``); one multiply-add = 2 FLOPs, the convention of MFU figures. Not counted:
norms, activations, softmax, residual adds, embeddings lookups, the scheduler (elementwise work, < 1 %
of these models' FLOPs), and the VAE decoder and text encoders of the diffusion models (the VAE
decode of a 1024 px image is 10.5 TFLOP by torch's counter: 1.5 % of a 50-step SDXL image with CFG,
0.2 % of a 30-step FLUX one; the text encoders are less). Approximations: attention is counted in full, causal
(LLaMA) too - FlashAttention skips about half of a causal product, so LLaMA's attention term is an
upper bound (it is ~2 % of its FLOPs at 670 tokens); a backward pass is counted as 2 forwards (it
is exactly that for every linear layer whose input needs a gradient; the first layer of the aligner,
whose input is data, needs only the weight gradient).

``tests/test_flop_model.py`` checks each count against ``torch.utils.flop_counter`` running the
real (transformers / diffusers / our) modules at the full sizes on the ``meta`` device.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from img_lightning.tiny.sizes import (  # noqa: E402
    AlignerSize,
    ClipVisionSize,
    FluxSize,
    LlamaSize,
    LlavaSize,
    ResamplerSize,
    SdxlSize,
)


def linear(tokens: float, d_in: int, d_out: int) -> float:
    return 2.0 * tokens * d_in * d_out


def attention(queries: float, keys: float, width: int) -> float:
    """``Q K^T`` and ``softmax(.) V`` over ``width`` = heads x head_dim."""
    return 2.0 * 2.0 * queries * keys * width


def conv(positions: float, c_in: int, c_out: int, k: int = 3) -> float:
    """A ``k x k`` convolution evaluated at ``positions`` output positions."""
    return 2.0 * positions * k * k * c_in * c_out


# -- transformers ---------------------------------------------------------------------------------
def clip_vision(size: ClipVisionSize, projection: bool = False) -> float:
    """One image through a CLIP vision tower (patch embedding, every layer, optional projection)."""
    t, d = size.tokens, size.hidden
    flops = conv(t - 1, 3, d, k=size.patch)
    per_layer = 4 * linear(t, d, d) + linear(t, d, size.intermediate) + linear(t, size.intermediate, d)
    flops += size.layers * (per_layer + attention(t, t, d))
    return flops + (linear(1, d, size.projection_dim) if projection else 0.0)


def llama(size: LlamaSize, tokens: float, logits_tokens: float = 0) -> float:
    """A LLaMA decoder over ``tokens`` (full attention, see the module docstring), plus the LM head
    on ``logits_tokens`` positions."""
    d, head_dim = size.hidden, size.hidden // size.heads
    kv = size.kv_heads * head_dim
    per_layer = (2 * linear(tokens, d, d) + 2 * linear(tokens, d, kv)  # q, o; k, v
                 + 2 * linear(tokens, d, size.intermediate) + linear(tokens, size.intermediate, d)  # SwiGLU
                 + attention(tokens, tokens, d))
    return size.layers * per_layer + linear(logits_tokens, d, size.vocab)


def llava(size: LlavaSize, text_tokens: float, logits_tokens: float = 0) -> float:
    """LLaVA-1.5 reading one image and ``text_tokens`` of text: the vision tower, the 2-layer
    projector on the patch features, the LLaMA over image + text tokens."""
    patches = size.vision.tokens - 1
    projector = (linear(patches, size.vision.hidden, size.text.hidden)
                 + linear(patches, size.text.hidden, size.text.hidden))
    return clip_vision(size.vision) + projector + llama(size.text, patches + text_tokens, logits_tokens)


def resampler(size: ResamplerSize, in_tokens: int, in_dim: int, out_dim: int) -> float:
    """IP-Adapter-Plus's Perceiver resampler: ``queries`` latents attend to [image tokens; latents]."""
    q, d, inner = size.queries, size.dim, size.heads * size.dim_head
    per_layer = (linear(q, d, inner) + linear(in_tokens + q, d, 2 * inner) + attention(q, in_tokens + q, inner)
                 + linear(q, inner, d) + linear(q, d, size.ff_mult * d) + linear(q, size.ff_mult * d, d))
    return linear(in_tokens, in_dim, d) + size.depth * per_layer + linear(q, d, out_dim)


def ip_plus(vision: ClipVisionSize, size: ResamplerSize, out_dim: int) -> float:
    """One image -> IP-Adapter-Plus tokens (the tower's penultimate states -> resampler)."""
    return clip_vision(vision) + resampler(size, vision.tokens, vision.hidden, out_dim)


def aligner(size: AlignerSize, guidance_tokens: float) -> float:
    """One forward of the IMG aligner: IP tokens attend to [projected guidance; IP tokens]."""
    n, d, inner = size.num_tokens, size.dim, size.heads * size.dim_head
    per_layer = (linear(n, d, inner) + linear(guidance_tokens + n, d, 2 * inner)
                 + attention(n, guidance_tokens + n, inner) + linear(n, inner, d)
                 + linear(n, d, size.ff_mult * d) + linear(n, size.ff_mult * d, d))
    return linear(guidance_tokens, size.guidance_dim, d) + size.depth * per_layer + 2 * linear(n, d, d)


# -- diffusion ------------------------------------------------------------------------------------
def _sdxl_transformer(c: int, positions: int, depth: int, text_tokens: int, cross_dim: int, ip_tokens: int) -> float:
    """A ``Transformer2DModel`` (linear projections) of ``depth`` blocks: self-attention, cross-attention
    to the text (+ the IP-Adapter's decoupled cross-attention to ``ip_tokens``), GEGLU feed-forward."""
    block = (4 * linear(positions, c, c) + attention(positions, positions, c)  # attn1
             + 2 * linear(positions, c, c) + 2 * linear(text_tokens, cross_dim, c)  # attn2 q, out; k, v
             + attention(positions, text_tokens, c)
             + linear(positions, c, 8 * c) + linear(positions, 4 * c, c))  # GEGLU
    if ip_tokens:
        block += 2 * linear(ip_tokens, cross_dim, c) + attention(positions, ip_tokens, c)
    return 2 * linear(positions, c, c) + depth * block  # proj_in, proj_out


def _resnet(positions: int, c_in: int, c_out: int, temb: int) -> float:
    shortcut = conv(positions, c_in, c_out, k=1) if c_in != c_out else 0.0
    return conv(positions, c_in, c_out) + conv(positions, c_out, c_out) + linear(1, temb, c_out) + shortcut


def sdxl_unet(size: SdxlSize, height: int, width: int, text_tokens: int = 77, ip_tokens: int = 0) -> float:
    """One UNet evaluation for one image of ``height x width`` pixels (CFG doubles it)."""
    h, w = height // size.vae_scale_factor, width // size.vae_scale_factor
    ch = size.block_out_channels
    temb = 4 * ch[0]
    cross = size.cross_attention_dim
    flops = conv(h * w, 4, ch[0]) + linear(1, ch[0], temb) + linear(1, temb, temb)
    flops += linear(1, 6 * size.addition_time_embed_dim + size.text_projection, temb) + linear(1, temb, temb)
    skips = [ch[0]]
    c = ch[0]
    for i, kind in enumerate(size.down_block_types):
        for _ in range(size.layers_per_block):
            flops += _resnet(h * w, c, ch[i], temb)
            c = ch[i]
            if kind.startswith("CrossAttn"):
                flops += _sdxl_transformer(c, h * w, size.transformer_layers[i], text_tokens, cross, ip_tokens)
            skips.append(c)
        if i < len(ch) - 1:
            h, w = h // 2, w // 2
            flops += conv(h * w, c, c)  # stride-2 downsampler
            skips.append(c)
    flops += 2 * _resnet(h * w, c, c, temb)
    flops += _sdxl_transformer(c, h * w, size.transformer_layers[-1], text_tokens, cross, ip_tokens)
    up_channels = list(reversed(ch))
    up_depths = list(reversed(size.transformer_layers))
    for i, kind in enumerate(size.up_block_types):
        out = up_channels[i]
        for _ in range(size.layers_per_block + 1):
            flops += _resnet(h * w, c + skips.pop(), out, temb)
            c = out
            if kind.startswith("CrossAttn"):
                flops += _sdxl_transformer(c, h * w, up_depths[i], text_tokens, cross, ip_tokens)
        if i < len(ch) - 1:
            h, w = h * 2, w * 2
            flops += conv(h * w, c, c)  # upsampler (nearest, then a 3x3 conv)
    return flops + conv(h * w, ch[0], 4)


def flux_transformer(size: FluxSize, height: int, width: int, text_tokens: int = 512, ip_tokens: int = 0) -> float:
    """One FLUX transformer evaluation for one image (true CFG doubles it). ``ip_tokens``: the XLabs
    IP-Adapter's extra attention of the image tokens to ``ip_tokens`` tokens in every double block."""
    d = size.inner_dim
    n_img = (height // 16) * (width // 16)  # 8x VAE, then 2x2 patches packed into one token
    n = n_img + text_tokens
    embed = (linear(n_img, size.in_channels, d) + linear(text_tokens, size.t5_width, d)
             + 3 * linear(1, d, d) + linear(1, 256, d) * 2 + linear(1, size.pooled_dim, d))
    double = (2 * linear(1, d, 6 * d)  # adaLN modulation, image and text streams
              + linear(n_img, d, 3 * d) + linear(text_tokens, d, 3 * d) + attention(n, n, d)
              + linear(n_img, d, d) + linear(text_tokens, d, d)
              + linear(n_img, d, 4 * d) + linear(n_img, 4 * d, d)
              + linear(text_tokens, d, 4 * d) + linear(text_tokens, 4 * d, d))
    if ip_tokens:
        double += 2 * linear(ip_tokens, size.t5_width, d) + attention(n_img, ip_tokens, d)
    single = linear(1, d, 3 * d) + linear(n, d, 3 * d) + linear(n, d, 4 * d) + attention(n, n, d) + linear(n, 5 * d, d)
    out = linear(1, d, 2 * d) + linear(n_img, d, size.in_channels)
    return embed + size.double_blocks * double + size.single_blocks * single + out
