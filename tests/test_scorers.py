"""Every scorer on tiny random models saved in the real formats, plus the metric arithmetic."""


import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from img_lightning.config.eval import ScorerConfig
from img_lightning.evaluation.scorers import build_scorers
from img_lightning.evaluation.scorers import noun_phrases as np_mod
from img_lightning.evaluation.scorers.blip_vqa import pre_question, product_over_phrases, yes_probability
from img_lightning.evaluation.scorers.checkpoints import CheckpointError
from img_lightning.evaluation.scorers.complex import three_in_one
from img_lightning.evaluation.scorers.hps import (
    OPENAI_MEAN,
    OPENAI_STD,
    hps_preprocess,
    hps_version,
    load_hps_state_dict,
)
from img_lightning.evaluation.scorers.noun_phrases import rule_strip_adjectives
from img_lightning.evaluation.scorers.spatial import combine, parse_spatial_prompt, position_score
from img_lightning.models import ModelNotFoundError
from reference_transforms import clip_reference_pixels, hf_pil_pixels

PROMPTS = ["a red car next to a blue dog", "The yellow lamp was on top of the wooden desk.",
           "a purple kite and an orange boat"]


def cfg(**kw):
    return OmegaConf.merge(OmegaConf.structured(ScorerConfig), dict(device="cpu", **kw))


def images():
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)),
            Image.fromarray(rng.integers(0, 255, (64, 40, 3), dtype=np.uint8)),
            Image.new("RGB", (64, 64), (0, 128, 255))]


@pytest.fixture(scope="module")
def subset_dir(tmp_path_factory):
    """T2I-CompBench's complex subtype lists, in their format, for our test prompts."""
    where = tmp_path_factory.mktemp("t2i")
    (where / "complex_val_spatial.txt").write_text(PROMPTS[1] + "\r\n")
    (where / "complex_val_action.txt").write_text(PROMPTS[0] + "\r\n")
    return where


@pytest.fixture(scope="module")
def scorers(tiny_scorer_dirs, subset_dir):
    d = tiny_scorer_dirs
    cfgs = [
        cfg(kind="hps", model="img-lightning-tiny-hps", model_config=str(d["hps_model_config"]),
            checkpoint=str(d["hps_checkpoint"]), version="v2.1"),
        cfg(kind="pickscore", path=str(d["clip"]), processor_path=str(d["clip"])),
        cfg(kind="clip", path=str(d["clip"])),
        cfg(kind="t2i_non_spatial", name="non_spatial", path=str(d["clip"])),
        cfg(kind="blip_vqa", path=str(d["blip_vqa"]), batch_size=2),
        cfg(kind="spatial_proxy", path=str(d["owlvit"]), threshold=0.0),
        cfg(kind="t2i_complex", subset_dir=str(subset_dir)),
    ]
    return build_scorers(cfgs)


def test_every_scorer_scores_each_pair(scorers):
    ims = images()
    for name, s in scorers.items():
        out = s.score(ims, PROMPTS)
        assert out.shape == (3,) and out.dtype == torch.float32 and torch.isfinite(out).all(), name
        assert torch.equal(out, s.score(ims, PROMPTS)), name  # deterministic
        # one score per pair: scoring a pair alone gives the same number
        assert s.score(ims[1:2], PROMPTS[1:2])[0] == pytest.approx(out[1].item(), abs=1e-5), name
    with pytest.raises(ValueError, match="2 images but 1 prompts"):
        scorers["hps"].score(ims[:2], PROMPTS[:1])
    assert scorers["hps"].describe()["version"] == "v2.1"
    assert "PROXY" in scorers["spatial_proxy"].describe()["note"]
    for name, s in scorers.items():  # what the report prints: a fingerprint and exact/proxy for every metric
        d = s.describe()
        assert d["name"] == name and "exact" in d and d.get("reference"), name
        if name not in ("t2i_complex",):
            assert len(d["sha256"]) == 64, name


def _hps_reference(arr: np.ndarray, antialias: bool) -> torch.Tensor:
    """HPSv2's eval transform written out with plain torch: longest side to 224 (bicubic), zero pad
    centred (odd pixel right/bottom), OpenAI mean/std; padded also when no resize is needed."""
    h, w = arr.shape[:2]
    x = torch.from_numpy(arr).permute(2, 0, 1).float()[None] / 255.0
    s = 224 / max(h, w)
    nh, nw = int(np.round(h * s)), int(np.round(w * s))
    if (nh, nw) != (h, w):
        x = torch.nn.functional.interpolate(x, size=(nh, nw), mode="bicubic", antialias=antialias, align_corners=False)
    canvas = torch.zeros(1, 3, 224, 224)
    top, left = (224 - nh) // 2, (224 - nw) // 2
    canvas[:, :, top : top + nh, left : left + nw] = x
    mean, std = torch.tensor(OPENAI_MEAN)[:, None, None], torch.tensor(OPENAI_STD)[:, None, None]
    return (canvas[0] - mean) / std


