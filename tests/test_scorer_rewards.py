"""ImageReward and the LAION aesthetic predictor against independent reimplementations of their
reference forwards, on tiny random weights saved in the released formats."""

import json
import math

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from torch import nn

from img_lightning.config.eval import ScorerConfig
from img_lightning.evaluation.scorers import build_scorers
from img_lightning.evaluation.scorers.checkpoints import CheckpointError
from img_lightning.models import ModelNotFoundError
from reference_transforms import batch, clip_reference_pixels

PROMPTS = ["a red car next to a blue dog", "The yellow lamp was on top of the wooden desk.",
           " ".join(["a round green table with a white cup and a black hat"] * 5)]  # > 35 tokens: truncated


def cfg(**kw):
    return OmegaConf.merge(OmegaConf.structured(ScorerConfig), dict(device="cpu", **kw))


def images():
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)),
            Image.fromarray(rng.integers(0, 255, (70, 33, 3), dtype=np.uint8)),
            Image.new("RGB", (32, 32), (0, 128, 255))]


# -- ImageReward, written from its reference code's structure: BLIP's ViT and med.py's BERT ------------
class RefViTAttention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        attn = ((q @ k.transpose(-2, -1)) * (c // self.heads) ** -0.5).softmax(-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


class RefViTMlp(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x):
        return self.fc2(nn.functional.gelu(self.fc1(x)))


class RefBlock(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
        self.attn, self.mlp = RefViTAttention(dim, heads), RefViTMlp(dim)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class RefPatchEmbed(nn.Module):
    def __init__(self, dim, patch):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch, patch)


class RefViT(nn.Module):
    def __init__(self, dim=128, heads=2, depth=2, patch=8, image=32):
        super().__init__()
        self.patch_embed = RefPatchEmbed(dim, patch)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.1)
        self.pos_embed = nn.Parameter(torch.randn(1, (image // patch) ** 2 + 1, dim) * 0.1)
        self.blocks = nn.ModuleList(RefBlock(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, img):
        x = self.patch_embed.proj(img).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)


class RefSelfAttention(nn.Module):
    def __init__(self, dim, kv_dim, heads):
        super().__init__()
        self.heads = heads
        self.query, self.key, self.value = nn.Linear(dim, dim), nn.Linear(kv_dim, dim), nn.Linear(kv_dim, dim)

    def forward(self, h, mask, enc=None):
        src = h if enc is None else enc
        split = lambda t: t.view(t.shape[0], t.shape[1], self.heads, -1).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.query(h)), split(self.key(src)), split(self.value(src))
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) + mask
        return (scores.softmax(-1) @ v).transpose(1, 2).reshape(h.shape)


class RefOutput(nn.Module):
    def __init__(self, d_in, dim):
        super().__init__()
        self.dense, self.LayerNorm = nn.Linear(d_in, dim), nn.LayerNorm(dim, eps=1e-12)

    def forward(self, x, residual):
        return self.LayerNorm(self.dense(x) + residual)


class RefAttentionBlock(nn.Module):
    def __init__(self, dim, kv_dim, heads):
        super().__init__()
        self.self = RefSelfAttention(dim, kv_dim, heads)  # med.py names it `self`
        self.output = RefOutput(dim, dim)

    def forward(self, h, mask, enc=None):
        return self.output(self.self(h, mask, enc), h)


class RefIntermediate(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.dense = nn.Linear(dim, 4 * dim)


class RefBertLayer(nn.Module):
    def __init__(self, dim, enc_dim, heads):
        super().__init__()
        self.attention = RefAttentionBlock(dim, dim, heads)
        self.crossattention = RefAttentionBlock(dim, enc_dim, heads)
        self.intermediate = RefIntermediate(dim)
        self.output = RefOutput(4 * dim, dim)

    def forward(self, h, mask, enc, enc_mask):
        h = self.attention(h, mask)
        h = self.crossattention(h, enc_mask, enc)
        return self.output(nn.functional.gelu(self.intermediate.dense(h)), h)


class RefEmbeddings(nn.Module):
    def __init__(self, vocab, dim, positions):
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab, dim, padding_idx=0)
        self.position_embeddings = nn.Embedding(positions, dim)
        self.LayerNorm = nn.LayerNorm(dim, eps=1e-12)
        self.register_buffer("position_ids", torch.arange(positions).expand((1, -1)))  # persistent, as med.py


class RefEncoder(nn.Module):
    def __init__(self, dim, enc_dim, heads, depth):
        super().__init__()
        self.layer = nn.ModuleList(RefBertLayer(dim, enc_dim, heads) for _ in range(depth))


class RefBert(nn.Module):
    def __init__(self, vocab, dim=64, enc_dim=128, heads=2, depth=2, positions=40):
        super().__init__()
        self.embeddings = RefEmbeddings(vocab, dim, positions)
        self.encoder = RefEncoder(dim, enc_dim, heads, depth)

    def forward(self, ids, mask, enc):
        e = self.embeddings
        h = e.LayerNorm(e.word_embeddings(ids) + e.position_embeddings(e.position_ids[:, : ids.shape[1]]))
        ext = (1.0 - mask[:, None, None, :].float()) * -10000.0  # med.py's additive mask
        enc_mask = torch.zeros(1, 1, 1, enc.shape[1])
        for layer in self.encoder.layer:
            h = layer(h, ext, enc, enc_mask)
        return h


class RefBLIP(nn.Module):
    def __init__(self, vocab):
        super().__init__()
        self.visual_encoder = RefViT()
        self.text_encoder = RefBert(vocab)
        self.vision_proj, self.text_proj = nn.Linear(128, 16), nn.Linear(64, 16)


class RefMLP(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(d, 32), nn.Dropout(0.2), nn.Linear(32, 16), nn.Dropout(0.2),
                                    nn.Linear(16, 8), nn.Dropout(0.1), nn.Linear(8, 4), nn.Linear(4, 1))


class RefImageReward(nn.Module):
    mean, std = 0.16717362830052426, 1.0333394966054072

    def __init__(self, vocab):
        super().__init__()
        self.blip = RefBLIP(vocab)
        self.mlp = RefMLP(64)

    def forward(self, pixels, ids, mask):
        image_embeds = self.blip.visual_encoder(pixels)
        txt = self.blip.text_encoder(ids, mask, image_embeds)[:, 0, :].float()
        return ((self.mlp.layers(txt) - self.mean) / self.std)[:, 0]


@pytest.fixture(scope="module")
def image_reward(tmp_path_factory, tiny_scorer_dirs):
    """A random RefImageReward saved as ImageReward.pt (torch.save of its plain state dict)."""
    where = tmp_path_factory.mktemp("image_reward")
    from transformers import BertTokenizer

    tok_dir = tiny_scorer_dirs["image_reward_tokenizer"]
    vocab = len(BertTokenizer.from_pretrained(tok_dir)) + 2
    torch.manual_seed(1)
    ref = RefImageReward(vocab).eval()
    with torch.no_grad():  # LayerNorm affine params away from 1/0, so a mapping mix-up shows
        for name, p in ref.named_parameters():
            if "norm" in name.lower():
                p.add_(torch.randn_like(p) * 0.1)
    ckpt = where / "ImageReward.pt"
    torch.save(ref.state_dict(), ckpt)
    (where / "med_config.json").write_text(json.dumps({"hidden_size": 64, "num_attention_heads": 2,
                                                       "num_hidden_layers": 2, "vocab_size": vocab}))
    return ref, ckpt, tok_dir


def test_image_reward_matches_the_reference_forward(image_reward):
    from transformers import BertTokenizer

    ref, ckpt, tok_dir = image_reward
    scorer = build_scorers([cfg(kind="image_reward", checkpoint=str(ckpt), processor_path=str(tok_dir),
                                batch_size=2)])["image_reward"]
    ims = images()
    # the reference's tokenisation: BLIP's init_tokenizer, then max_length 35 padding/truncation
    tok = BertTokenizer.from_pretrained(tok_dir)
    tok.add_special_tokens({"bos_token": "[DEC]"})
    tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    enc = tok(PROMPTS, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    assert enc["input_ids"].shape == (3, 35) and enc["attention_mask"][2].all() and not enc["attention_mask"][0].all()
    with torch.no_grad():
        want = ref(batch(clip_reference_pixels, ims, 32), enc["input_ids"], enc["attention_mask"])
    got = scorer.score(ims, PROMPTS)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert want.std() > 1e-3  # the images/prompts really give different rewards
    # one by one (ImageReward.score) = batched
    assert scorer.score(ims[1:2], PROMPTS[1:2])[0].item() == pytest.approx(want[1].item(), abs=1e-5)
    d = scorer.describe()
    assert d["exact"] is True and len(d["sha256"]) == 64 and "1.0333394966054072" in d["scale"]
    assert scorer.tokenizer.convert_tokens_to_ids("[ENC]") == len(scorer.tokenizer) - 1


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_image_reward_refuses_pickles_and_foreign_layouts(image_reward, tmp_path):
    ref, ckpt, tok_dir = image_reward
    state = torch.load(ckpt, weights_only=True)
    evil = tmp_path / "evil.pt"
    torch.save({**state, "extra": _Evil()}, evil)
    with pytest.raises(CheckpointError, match="refused: loading this ImageReward checkpoint would unpickle code"):
        build_scorers([cfg(kind="image_reward", checkpoint=str(evil), processor_path=str(tok_dir))])
    odd = tmp_path / "odd.pt"
    torch.save({**state, "blip.something_else.weight": torch.zeros(1)}, odd)
    with pytest.raises(CheckpointError, match="outside ImageReward's layout"):
        build_scorers([cfg(kind="image_reward", checkpoint=str(odd), processor_path=str(tok_dir))])
    short = tmp_path / "short.pt"
    torch.save({k: v for k, v in state.items() if "blocks.1." not in k or "norm2" not in k}, short)
    with pytest.raises(CheckpointError, match="visual encoder does not fit"):
        build_scorers([cfg(kind="image_reward", checkpoint=str(short), processor_path=str(tok_dir))])
    with pytest.raises(ModelNotFoundError, match="ImageReward.pt"):
        build_scorers([cfg(kind="image_reward")])


def test_tiny_image_reward_in_the_released_layout_loads(tiny_scorer_dirs):
    d = tiny_scorer_dirs
    state = torch.load(d["image_reward_checkpoint"], weights_only=True)
    assert {k.split(".")[0] + "." + k.split(".")[1] for k in state} == {
        "blip.visual_encoder", "blip.text_encoder", "blip.vision_proj", "blip.text_proj", "mlp.layers"}
    s = build_scorers([cfg(kind="image_reward", checkpoint=str(d["image_reward_checkpoint"]),
                           processor_path=str(d["image_reward_tokenizer"]))])["image_reward"]
    out = s.score(images(), PROMPTS)
    assert torch.isfinite(out).all() and out.std() > 0


# -- the LAION aesthetic predictor ---------------------------------------------------------------------
def test_aesthetic_matches_the_reference_inference(tiny_scorer_dirs, tmp_path):
    from transformers import CLIPModel

    d = tiny_scorer_dirs
    scorer = build_scorers([cfg(kind="aesthetic", path=str(d["clip"]),
                                checkpoint=str(d["aesthetic_mlp"]))])["aesthetic"]
    ims = images()
    clip = CLIPModel.from_pretrained(d["clip"]).eval()
    mlp = RefMLP(16)
    mlp.load_state_dict(torch.load(d["aesthetic_mlp"], weights_only=True))
    mlp.eval()
    with torch.no_grad():
        feats = clip.get_image_features(pixel_values=batch(clip_reference_pixels, ims, 32))
        feats = feats if isinstance(feats, torch.Tensor) else feats.pooler_output
        emb = feats.numpy()
        emb = emb / np.linalg.norm(emb, 2, axis=-1, keepdims=True)  # simple_inference.py's normalized()
        want = mlp.layers(torch.from_numpy(emb).float())[:, 0]
    torch.testing.assert_close(scorer.score(ims, ["unused"] * 3), want, atol=1e-5, rtol=1e-5)
    assert want.std() > 0
    # the same weights as .safetensors give the same scores
    from safetensors.torch import save_file

    st = tmp_path / "mlp.safetensors"
    save_file(torch.load(d["aesthetic_mlp"], weights_only=True), st)
    again = build_scorers([cfg(kind="aesthetic", path=str(d["clip"]), checkpoint=str(st))])["aesthetic"]
    torch.testing.assert_close(again.score(ims, ["x"] * 3), want, atol=1e-5, rtol=1e-5)
    bad = tmp_path / "bad.pth"
    torch.save({"layers.0.weight": torch.zeros(2, 16)}, bad)
    with pytest.raises(CheckpointError, match="not the aesthetic predictor's MLP"):
        build_scorers([cfg(kind="aesthetic", path=str(d["clip"]), checkpoint=str(bad))])
