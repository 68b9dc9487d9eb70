"""The MLLM grader: strict parsing of the rubric's JSON answers, unparseable answers counted (never
a default score), answers saved by the score stage, and one real run on the tiny LLaVA and Qwen."""

import json
import math

import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from img_lightning.config.eval import ScorerConfig
from img_lightning.config.loading import ConfigError
from img_lightning.errors import NonFiniteError
from img_lightning.eval_run import ImageStore, PromptRecord
from img_lightning.evaluation.scorers import build_scorers
from img_lightning.evaluation.scorers.mllm_grader import MLLMGrader
from img_lightning.evaluation.scorers.rubric import DEFAULT_RUBRIC, load_rubric, parse_answer
from img_lightning.evaluation.scoring import read_answers, read_scores, score_run

RUBRIC = load_rubric()
KEYS = ("accuracy_to_prompt", "creativity", "visual_quality", "consistency", "emotional_resonance")


def answer(overall, **over):
    obj = {k: {"score": 6, "reason": "fine"} for k in KEYS}
    obj.update(over)
    obj["overall"] = overall
    return json.dumps(obj)


def test_rubric_file_is_the_diffusion_sharpening_rubric():
    assert RUBRIC.aspects == KEYS and RUBRIC.scale == 10 and RUBRIC.overall == "overall"
    q = RUBRIC.question('a "red" car {with braces}')
    assert 'Prompt: "a "red" car {with braces}"' in q and '{"accuracy_to_prompt": {"score": 0' in q
    assert len(RUBRIC.sha256) == 64 and RUBRIC.path.endswith(DEFAULT_RUBRIC.split("configs/")[1])


@pytest.mark.parametrize("text, overall", [
    (answer(7), 7.0),
    ("Sure! Here is my evaluation:\n```json\n" + answer(6.5) + "\n```\nHope this helps.", 6.5),
    (answer(8, creativity=3), 8.0),  # plain numbers are fine for aspects too
    ("My grades: " + answer(0) + " That's all.", 0.0),
])
def test_parse_accepts_the_rubric_json(text, overall):
    g = parse_answer(text, RUBRIC)
    assert g.ok and g.overall == overall and set(g.aspects) == set(KEYS)


@pytest.mark.parametrize("text, why", [
    ("Overall score: 7/10", "no JSON object"),  # no guessing from the last number in the text
    ("{'overall': 7}", "invalid JSON"),
    ('{"overall": 7}', "missing keys"),
    (answer(11), "outside [0, 10]"),
    (answer(-1), "outside [0, 10]"),
    (answer("7"), "not a number"),
    (answer(True), "not a number"),
    (answer(7, creativity={"reason": "no score"}), "has no 'score'"),
    (answer(float("nan")), "outside [0, 10]"),
    ("[1, 2, 3]", "no JSON object"),
])
def test_parse_refuses_anything_else(text, why):
    g = parse_answer(text, RUBRIC)
    assert not g.ok and g.overall is None and why in g.error


def test_rubric_files_are_checked(tmp_path):
    bad = tmp_path / "r.yaml"
    bad.write_text("name: x\naspects: [{key: a, title: A}]\ntemplate: 'no placeholder'\n")
    with pytest.raises(ConfigError, match="no {prompt}"):
        load_rubric(bad)
    bad.write_text("name: x\naspects: [{key: a, title: A}]\ntemplate: 'Rate {prompt} as {\"a\": 1}'\n")
    with pytest.raises(ConfigError, match="double other braces"):
        load_rubric(bad)
    bad.write_text("name: x\naspect: []\ntemplate: '{prompt}'\n")
    with pytest.raises(ConfigError, match="aspect"):
        load_rubric(bad)


SCRIPT = [answer(7), "The image is good, 8 out of 10.", answer(5.5), answer(12)]


def scripted(replies):
    """A stand-in for the model's generate: replays answers, records the questions it got."""
    asked = []

    def generate(image, question):
        asked.append(question)
        return replies[len(asked) - 1]

    return generate, asked


def test_unparseable_answers_get_no_score_and_are_kept():
    generate, asked = scripted(SCRIPT)
    grader = MLLMGrader(RUBRIC, generate, name="mllm")
    ims = [Image.new("RGB", (16, 16), (i * 60, 0, 0)) for i in range(4)]
    out = grader.score(ims, [f"prompt {i}" for i in range(4)])
    assert out[0].item() == pytest.approx(0.7) and out[2].item() == pytest.approx(0.55)
    assert math.isnan(out[1].item()) and math.isnan(out[3].item())  # never a default like 7.0
    assert all(f'Prompt: "prompt {i}"' in q for i, q in enumerate(asked))
    recs = grader.pop_records()
    assert [r["parsed"] for r in recs] == [True, False, True, False]
    assert recs[1]["answer"] == SCRIPT[1] and "no JSON object" in recs[1]["error"]
    assert recs[2]["aspects"]["creativity"] == 6.0 and grader.pop_records() == []
    d = grader.describe()
    assert d["exact"] is False and d["rubric_sha256"] == RUBRIC.sha256 and "GPT-4o" in d["note"]


