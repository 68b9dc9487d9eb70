"""img-convert-llava: a tiny checkpoint in the ORIGINAL LLaVA-repository format (what the released
IMG model is) converts, and the converted model's guidance equals an independent forward of the
original layout; every unsupported input is refused with one clear error."""

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from PIL import Image

from img_lightning.cli.convert_llava import main
from img_lightning.config.encoders import MLLMConfig
from img_lightning.convert.llava import convert_llava
from img_lightning.convert.llava_source import ConversionError
from img_lightning.encoders.mllm import GuidanceEncoder
from img_lightning.tiny.llava_original import (
    build_tiny_clip_tower,
    build_tiny_llava_original,
    original_config,
    write_state_dict,
)

IMAGE_INDEX = -200  # LLaVA's IMAGE_TOKEN_INDEX
V0_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
             "The assistant gives helpful, detailed, and polite answers to the human's questions.")


# -- the reference: the original LLaVA forward, written from LLaVA's documented logic ---------------
def ref_tokenizer_image_token(prompt, tokenizer):
    """LLaVA's tokenizer_image_token: split at <image>, tokenise each chunk, keep one BOS."""
    chunks = [tokenizer(chunk).input_ids for chunk in prompt.split("<image>")]
    keep_bos = bool(chunks[0]) and chunks[0][0] == tokenizer.bos_token_id
    ids = [chunks[0][0]] if keep_bos else []
    for n, chunk in enumerate(chunks):
        if n:
            ids.append(IMAGE_INDEX)
        ids += chunk[1:] if keep_bos else chunk
    return ids


