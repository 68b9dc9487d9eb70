"""``img-finetune-mllm eval``: text metrics, the LLM judge's request/parse logic (injected transport and
a local stand-in server), the SEED-Data-Edit reader, and an evaluation run on the tiny LLaVA."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
from omegaconf import OmegaConf
from PIL import Image

from finetune_utils import tiny_finetune_config, tiny_finetune_overrides
from img_lightning.config.finetune_mllm import JudgeConfig
from img_lightning.finetune.judge import Judge, JudgeError, parse_verdict
from img_lightning.finetune.metrics import aggregate, exact_match, normalize, rouge_l, token_f1
from img_lightning.finetune.seed_edit import SeedEditFormatError, read_seed_edit_sample


def test_metrics_by_hand():
    assert exact_match("Make the square red.", "make the square red") == 1.0  # case, punctuation
    assert exact_match("make square red", "make the square red") == 1.0  # articles
    assert exact_match("make it blue", "make the square red") == 0.0
    # token F1: pred {make, it, red} vs ref {make, square, red} (articles dropped): 2 common
    assert token_f1("make it red", "make the square red") == pytest.approx(2 / 3)
    assert rouge_l("a b c d", "a c x d") == pytest.approx(3 / 4)  # LCS 3 of 4 and 4
    # ROUGE-L keeps articles: pred [make the circle red] vs ref [make the square red]: LCS 3, P = R = 3/4
    assert rouge_l("make the circle red", "make the square red") == pytest.approx(0.75)
    # P = 2/2, R = 2/4 -> F = 2/3
    assert rouge_l("make red", "make the square red") == pytest.approx(2 / 3)
    assert token_f1("", "") == 1.0 and rouge_l("", "x") == token_f1("x", "") == 0.0
    agg = aggregate([{"rouge_l": 1.0, "token_f1": 0.5, "exact_match": 0.0},
                     {"rouge_l": 0.0, "token_f1": 0.5, "exact_match": 1.0}])
    assert agg == {"rouge_l": 0.5, "token_f1": 0.5, "exact_match": 0.5, "n": 2}


def _squad_v2(prediction, reference):
    """SQuAD 2.0's official exact match and F1, written out from the script's documented steps."""
    import re
    import string
    from collections import Counter

    def norm(s):
        s = "".join(ch for ch in s.lower() if ch not in set(string.punctuation))
        return " ".join(re.sub(r"\b(a|an|the)\b", " ", s).split())

    pred, ref = norm(prediction).split(), norm(reference).split()
    em = float(norm(prediction) == norm(reference))
    if not pred or not ref:
        return em, float(pred == ref)
    same = sum((Counter(pred) & Counter(ref)).values())
    if same == 0:
        return em, 0.0
    p, r = same / len(pred), same / len(ref)
    return em, 2 * p * r / (p + r)


def test_exact_match_and_token_f1_are_squads():
    # punctuation is deleted, not replaced by a space
    assert exact_match("don't add a hat", "dont add a hat") == 1.0
    assert token_f1("don't add a hat", "dont add a hat") == 1.0
    assert exact_match("black-and-white", "black and white") == 0.0
    assert token_f1("black-and-white", "black and white") == 0.0  # one token 'blackandwhite' vs three
    p, r = 2 / 3, 2 / 5  # {make, it, blackandwhite} vs {make, it, black, and, white}
    assert token_f1("make it black-and-white", "make it black and white") == pytest.approx(2 * p * r / (p + r))
    # empty texts (also empty after normalisation) as SQuAD 2.0 scores them
    assert exact_match("", "") == token_f1("", "") == 1.0
    assert exact_match("...", "the") == token_f1("...", "the") == 1.0
    assert exact_match("", "a hat") == token_f1("", "a hat") == token_f1("a hat", "") == 0.0
    cases = [("Make the square RED!", "make square red"), ("an apple, a pear", "apple pear"),
             ("theatre", "the atre"), ("add a 'hat'", "add hat"), ("it's (very) red", "its very red"),
             ("add 2.5 cm", "add 25 cm"), ("red  \t blue", "red blue"), ("A", ""), ("make it red", "turn it red")]
    for pred, ref in cases:
        em, f1 = _squad_v2(pred, ref)
        assert exact_match(pred, ref) == em and token_f1(pred, ref) == pytest.approx(f1), (pred, ref)


# Tricky cases for tokenisation and empties: case, punctuation inside and between words, digits,
# non-ASCII letters (not tokens for rouge-score), tabs and newlines, underscores, repeats.
TRICKY = [("", ""), ("", "x"), ("x", ""), ("...", "!!"), ("Make the square RED.", "make the square red"),
          ("café au lait", "cafe au lait"), ("don't add a hat", "dont add a hat"),
          ("black-and-white", "black and white"), ("a a a b", "a b a b a"), ("Ünïcödé ñ 東京 tokyo", "tokyo"),
          ("3D model v2.0", "3d model v2 0"), ("make it red red red", "red make it"), ("x_y z", "x y z"),
          ("a\tb\nc", "a b c"), ("The the THE", "the"), ("add 2.5 cm", "add 25 cm")]


def test_rouge_l_is_rouge_scores_including_empty_texts():
    """rouge-score gives 0 when either text has no token, also when neither has: the hand-written
    version this replaced gave 1 there."""
    assert rouge_l("", "") == rouge_l("...", "!!") == rouge_l("東京", "") == 0.0
    assert rouge_l("Make the square RED.", "make the square red") == 1.0
    assert rouge_l("café au lait", "cafe au lait") == pytest.approx(2 / 3)  # 'caf' 'au' 'lait' vs 'cafe' 'au' 'lait'
    assert rouge_l("don't add a hat", "dont add a hat") == pytest.approx(2 / 3)  # 'don' 't' ... vs 'dont' ...


def test_rouge_l_agrees_with_torchmetrics_on_tricky_and_random_texts():
    """torchmetrics' independent ROUGE-L (documented to reproduce rouge-score) as a second opinion."""
    import random

    from torchmetrics.functional.text.rouge import rouge_score

    rng = random.Random(0)
    pieces = list("abcAB12 .,-'é\t\nxyz_") + ["the ", "red ", "東", "ß"]
    texts = [("".join(rng.choice(pieces) for _ in range(rng.randint(0, 20))),
              "".join(rng.choice(pieces) for _ in range(rng.randint(0, 20)))) for _ in range(300)]
    for pred, ref in TRICKY + texts:
        expected = float(rouge_score(pred, ref, rouge_keys="rougeL")["rougeL_fmeasure"])  # float32
        assert rouge_l(pred, ref) == pytest.approx(expected, abs=1e-7), (pred, ref)