@pytest.mark.parametrize("size", [(100, 60), (60, 101), (224, 224), (300, 113), (224, 160), (97, 224)])
@pytest.mark.parametrize("antialias", [True, False])
def test_hps_preprocessing_against_independent_computation(size, antialias):
    w, h = size
    rng = np.random.default_rng(1)
    arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    got = hps_preprocess(Image.fromarray(arr), antialias=antialias)
    want = _hps_reference(arr, antialias)
    # (224, 160) and (97, 224): the longest side is already 224, hpsv2 would not pad; we must
    assert got.shape == (3, 224, 224)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    mean, std = torch.tensor(OPENAI_MEAN)[:, None, None], torch.tensor(OPENAI_STD)[:, None, None]
    if h < w:  # the padding is black before normalisation, not cropped content
        torch.testing.assert_close(got[:, 0, :], (-mean / std)[:, :, 0].expand(3, 224))
    if w < h:
        torch.testing.assert_close(got[:, :, 0], (-mean / std)[:, :, 0].expand(3, 224))


def test_hps_antialias_is_pinned_not_left_to_torchvision(monkeypatch):
    """The resize passes ``antialias`` explicitly, so torchvision's default (which changed in 0.17)
    cannot move the score; the two settings give different pixels on a downscale."""
    import torchvision.transforms.functional as TF

    seen = []
    real = TF.resize

    def spy(*args, **kwargs):
        seen.append(kwargs.get("antialias", "unset"))
        return real(*args, **kwargs)

    monkeypatch.setattr(TF, "resize", spy)
    arr = np.random.default_rng(2).integers(0, 256, (300, 400, 3), dtype=np.uint8)
    on = hps_preprocess(Image.fromarray(arr), antialias=True)
    off = hps_preprocess(Image.fromarray(arr), antialias=False)
    assert seen == [True, False]
    assert (on - off).abs().max() > 1e-2


def test_hps_batches_images_of_every_shape(scorers):
    """A 224 x 160 image used to skip the pad and break the batch (as it breaks hpsv2)."""
    rng = np.random.default_rng(3)
    ims = [Image.fromarray(rng.integers(0, 255, (160, 224, 3), dtype=np.uint8)),
           Image.fromarray(rng.integers(0, 255, (224, 97, 3), dtype=np.uint8)),
           Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))]
    out = scorers["hps"].score(ims, PROMPTS)
    assert out.shape == (3,) and torch.isfinite(out).all()


def test_hps_score_is_100x_cosine_of_open_clip_features(scorers, tiny_scorer_dirs):
    import open_clip

    hps = scorers["hps"]
    model = open_clip.create_model("img-lightning-tiny-hps", pretrained=None)
    model.load_state_dict(torch.load(tiny_scorer_dirs["hps_checkpoint"], weights_only=True)["state_dict"])
    model.eval()
    ims = images()
    with torch.no_grad():
        img = model.encode_image(torch.stack([hps_preprocess(i) for i in ims]))
        txt = model.encode_text(open_clip.get_tokenizer("img-lightning-tiny-hps")(PROMPTS))
    want = 100 * torch.nn.functional.cosine_similarity(img, txt)
    torch.testing.assert_close(hps.score(ims, PROMPTS), want, atol=1e-4, rtol=1e-4)


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_hps_checkpoint_is_loaded_without_unpickling_code(tmp_path, tiny_scorer_dirs):
    state = torch.load(tiny_scorer_dirs["hps_checkpoint"], weights_only=True)
    assert set(state) == {"state_dict"}
    bad = tmp_path / "evil.pt"
    torch.save({"state_dict": state["state_dict"], "x": _Evil()}, bad)
    with pytest.raises(Exception, match="Weights only load failed"):  # torch refuses to unpickle code
        load_hps_state_dict(bad)
    with pytest.raises(ModelNotFoundError, match="xswu/HPSv2"):
        load_hps_state_dict(tmp_path / "missing.pt")


