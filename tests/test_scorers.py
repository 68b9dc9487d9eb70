"""Every scorer on tiny random models saved in the real formats, plus the metric arithmetic."""


import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from img_lightning.config.eval import ScorerConfig
from img_lightning.models import ModelNotFoundError
from img_lightning.evaluation.scorers import build_scorers
from img_lightning.evaluation.scorers.blip_vqa import product_over_phrases, yes_probability
from img_lightning.evaluation.scorers.complex import three_in_one
from img_lightning.evaluation.scorers.hps import OPENAI_MEAN, OPENAI_STD, hps_preprocess, load_hps_state_dict
from img_lightning.evaluation.scorers.spatial import combine, parse_spatial_prompt, position_score

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


@pytest.mark.parametrize("size", [(100, 60), (60, 101), (224, 224), (300, 113)])
def test_hps_preprocessing_against_independent_computation(size):
    w, h = size
    rng = np.random.default_rng(1)
    arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    got = hps_preprocess(Image.fromarray(arr))
    x = torch.from_numpy(arr).permute(2, 0, 1).float()[None] / 255.0
    s = 224 / max(h, w)
    nh, nw = int(np.round(h * s)), int(np.round(w * s))
    if (nh, nw) != (h, w):
        x = torch.nn.functional.interpolate(x, size=(nh, nw), mode="bicubic", antialias=True, align_corners=False)
    canvas = torch.zeros(1, 3, 224, 224)
    top, left = (224 - nh) // 2, (224 - nw) // 2
    canvas[:, :, top : top + nh, left : left + nw] = x
    mean, std = torch.tensor(OPENAI_MEAN)[:, None, None], torch.tensor(OPENAI_STD)[:, None, None]
    want = (canvas[0] - mean) / std
    assert got.shape == (3, 224, 224)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    if nh < 224:  # the padding is black before normalisation, not cropped content
        torch.testing.assert_close(got[:, 0, :], (-mean / std)[:, :, 0].expand(3, 224))


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


def test_pickscore_is_logit_scale_times_cosine(scorers, tiny_scorer_dirs):
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(tiny_scorer_dirs["clip"]).eval()
    proc = CLIPProcessor.from_pretrained(tiny_scorer_dirs["clip"])
    ims = images()
    with torch.no_grad():
        out = model(**proc(text=PROMPTS, images=ims, padding=True, return_tensors="pt"))
    want = out.logits_per_image.diagonal()
    torch.testing.assert_close(scorers["pickscore"].score(ims, PROMPTS), want, atol=1e-4, rtol=1e-4)
    cos = want / model.logit_scale.exp()
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
    assert position_score("next to", (0, 0, 10, 10), (500, 500, 510, 510), distance_threshold=150) == pytest.approx(150 / 500)
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
    a, s, c = (scorers[n].score(ims, PROMPTS) for n in ("blip_vqa", "spatial_proxy", "non_spatial"))
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