def test_exact_match_and_token_f1_agree_with_torchmetrics_squad_where_the_scripts_agree():
    """torchmetrics' SQuAD is the v1.1 script: the same normalisation, EM and F1 as v2.0 except that
    v2.0 scores two texts empty after normalisation F1 1 (no-answer questions), v1.1 0."""
    from torchmetrics.functional.text.squad import squad

    for pred, ref in TRICKY:
        got = squad({"prediction_text": pred, "id": "0"},
                    {"answers": {"answer_start": [0], "text": [ref]}, "id": "0"})
        assert exact_match(pred, ref) == pytest.approx(float(got["exact_match"]) / 100), (pred, ref)
        both_empty = not normalize(pred) and not normalize(ref)
        assert token_f1(pred, ref) == (1.0 if both_empty else pytest.approx(float(got["f1"]) / 100, abs=1e-6)), \
            (pred, ref)


def _judge_cfg(**kw):
    return OmegaConf.structured(JudgeConfig(enabled=True, **kw))


def test_judge_request_and_parse_with_an_injected_transport(monkeypatch):
    calls = []

    def transport(url, payload, headers, timeout):
        calls.append((url, payload, headers, timeout))
        return {"choices": [{"message": {"content": "Yes." if "red" in payload["messages"][0]["content"] else "no"}}]}

    monkeypatch.setenv("MY_JUDGE_KEY", "sk-test")
    judge = Judge(_judge_cfg(endpoint="http://judge.invalid/v1/", model="m1", api_key_env="MY_JUDGE_KEY"), transport)
    verdict = judge.ask("make the square red", "paint the square red")
    assert verdict.consistent is True and verdict.reply == "Yes."
    url, payload, headers, timeout = calls[0]
    assert url == "http://judge.invalid/v1/chat/completions" and headers == {"Authorization": "Bearer sk-test"}
    content = payload["messages"][0]["content"]
    assert "make the square red" in content and "paint the square red" in content and "yes or no" in content
    assert payload["model"] == "m1" and payload["temperature"] == 0
    assert judge.ask("make it blue", "add a dog").consistent is False
    assert [parse_verdict(t) for t in ("YES", "no, because", "Maybe", "")] == [True, False, None, None]
    with pytest.raises(JudgeError, match="chat completion"):
        Judge(_judge_cfg(), lambda *a: {"unexpected": 1}).ask("a", "b")