def test_hps_version_comes_from_the_checkpoint_name(tmp_path, tiny_scorer_dirs):
    assert hps_version("/ckpt/HPS_v2_compressed.pt", None) == "v2.0"
    assert hps_version("/ckpt/HPS_v2.1_compressed.pt", None) == "v2.1"
    assert hps_version("/ckpt/HPS_v2.1_compressed.pt", "v2.1") == "v2.1"
    assert hps_version("/ckpt/my_hps.pt", "v2.0") == "v2.0"
    with pytest.raises(CheckpointError, match="HPS_v2_compressed.pt is HPS v2.0, but version=v2.1"):
        hps_version("/ckpt/HPS_v2_compressed.pt", "v2.1")
    with pytest.raises(CheckpointError, match="set version=v2.0 or version=v2.1"):
        hps_version("/ckpt/my_hps.pt", None)
    # end to end: a v2.0 file configured as v2.1 is refused; the released name alone sets the version
    d = tiny_scorer_dirs
    v20 = tmp_path / "HPS_v2_compressed.pt"
    v20.symlink_to(d["hps_checkpoint"])
    base = dict(kind="hps", model="img-lightning-tiny-hps", model_config=str(d["hps_model_config"]),
                checkpoint=str(v20))
    with pytest.raises(CheckpointError, match="not comparable"):
        build_scorers([cfg(**base, version="v2.1")])
    described = build_scorers([cfg(**base)])["hps"].describe()
    assert described["version"] == "v2.0"
    import hashlib

    assert described["sha256"] == hashlib.sha256(d["hps_checkpoint"].read_bytes()).hexdigest()
    assert "hpsv2.score() returns the raw cosine" in described["scale"]


def test_hps_runs_in_the_configured_dtype(monkeypatch, tiny_scorer_dirs):
    """configs say float16: the model and its input must be cast (on CPU compute_dtype keeps float32,
    so the test makes it answer bfloat16 to see the cast happen)."""
    from img_lightning.evaluation.scorers import hps as hps_mod

    d = tiny_scorer_dirs
    kw = dict(kind="hps", model="img-lightning-tiny-hps", model_config=str(d["hps_model_config"]),
              checkpoint=str(d["hps_checkpoint"]), version="v2.1")
    ref = build_scorers([cfg(**kw)])["hps"]
    monkeypatch.setattr(hps_mod, "compute_dtype", lambda name, device: torch.bfloat16)
    low = build_scorers([cfg(**kw, dtype="bfloat16")])["hps"]
    assert {p.dtype for p in low.model.parameters()} == {torch.bfloat16}
    assert low.describe()["dtype"] == "bfloat16"
    ims = images()
    got, want = low.score(ims, PROMPTS), ref.score(ims, PROMPTS)
    assert got.dtype == torch.float32 and not torch.equal(got, want)
    torch.testing.assert_close(got, want, atol=3.0, rtol=0)  # 100 x cosine, bf16 rounding


def test_clip_processor_backend_is_pinned_to_pil(scorers):
    """transformers 5 picks its torchvision processors by default, whose resampling moves the
    pixels by ~1e-2: PickScore's processor must stay on the PIL backend its reference code ran."""
    from transformers.image_processing_backends import PilBackend

    pick = scorers["pickscore"]
    assert isinstance(pick.processor.image_processor, PilBackend)
    assert isinstance(scorers["blip_vqa"].processor.image_processor, PilBackend)
    assert isinstance(scorers["spatial_proxy"].processor.image_processor, PilBackend)
    ims = images()
    want = torch.stack([hf_pil_pixels(im, pick.image_size) for im in ims])
    torch.testing.assert_close(pick.pixel_values(ims), want, atol=1e-5, rtol=0)
    assert "Pil" in pick.describe()["preprocess"]


def test_clip_scores_use_openai_clip_preprocessing(scorers):
    ims = images()
    for name in ("clip", "non_spatial"):
        s = scorers[name]
        want = torch.stack([clip_reference_pixels(im, s.image_size) for im in ims])
        torch.testing.assert_close(s.pixel_values(ims), want, atol=1e-5, rtol=0)