def test_score_stage_saves_answers_and_counts_unscored(tmp_path):
    from img_lightning.evaluation.report import ReportInputs, summarize

    prompts = [PromptRecord(f"{i:05d}", f"prompt {i}") for i in range(4)]
    store = ImageStore(tmp_path, "base")
    for p in prompts:
        store.save(p.uid, Image.new("RGB", (16, 16)), {"prompt": p.text})
    cfg = OmegaConf.create({"scorers": [{"kind": "mllm_grader", "name": "mllm", "categories": []}],
                            "generation": {"image_format": "png"}})
    generate, _ = scripted(SCRIPT)
    counts = score_run(cfg, prompts, tmp_path, ["base"], "0of1", {"mllm": MLLMGrader(RUBRIC, generate, name="mllm")},
                       progress=False)
    assert counts == {"base": {"mllm": 4}}
    scores = read_scores(tmp_path, "base", "mllm")
    assert scores["00000"] == pytest.approx(0.7) and math.isnan(scores["00001"])
    answers = {r["uid"]: r for r in read_answers(tmp_path, "base", "mllm")}
    assert set(answers) == {p.uid for p in prompts} and answers["00003"]["error"].startswith("'overall' = 12")
    s = summarize(ReportInputs(prompts, {"base": {"mllm": scores}}, {}, {"mllm": {"name": "mllm", "kind": "mllm_grader",
                                                                                  "exact": False}}, run_dir=tmp_path),
                  num_resamples=20)
    assert s["unscored"]["mllm"]["base"]["count"] == 2 and s["means"]["mllm"]["base"]["n"] == 2
    assert [e["uid"] for e in s["unscored"]["mllm"]["base"]["examples"]] == ["00001", "00003"]


def test_nan_from_a_scorer_that_cannot_abstain_stops_the_stage(tmp_path):
    class Broken(MLLMGrader):
        abstains = False

    prompts = [PromptRecord("00000", "p")]
    ImageStore(tmp_path, "base").save("00000", Image.new("RGB", (8, 8)), {})
    cfg = OmegaConf.create({"scorers": [{"kind": "x", "name": "m", "categories": []}],
                            "generation": {"image_format": "png"}})
    with pytest.raises(NonFiniteError, match="non-finite score nan for base/00000"):
        score_run(cfg, prompts, tmp_path, ["base"], "0of1", {"m": Broken(RUBRIC, lambda i, q: "no", name="m")},
                  progress=False)


@pytest.mark.parametrize("backend", ["llava", "qwen2_5_vl"])
def test_real_tiny_mllm_runs_the_real_path(backend, tiny_llava_dir, tiny_qwen_dir):
    """The tiny models answer gibberish: this checks loading (as encoders.mllm loads them), the chat
    format, greedy generation and that their answers end up unparsed, not scored."""
    path = tiny_llava_dir if backend == "llava" else tiny_qwen_dir
    cfg = OmegaConf.merge(OmegaConf.structured(ScorerConfig), {
        "kind": "mllm_grader", "max_new_tokens": 8,
        "mllm": {"backend": backend, "model": f"tiny-{backend}", "path": str(path), "dtype": "float32",
                 "device": "cpu"}})
    grader = build_scorers([cfg])["mllm_grader"]
    ims = [Image.new("RGB", (40, 30), (200, 30, 30)), Image.new("RGB", (30, 40), (30, 30, 200))]
    out = grader.score(ims, ["a red car", "a blue dog"])
    recs = grader.pop_records()
    assert len(recs) == 2 and all(isinstance(r["answer"], str) for r in recs)
    for v, r in zip(out.tolist(), recs, strict=True):
        assert math.isnan(v) == (not r["parsed"])
    again = grader.score(ims[:1], ["a red car"])  # greedy: the same answer every time
    assert grader.pop_records()[0]["answer"] == recs[0]["answer"]
    assert torch.equal(torch.isnan(again), torch.isnan(out[:1]))
    d = grader.describe()
    assert d["prompt_format"] == ("llava_v1" if backend == "llava" else "chat_template") and len(d["sha256"]) == 64


def test_grader_needs_its_mllm_block():
    with pytest.raises(ConfigError, match="set its `mllm:` block"):
        build_scorers([OmegaConf.merge(OmegaConf.structured(ScorerConfig), {"kind": "mllm_grader"})])