class _StandIn(BaseHTTPRequestHandler):
    replies = []
    seen = []

    def do_POST(self):  # noqa: N802 - http.server's naming
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        _StandIn.seen.append((self.path, body))
        status, text = _StandIn.replies.pop(0)
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        if status == 200:
            self.wfile.write(json.dumps({"choices": [{"message": {"role": "assistant", "content": text}}]}).encode())

    def log_message(self, *args):
        pass


def test_judge_against_a_local_stand_in_server_retries_server_errors():
    server = HTTPServer(("127.0.0.1", 0), _StandIn)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        endpoint = f"http://127.0.0.1:{server.server_port}/v1"
        _StandIn.replies[:] = [(503, ""), (200, "yes")]
        judge = Judge(_judge_cfg(endpoint=endpoint, api_key_env=None, max_retries=2), sleep=lambda s: None)
        assert judge.ask("make it red", "turn it red").consistent is True
        assert [p for p, _ in _StandIn.seen] == ["/v1/chat/completions"] * 2
        _StandIn.replies[:] = [(400, "")]
        with pytest.raises(JudgeError, match="HTTP 400"):
            judge.ask("a", "b")
    finally:
        server.shutdown()


def _image(path, colour=(200, 0, 0)):
    Image.new("RGB", (24, 24), colour).save(path)
    return path


def test_seed_data_edit_reader_aliases_missing_images_and_errors(tmp_path):
    (tmp_path / "img").mkdir()
    _image(tmp_path / "img" / "a.jpg")
    _image(tmp_path / "img" / "b.png", (0, 0, 200))
    (tmp_path / "img" / "broken.jpg").write_bytes(b"not an image")
    lines = [
        {"id": "case-a", "source_image": "img/a.jpg", "target_prompt": "a blue square", "instruction": "make it blue"},
        {"input_image": str(tmp_path / "img" / "b.png"), "edited_prompt": "a red square", "edit_instruction": "red"},
        {"source_image": "img/missing.jpg", "target_prompt": "x", "instruction": "y"},
        {"source_image": "img/broken.jpg", "target_prompt": "x", "instruction": "y"},
        {"source_image": "img/a.jpg", "target_caption": "a dog", "instruction_1": "add a dog", "edit_image_1": "z"},
    ]
    sample = tmp_path / "seed.jsonl"
    sample.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    cases, skipped = read_seed_edit_sample(sample)
    assert [c.key for c in cases] == ["case-a", "seed.jsonl:2", "seed.jsonl:5"]
    assert [(c.prompt, c.reference) for c in cases] == [("a blue square", "make it blue"), ("a red square", "red"),
                                                        ("a dog", "add a dog")]
    assert skipped == {"missing_image": 1, "corrupt_image": 1} and cases[0].image.size == (24, 24)
    assert len(read_seed_edit_sample(sample, limit=1)[0]) == 1
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"source_image": "img/a.jpg", "instruction": "x"}) + "\n")
    with pytest.raises(SeedEditFormatError, match=r"bad.jsonl:1: no target prompt.*target_prompt"):
        read_seed_edit_sample(bad)