def test_pickscore_is_logit_scale_times_cosine(scorers, tiny_scorer_dirs):
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(tiny_scorer_dirs["clip"]).eval()
    proc = CLIPProcessor.from_pretrained(tiny_scorer_dirs["clip"])
    ims = images()

    def cosine(pixels):
        with torch.no_grad():
            txt = proc(text=PROMPTS, padding=True, return_tensors="pt")
            out = model(pixel_values=pixels, **txt)
        return out.logits_per_image.diagonal() / model.logit_scale.exp(), model.logit_scale.exp()

    cos, scale = cosine(torch.stack([hf_pil_pixels(im, 32) for im in ims]))
    torch.testing.assert_close(scorers["pickscore"].score(ims, PROMPTS), scale * cos, atol=1e-4, rtol=1e-4)
    cos, _ = cosine(torch.stack([clip_reference_pixels(im, 32) for im in ims]))
    torch.testing.assert_close(scorers["non_spatial"].score(ims, PROMPTS), cos, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(scorers["clip"].score(ims, PROMPTS), 100 * cos.clamp_min(0), atol=1e-3, rtol=1e-4)


def test_blip_vqa_probability_arithmetic(scorers):
    logits = torch.randn(5, 50) * 3
    p = torch.softmax(logits, dim=-1)
    torch.testing.assert_close(yes_probability(logits, 7, 9), p[:, 7] / (p[:, 7] + p[:, 9]))
    assert product_over_phrases([0.5, 0.4, 0.9], [0, 0, 2], 3).tolist() == pytest.approx([0.2, 1.0, 0.9])
    blip = scorers["blip_vqa"]
    ims = images()
    assert blip.questions("a purple kite and an orange boat") == ["a purple kite?", "an orange boat?"]
    got = blip.score(ims, PROMPTS)
    for i, prompt in enumerate(PROMPTS):
        qs = blip.questions(prompt)
        probs = blip.answer_yes([ims[i]] * len(qs), qs)
        assert ((probs > 0) & (probs < 1)).all()
        assert got[i].item() == pytest.approx(torch.prod(probs).item(), rel=1e-5)
    assert blip.score(ims[:1], ["!!!"]).item() == 1.0  # no noun phrase: no question, factor 1
    # BLIP-VQA's question handling: pre_question cleaning, [ENC] instead of [CLS] as the first token
    assert pre_question("The (big) Red car: on a road.?") == "the big red car on a road?"
    enc = blip.encode(ims[:2], ["a Red car.?", "a dog?"])
    tok = blip.processor.tokenizer
    assert enc["input_ids"][:, 0].tolist() == [tok.convert_tokens_to_ids("[ENC]")] * 2
    plain = tok(["a red car?", "a dog?"], padding="longest")["input_ids"]
    assert enc["input_ids"][:, 1:].tolist() == [ids[1:] for ids in plain]


def test_spatial_rules():
    assert parse_spatial_prompt("a violin next to a kettle") == ("violin", "next to", "kettle")
    assert parse_spatial_prompt("a cat on the top of a piano") == ("cat", "on the top of", "piano")
    assert parse_spatial_prompt("a purple kite and an orange boat") is None
    left, right = (0, 0, 100, 100), (300, 0, 400, 100)
    assert position_score("on the left of", left, right) == 1.0
    assert position_score("on the right of", left, right) == 0.0
    assert position_score("on the right of", right, left) == 1.0
    top, bottom = (0, 0, 100, 100), (0, 300, 100, 400)  # image y grows downwards
    assert position_score("on the top of", top, bottom) == 1.0
    assert position_score("on the bottom of", bottom, top) == 1.0
    assert position_score("on the top of", bottom, top) == 0.0
    overlap = (200, 0, 310, 100)  # right of `left` but overlapping a lot: soft score iou_thr / iou
    a, b = (0, 0, 300, 100), overlap
    iou = (100 * 100) / (300 * 100 + 110 * 100 - 100 * 100)
    assert position_score("on the left of", a, b) == pytest.approx(0.1 / iou)
    far = position_score("next to", (0, 0, 10, 10), (500, 500, 510, 510), distance_threshold=150)
    assert far == pytest.approx(150 / 500)
    assert combine("on the left of", (0.8, left), (0.6, right), 150) == pytest.approx(0.25 * 0.8 + 0.25 * 0.6 + 0.5)
    assert combine("on the left of", (0.9, left), None, 150) == 0.0  # 0.225 < 0.5 -> 0
    assert combine("on the right of", (0.9, left), (0.9, right), 150) == 0.0  # 0.45 < 0.5 -> 0


def test_complex_3in1(scorers):
    att, spa, act = torch.tensor(0.9), torch.tensor(0.3), torch.tensor(0.6)
    assert three_in_one("spatial", att, spa, act).item() == pytest.approx(0.6)
    assert three_in_one("action", att, spa, act).item() == pytest.approx(0.75)
    assert three_in_one("spatial_action", att, spa, act).item() == pytest.approx(0.6)
    cx = scorers["t2i_complex"]
    assert cx.subtype("The yellow lamp was on top of the wooden desk.") == "spatial"
    assert cx.subtype("something not in the lists") == "spatial_action"
    ims = images()
    got = cx.score(ims, PROMPTS)
    a, s = (scorers[n].score(ims, PROMPTS) for n in ("blip_vqa", "spatial_proxy"))
    # the action component scores the prompt without adjectives (CLIP_similarity.py --complex)
    c = scorers["non_spatial"].score(ims, [rule_strip_adjectives(p) for p in PROMPTS])
    assert rule_strip_adjectives(PROMPTS[1]) == "The lamp was on top of the desk ."
    assert cx.describe()["exact"] is False and "UniDet" in cx.describe()["note"]
    for i, p in enumerate(PROMPTS):
        assert got[i].item() == pytest.approx(three_in_one(cx.subtype(p), a[i], s[i], c[i]).item(), abs=1e-6)


def test_missing_model_gives_one_clear_error(tmp_path, subset_dir):
    with pytest.raises(ModelNotFoundError) as err:
        build_scorers([cfg(kind="pickscore", model="nobody/no-such-pickscore")])
    msg = str(err.value)
    assert "nobody/no-such-pickscore" in msg and "HF_HOME" in msg and "path" in msg
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        build_scorers([cfg(kind="blip_vqa", path=str(tmp_path / "nowhere"))])
    with pytest.raises(ValueError, match="not in the scorer list"):
        build_scorers([cfg(kind="t2i_complex", subset_dir=str(subset_dir))])


class _Tok:
    def __init__(self, text, pos):
        self.text, self.pos_ = text, pos


class _FakeSpacy:
    """Stands in for en_core_web_sm: tags colour words ADJ, chunks "det? adj* noun" runs."""

    def __call__(self, text):
        toks = [_Tok(w, "ADJ" if w.lower() in {"red", "blue", "yellow", "wooden"} else "X")
                for w in text.replace(".", " .").split()]

        class Doc(list):
            noun_chunks = [_Tok(c, "NP") for c in ("a red car", "a blue dog")]

        return Doc(toks)


def test_t2i_compbench_uses_spacy_when_installed_and_labels_the_rules_a_proxy(monkeypatch, tiny_scorer_dirs,
                                                                              subset_dir):
    d = tiny_scorer_dirs
    rules = build_scorers([cfg(kind="blip_vqa", path=str(d["blip_vqa"]), noun_phrases="auto")])["blip_vqa"]
    # spaCy is not installed here: auto falls back to the rules, and says it is a proxy
    assert rules.noun_phrases == "rules" and rules.describe()["exact"] is False
    assert "PROXY" in rules.describe()["note"]
    monkeypatch.setattr(np_mod, "_spacy", lambda model: _FakeSpacy())
    exact = build_scorers([cfg(kind="blip_vqa", path=str(d["blip_vqa"]))])["blip_vqa"]  # default: auto
    # still a proxy: transformers' blip-vqa-base at 384 px, not T2I-CompBench's capfilt-large at 480 px
    assert exact.noun_phrases == "spacy:en_core_web_sm" and exact.describe()["exact"] is False
    assert "480 px" in exact.describe()["note"] and "spaCy" in exact.describe()["note"]
    assert exact.questions(PROMPTS[0]) == ["a red car?", "a blue dog?"]
    strip = np_mod.adjective_stripper("auto")
    assert strip("The yellow lamp was on top of the wooden desk.") == "The lamp was on top of the desk ."


def test_blip_vqa_asks_about_the_first_eight_noun_phrases_only():
    from img_lightning.evaluation.scorers.blip_vqa import phrase_questions

    prompt = ", ".join(f"a {w}" for w in ("cat", "dog", "cow", "hen", "pig", "fox", "owl", "bee", "ant", "elk"))
    phrases = np_mod.rule_noun_phrases(prompt)
    assert len(phrases) == 10  # T2I-CompBench's --np_num 8: the 9th and 10th are never asked
    assert phrase_questions(phrases) == [f"{p}?" for p in phrases[:8]]


def test_on_top_of_scores_no_position_like_t2i_compbench():
    from img_lightning.evaluation.scorers.spatial import parse_spatial_prompt, position_score

    # determine_position has a branch for "on the top of" but none for "on top of": position 0
    assert parse_spatial_prompt("a lamp on top of a desk") == ("lamp", "on top of", "desk")
    above = ((0, 0, 10, 10), (0, 300, 10, 310))  # obj1 well above obj2
    assert position_score("on the top of", *above) == 1.0 and position_score("on top of", *above) == 0.0