def ref_pixels(image, processor_cfg):
    """expand2square with int(mean*255), then the slow CLIPImageProcessor: PIL bicubic resize of the
    shortest edge, centre crop, x/255 in float64 -> float32, (x - mean) / std."""
    mean = processor_cfg["image_mean"]
    std = processor_cfg["image_std"]
    size = processor_cfg["crop_size"]["height"]
    w, h = image.size
    if w != h:
        side = max(w, h)
        canvas = Image.new(image.mode, (side, side), tuple(int(m * 255) for m in mean))
        canvas.paste(image, ((side - w) // 2, (side - h) // 2))
        image = canvas
    image = image.resize((size, size), Image.BICUBIC)
    arr = (np.asarray(image).astype(np.float64) * (1 / 255)).astype(np.float32)
    arr = (arr - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return torch.from_numpy(arr.transpose(2, 0, 1).copy())


def read_original_state(src: Path) -> dict:
    from safetensors.torch import load_file

    state = {}
    for f in sorted(src.iterdir()):
        if f.suffix == ".safetensors":
            state.update(load_file(str(f)))
        elif f.suffix == ".bin":
            state.update(torch.load(f, weights_only=True))
    return state


class OriginalLlava:
    """LlavaLlamaForCausalLM's forward on the original files: CLIP layer -2 without CLS ->
    mlp2x_gelu -> features spliced at the image index -> Llama decoder + final norm."""

    def __init__(self, src: Path, tower_dir: Path):
        from transformers import CLIPVisionModel, LlamaConfig, LlamaModel, LlamaTokenizer

        cfg = json.loads((src / "config.json").read_text())
        state = read_original_state(src)
        self.tokenizer = LlamaTokenizer.from_pretrained(src)
        self.tower = CLIPVisionModel.from_pretrained(tower_dir).eval()
        self.processor_cfg = json.loads((tower_dir / "preprocessor_config.json").read_text())
        self.proj = [state[f"model.mm_projector.{i}.{p}"] for i in (0, 2) for p in ("weight", "bias")]
        self.llama = LlamaModel(LlamaConfig(
            vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"], intermediate_size=cfg["intermediate_size"],
            num_hidden_layers=cfg["num_hidden_layers"], num_attention_heads=cfg["num_attention_heads"],
            num_key_value_heads=cfg["num_key_value_heads"], rms_norm_eps=cfg["rms_norm_eps"],
            max_position_embeddings=cfg["max_position_embeddings"])).eval()
        lm = {k[len("model."):]: v for k, v in state.items()
              if k.startswith("model.") and not k.startswith("model.mm_projector.")}
        self.llama.load_state_dict(lm, strict=True)

    @torch.no_grad()
    def forward(self, image, prompt):
        pixels = ref_pixels(image, self.processor_cfg)[None]
        feats = self.tower(pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
        w0, b0, w2, b2 = self.proj
        feats = F.linear(F.gelu(F.linear(feats, w0, b0)), w2, b2)[0]
        ids = ref_tokenizer_image_token(prompt, self.tokenizer)
        embed = self.llama.embed_tokens.weight
        rows = [feats if i == IMAGE_INDEX else embed[i][None] for i in ids]
        hidden = self.llama(inputs_embeds=torch.cat(rows)[None]).last_hidden_state[0]
        return hidden, ids


# -- fixtures --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tower_dir(tmp_path_factory):
    return build_tiny_clip_tower(tmp_path_factory.mktemp("tower") / "clip-vit-tiny-336")


@pytest.fixture(scope="module")
def original_dir(tmp_path_factory, tower_dir):
    return build_tiny_llava_original(tmp_path_factory.mktemp("orig") / "llava", tower_dir)


@pytest.fixture(scope="module")
def converted_dir(tmp_path_factory, original_dir):
    # mm_vision_tower names the local tower folder, as LLaVA's configs may
    # float32: the tiny model's own precision, so the parity below is exact to 1e-5
    return convert_llava(original_dir, tmp_path_factory.mktemp("conv") / "llava-hf", dtype="float32").dst


def _images():
    out = []
    colours = [(200, 30, 40), (20, 90, 220), (250, 240, 20)]
    for (w, h), colour in zip([(64, 40), (30, 56), (48, 48)], colours, strict=True):
        im = Image.new("RGB", (w, h), (245, 245, 240))
        im.paste(colour, (w // 5, h // 4, 4 * w // 5, 3 * h // 4))
        out.append(im)
    return out


PROMPTS = ["a red square", "Zwei Käfer auf 東京 street,\nnight \"neon\" {style}", "a <image > of a <imag </image>"]


def _encoder(folder, **kw):
    cfg = dict(backend="llava", path=str(folder), dtype="float32", device="cpu", prompt_format="llava_v0",
               batch_size=3)
    return GuidanceEncoder.from_config(OmegaConf.structured(MLLMConfig(**{**cfg, **kw})))


# -- conversion equals the original forward --------------------------------------------------------------
@pytest.mark.parametrize("layout", ["safetensors-sharded", "bin-single"])
def test_converted_guidance_equals_original_forward(layout, tmp_path, tower_dir, original_dir, converted_dir):
    if layout == "safetensors-sharded":
        src, conv = original_dir, converted_dir
    else:  # the same model stored as one torch.save state dict, no index
        src = tmp_path / "llava-bin"
        build_tiny_llava_original(src, tower_dir, weights="bin", shards=1)
        conv = convert_llava(src, tmp_path / "conv", dtype="float32").dst
    reference = OriginalLlava(src, tower_dir)
    enc = _encoder(conv)
    images, tids = _images(), [0, 5, 17]
    ours = enc.encode(images, PROMPTS, tids)  # one right-padded batch of 3
    for image, prompt, tid, got in zip(images, PROMPTS, tids, ours, strict=True):
        text = f"{V0_SYSTEM}###Human: <image>\n{enc.question(prompt, tid)}###Assistant:"
        assert enc.prompt_text(prompt, tid) == text
        want, ids = reference.forward(image, text)
        assert got.shape == want.shape == (len(ids) - 1 + 16, 64)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
        # the ids fed to the model: tokenizer_image_token's, the image index expanded
        batch = enc.prepare([image], [prompt], [tid])
        image_id = enc.model.config.image_token_id
        expanded = [t for i in ids for t in ([image_id] * 16 if i == IMAGE_INDEX else [i])]
        assert batch["input_ids"][0].tolist() == expanded
    # the processor agrees on the image-token count the model needs
    proc = enc.processor(images=[images[0]], text=["<image>"], return_tensors="pt")
    assert int((proc["input_ids"] == enc.model.config.image_token_id).sum()) == 16


def test_converted_folder_contents(converted_dir, original_dir, tower_dir):
    record = json.loads((converted_dir / "conversion.json").read_text())
    from img_lightning.convert.llava_source import sha256_files

    files = sorted(p for p in original_dir.iterdir() if p.suffix == ".safetensors")
    assert record["source"]["weights_sha256"] == sha256_files(files)
    assert record["source"]["config"] == json.loads((original_dir / "config.json").read_text())
    assert record["vision_tower"]["path"] == str(tower_dir) and record["vision_tower"]["weights_from"] == "tower"
    assert {m["source"] for m in record["key_mapping"]} >= {"model.mm_projector.0.", "model.mm_projector.2.",
                                                            "model.embed_tokens.", "model.layers.", "lm_head."}
    tokens = record["tokens"]
    assert (tokens["source_embedding_rows"], tokens["image_token_id"], tokens["embedding_rows"]) == (601, 601, 640)
    assert record["conversation_by_folder_name"] == {"model_name": "llava", "conversation": "llava_v0"}
    # the new rows are the mean of the source rows; the source rows are copied exactly
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(converted_dir)
    source = read_original_state(original_dir)
    embed = model.get_input_embeddings().weight.detach()
    torch.testing.assert_close(embed[:601], source["model.embed_tokens.weight"], rtol=0, atol=0)
    torch.testing.assert_close(embed[601:], source["model.embed_tokens.weight"].mean(0).expand(39, -1))
    head = model.get_output_embeddings().weight.detach()
    torch.testing.assert_close(head[620], source["lm_head.weight"].mean(0))
    assert model.config.vision_feature_layer == -2 and model.config.vision_feature_select_strategy == "default"
    processor = AutoProcessor.from_pretrained(converted_dir)
    assert processor.tokenizer.pad_token == "[PAD]" and processor.tokenizer.convert_tokens_to_ids("<image>") == 601
    assert not [p for p in converted_dir.parent.iterdir() if p.name.startswith(".")]  # no scratch left


def test_default_dtype_and_context_are_the_released_loaders(tmp_path, original_dir, converted_dir):
    """By default every weight is written as float16, as LLaVA's loader casts them (tower included),
    and LLaVA's cut-off (tokenizer_model_max_length, below the position limit) is the encoder's limit."""
    from transformers import LlavaForConditionalGeneration

    from img_lightning.encoders.conversation import PromptTooLong

    result = convert_llava(original_dir, tmp_path / "fp16")
    assert result.record["dtype"] == "float16"
    assert result.record["context"]["tokenizer_model_max_length"] == 256
    half = LlavaForConditionalGeneration.from_pretrained(result.dst)
    full = LlavaForConditionalGeneration.from_pretrained(converted_dir)
    assert {p.dtype for p in half.parameters()} == {torch.float16}
    for (name, a), (_, b) in zip(half.state_dict().items(), full.state_dict().items(), strict=True):
        assert torch.equal(a, b.to(torch.float16)), name
    assert half.config.tokenizer_model_max_length == 256 < half.config.text_config.max_position_embeddings == 512

    enc = _encoder(converted_dir)
    assert enc.max_tokens == 256
    short = "a red square"
    base = enc.sequence_length(enc.prompt_text(short, 0))
    long_prompt = " ".join(["red"] * (256 - base + 5))  # over 256 tokens, under 512
    assert 256 < enc.sequence_length(enc.prompt_text(long_prompt, 0)) < 512
    enc.check_length(enc.prompt_text(short, 0))
    with pytest.raises(PromptTooLong, match="limit of 256"):
        enc.check_length(enc.prompt_text(long_prompt, 0))
    with pytest.raises(PromptTooLong, match="limit of 256"):
        enc.encode(_images()[:1], [long_prompt], [0])


def test_encoder_refuses_an_unconverted_folder(original_dir):
    from img_lightning.config.loading import ConfigError

    with pytest.raises(ConfigError, match="img-convert-llava"):
        _encoder(original_dir)


def test_llava_v0_batched_equals_single(converted_dir):
    enc = _encoder(converted_dir)
    images, tids = _images(), [3, 4, 99]
    batched = enc.encode(images, PROMPTS, tids)
    assert len({b.shape[0] for b in batched}) > 1  # really padded
    for im, p, t, b in zip(images, PROMPTS, tids, batched, strict=True):
        torch.testing.assert_close(b, enc.encode([im], [p], [t])[0], rtol=1e-5, atol=1e-5)


def test_checkpoint_tower_weights_and_rotary_buffers(tmp_path, tower_dir, original_dir):
    """Tower keys in the checkpoint must equal the tower (LLaVA ignores them otherwise); saved
    rotary inv_freq buffers are checked against the config and dropped."""
    from safetensors.torch import load_file

    src = tmp_path / "with-extras"
    shutil.copytree(original_dir, src)
    tower = load_file(str(tower_dir / "model.safetensors"))
    extra = {f"model.vision_tower.vision_tower.{k}": v for k, v in tower.items()}
    head_dim = 16
    inv = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    extra.update({f"model.layers.{i}.self_attn.rotary_emb.inv_freq": inv for i in range(2)})
    state = {**read_original_state(original_dir), **extra}
    for f in src.glob("model*"):
        f.unlink()
    write_state_dict(src, state, shards=3)
    record = convert_llava(src, tmp_path / "ok").record
    assert record["dropped_keys"] == {"rotary inv_freq (recomputed from rope_theta, checked equal)": 2}
    key = next(k for k in extra if k.endswith("post_layernorm.weight"))
    state[key] = state[key] + 1
    for f in src.glob("model*"):
        f.unlink()
    write_state_dict(src, state, shards=3)
    with pytest.raises(ConversionError, match="differ from"):
        convert_llava(src, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


# -- refusals: one clear error each, nothing written ---------------------------------------------------
def _edit_config(src: Path, **changes):
    cfg = json.loads((src / "config.json").read_text())
    for k, v in changes.items():
        if v is KeyError:
            cfg.pop(k)
        else:
            cfg[k] = v
    (src / "config.json").write_text(json.dumps(cfg))


REFUSALS = [
    ({"mm_projector_type": "linear"}, "mm_projector_type"),
    ({"mm_projector_type": KeyError}, "mm_projector_type is missing, which LLaVA reads as 'linear'"),
    ({"mm_vision_select_layer": -1}, "mm_vision_select_layer"),
    ({"mm_vision_select_feature": "cls_patch"}, "mm_vision_select_feature"),
    ({"image_aspect_ratio": "anyres"}, "image_aspect_ratio"),
    ({"mm_use_im_start_end": True}, "mm_use_im_start_end"),
    ({"architectures": ["LlavaMistralForCausalLM"]}, "architectures"),
    ({"some_new_field": 1}, r"unknown fields \['some_new_field'\]"),
    ({"mm_vision_tower": "nobody/no-such-tower"}, "nobody/no-such-tower"),
    ({"mm_hidden_size": 48}, "mm_hidden_size=48"),
]


@pytest.mark.parametrize("changes,message", REFUSALS, ids=[m.split()[0] for _, m in REFUSALS])
def test_refuses_unsupported_configs(changes, message, tmp_path, original_dir, capsys):
    src = tmp_path / "llava"
    shutil.copytree(original_dir, src)
    _edit_config(src, **changes)
    assert main([str(src), str(tmp_path / "out")]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("img-convert-llava: error")]
    assert len(err) == 1 and re.search(message, err[0]), err
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_refuses_bad_weights(tmp_path, original_dir, capsys):
    # an unknown key
    src = tmp_path / "unknown"
    shutil.copytree(original_dir, src)
    state = read_original_state(original_dir)
    state["model.mm_projector.4.weight"] = torch.zeros(2, 2)
    for f in src.glob("model*"):
        f.unlink()
    write_state_dict(src, state, shards=2)
    with pytest.raises(ConversionError, match=r"unknown role, e.g. \['model.mm_projector.4.weight'\]"):
        convert_llava(src, tmp_path / "o1")
    # a missing shard (listed by the index), then without the index
    src = tmp_path / "missing"
    shutil.copytree(original_dir, src)
    (src / "model-00002-of-00002.safetensors").unlink()
    assert main([str(src), str(tmp_path / "o2")]) == 2
    assert "model-00002-of-00002.safetensors" in capsys.readouterr().err
    (src / "model.safetensors.index.json").unlink()
    with pytest.raises(ConversionError, match=r"shards \[2\] of 2 are missing"):
        convert_llava(src, tmp_path / "o3")
    # a non-finite weight, and a .bin that is not a state dict
    src = tmp_path / "nan"
    src.mkdir()
    for f in ("config.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
              "added_tokens.json"):
        shutil.copy(original_dir / f, src / f)
    state = read_original_state(original_dir)
    state["model.norm.weight"][0] = float("nan")
    write_state_dict(src, state, weights="bin", shards=1)
    with pytest.raises(ConversionError, match="model.norm.weight.*NaN"):
        convert_llava(src, tmp_path / "o4")
    torch.save([torch.zeros(1)], src / "pytorch_model.bin")
    with pytest.raises(ConversionError, match="not a flat state dict"):
        convert_llava(src, tmp_path / "o5")
    # an output that exists
    (tmp_path / "o6").mkdir()
    (tmp_path / "o6" / "x").write_text("x")
    with pytest.raises(ConversionError, match="already exists"):
        convert_llava(original_dir, tmp_path / "o6")


def test_cli_converts_with_vision_tower_argument(tmp_path, tower_dir, capsys):
    src = tmp_path / "llava"
    cfg = original_config(10, "openai/clip-vit-large-patch14-336")  # a hub id not in the (offline) cache
    build_tiny_llava_original(src, vision_tower_id=cfg["mm_vision_tower"])
    assert main([str(src), str(tmp_path / "a")]) == 2
    assert "--vision-tower" in capsys.readouterr().err
    assert main([str(src), str(tmp_path / "b"), "--vision-tower", str(tower_dir)]) == 0
    out = capsys.readouterr().out
    assert "llava_v0" in out and str(tmp_path / "b") in out
    record = json.loads((tmp_path / "b" / "conversion.json").read_text())
    assert record["vision_tower"]["id"] == str(tower_dir)


def _read_only_folder(tmp_path):
    """A folder this process cannot write: a read-only tmpfs mount for root (permission bits do not stop
    root), the permission bits otherwise; None when neither is possible here."""
    import os
    import subprocess

    folder = tmp_path / "ro"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        return folder
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(folder)], capture_output=True)
    return folder if done.returncode == 0 else None


@pytest.mark.parametrize("where", ["under_a_file", "read_only"])
def test_an_unwritable_destination_is_refused_before_the_source_is_read(where, tmp_path, original_dir, capsys,
                                                                        monkeypatch):
    """Issue 19.9: a read-only DST was found only after every weight was hashed, as an internal error."""
    import subprocess

    import img_lightning.convert.llava as convert_module

    if where == "under_a_file":
        (tmp_path / "afile").write_text("x")
        dst = tmp_path / "afile" / "out"
    else:
        folder = _read_only_folder(tmp_path)
        if folder is None:
            pytest.skip("no read-only folder can be made here (root without mount permission)")
        dst = folder / "out"

    def read_source(*args, **kwargs):
        raise AssertionError("the source was read before the destination was checked")

    monkeypatch.setattr(convert_module, "sha256_files", read_source)
    try:
        assert main([str(original_dir), str(dst)]) == 2
    finally:
        if where == "read_only":
            subprocess.run(["umount", str(dst.parent)], capture_output=True)
    err = [line for line in capsys.readouterr().err.splitlines() if "img-convert-llava:" in line]
    assert len(err) == 1 and err[0].startswith(f"img-convert-llava: error: cannot write the output {dst}"), err
    assert "choose another DST" in err[0] and "internal error" not in err[0]


def test_an_os_error_on_a_user_path_is_a_user_error_naming_it(tmp_path, original_dir, capsys, monkeypatch):
    """Issue 19.9: an OSError reading SRC (an unreadable shard: permissions, a stale network mount) was an
    "internal error"; every path the converter touches is the user's."""
    import img_lightning.convert.llava as convert_module

    shard = original_dir / "model-00001-of-00002.safetensors"

    def unreadable(root):
        raise PermissionError(13, "Permission denied", str(shard))  # what open() raises for a non-root user

    monkeypatch.setattr(convert_module, "find_weight_files", unreadable)
    assert main([str(original_dir), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"img-convert-llava: error: {shard}: Permission denied; check that SRC" in err and "internal" not in err