def test_eval_writes_metrics_page_and_answers_batched_like_single(tmp_path, tiny_llava_dir):
    from img_lightning.cli.finetune_mllm import main
    from img_lightning.finetune.evaluate import generate_answers, run_eval
    from img_lightning.finetune.samples import SampleEncoder
    from img_lightning.finetune.seed_edit import EvalCase
    from preprocessing.demo_data import write_edit_triplets_parquet

    data = tmp_path / "t.parquet"
    write_edit_triplets_parquet(data, 40, seed=4)
    # the base model stands in for the finetuned export (the page and metrics are what is tested here)
    cfg = tiny_finetune_config(data, tiny_llava_dir, tmp_path, "ev", **{"eval.finetuned": str(tiny_llava_dir),
                                                                       "eval.judge.enabled": True})
    verdicts = iter(["yes", "yes", "no", "no"] * 100)  # per case: base, finetuned
    result = run_eval(cfg, judge_transport=lambda *a: {"choices": [{"message": {"content": next(verdicts)}}]})
    metrics = json.loads((result.out_dir / "metrics.json").read_text())
    assert set(metrics) == {"base", "finetuned"}
    for m in metrics.values():
        assert {"rouge_l", "token_f1", "exact_match", "n"} <= set(m) and m["n"] == 6
        assert 0 <= m["rouge_l"] <= 1 and m["judge_consistent"] == 0.5
    assert metrics["base"] == metrics["finetuned"]  # the same weights answer the same
    page = (result.out_dir / "index.html").read_text()
    assert page.count("<img ") == 6 and "reference instruction" in page
    answers = [json.loads(x) for x in (result.out_dir / "answers.jsonl").read_text().splitlines()]
    assert len(answers) == 6 and {"base", "finetuned", "reference", "prompt"} <= set(answers[0])
    assert answers[0]["base"]["question"].endswith("?") or answers[0]["base"]["question"].endswith(".")

    # batched greedy generation (left padding) answers exactly as one case at a time
    import transformers

    model = transformers.LlavaForConditionalGeneration.from_pretrained(tiny_llava_dir).eval()
    encoder = SampleEncoder.from_config(cfg.mllm)
    colours = [(200, 0, 0), (0, 0, 200), (0, 150, 0)]
    cases = [EvalCase(f"k{i}", Image.new("RGB", (40, 28 + 8 * i), c), p, "r")
             for i, (c, p) in enumerate(zip(colours, ["a red square", "a large blue circle on a white background",
                                                       "green"], strict=True))]
    batched = generate_answers(model, encoder, cases, batch_size=3, max_new_tokens=8)
    single = [generate_answers(model, encoder, [c], batch_size=1, max_new_tokens=8)[0] for c in cases]
    assert [b["text"] for b in batched] == [s["text"] for s in single]

    # SEED-Data-Edit source through the CLI; a missing eval.input is one clear error
    Image.new("RGB", (30, 30), (10, 200, 10)).save(tmp_path / "s.jpg")
    (tmp_path / "seed.jsonl").write_text(json.dumps({"source_image": "s.jpg", "target_prompt": "a green square",
                                                     "instruction": "make the square green"}) + "\n")
    base_args = [f"mllm.path={tiny_llava_dir}", "mllm.dtype=float32", "mllm.device=cpu", "mllm.prompt_format=llava_v0",
                 f"data.input={data}", f"run.root={tmp_path}", "run.name=ev", f"eval.finetuned={tiny_llava_dir}",
                 "eval.max_new_tokens=4", "eval.source=seed_data_edit"]
    assert main(["eval", "-q", *base_args, f"eval.input={tmp_path / 'seed.jsonl'}",
                 f"eval.output={tmp_path / 'seed'}"]) == 0
    assert json.loads((tmp_path / "seed" / "metrics.json").read_text())["finetuned"]["n"] == 1
    assert main(["eval", *base_args]) == 2


def _export_stub(folder, data, fraction=0.15, salt="img-finetune-heldout-v1", fingerprint=None, **blocks):
    """An export folder's manifest (and, unless the folder exists, a stand-in config.json)."""
    from img_lightning.encoders.export_manifest import MANIFEST_FORMAT, MANIFEST_NAME
    from img_lightning.finetune.triplets import scan_triplets

    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / "config.json").exists():
        (folder / "config.json").write_text("{}")
    from img_lightning.hashing import file_sha256

    fingerprint = fingerprint or scan_triplets(str(data), fraction, salt).fingerprint
    weights = {p.name: file_sha256(p) for p in folder.glob("*.safetensors")}  # what a real export lists
    manifest = {"format": MANIFEST_FORMAT, "version": 1, "weights": weights, **blocks,
                "data": {"heldout_fraction": fraction, "heldout_salt": salt, "fingerprint": fingerprint}}
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest))
    return folder


def test_eval_refuses_a_heldout_split_other_than_the_exports(tmp_path, tiny_llava_dir, capsys):
    from img_lightning.cli.finetune_mllm import main
    from img_lightning.finetune.evaluate import HeldoutMismatchError, run_eval
    from preprocessing.demo_data import write_edit_triplets_parquet

    data = tmp_path / "t.parquet"
    write_edit_triplets_parquet(data, 24, seed=5)
    export = _export_stub(tmp_path / "export", data)  # trained at fraction 0.15 with the default salt

    def cfg(**kw):
        return tiny_finetune_config(data, tiny_llava_dir, tmp_path, "ev", **{"eval.finetuned": str(export), **kw})

    with pytest.raises(HeldoutMismatchError, match=r"data.heldout_fraction=0.3 here, 0.15 in .*img_finetune.json"):
        run_eval(cfg(**{"data.heldout_fraction": 0.3}))
    with pytest.raises(HeldoutMismatchError, match=r"data.heldout_salt='other' here, 'img-finetune-heldout-v1' in"):
        run_eval(cfg(**{"data.heldout_salt": "other"}))
    other = tmp_path / "other.parquet"
    write_edit_triplets_parquet(other, 24, seed=6)
    with pytest.raises(HeldoutMismatchError, match=r"data.input=.*other.parquet gives index fingerprint"):
        run_eval(cfg(**{"data.input": str(other)}))
    # the CLI: one line, exit 2
    args = tiny_finetune_overrides(data, tiny_llava_dir, tmp_path, "ev", **{"eval.finetuned": str(export),
                                                                           "data.heldout_salt": "other"})
    assert main(["eval", *args, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "heldout_salt" in err and "Traceback" not in err


def test_eval_warns_when_the_export_was_trained_with_another_format_or_questions(tmp_path, tiny_llava_dir, caplog):
    import shutil

    from img_lightning.finetune.evaluate import run_eval
    from preprocessing.demo_data import write_edit_triplets_parquet

    data = tmp_path / "t.parquet"
    write_edit_triplets_parquet(data, 24, seed=5)
    export = tmp_path / "export"
    shutil.copytree(tiny_llava_dir, export)
    _export_stub(export, data, conversation={"prompt_format": "llava_v1", "image_mode": "pad"},
                 questions={"name": "other", "sha256": "0" * 64})
    cfg = tiny_finetune_config(data, tiny_llava_dir, tmp_path, "ev", **{
        "eval.finetuned": str(export), "eval.base": False, "eval.limit": 1, "eval.max_new_tokens": 2})
    with caplog.at_level("WARNING", logger="img_lightning"):
        result = run_eval(cfg)
    assert result.n == 1
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("prompt_format: trained with 'llava_v1', now 'llava_v0'" in m for m in warned), warned
    assert any("questions: trained with 'other'" in m for m in warned), warned
