"""Training samples of the MLLM finetune: answer-only labels, the guidance encoder's exact inputs, the
question choice."""

from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from img_lightning.config.encoders import MLLMConfig
from img_lightning.encoders.conversation import LLAVA_V0, LLAVA_V1, PromptTextError
from img_lightning.encoders.mllm import GuidanceEncoder
from img_lightning.finetune.samples import IGNORE, OverLong, SampleEncoder

IMAGE = Image.new("RGB", (48, 32), (200, 30, 30))
PROMPT = "a large red square on a blue background"
ANSWER = "make the square red"


def _cfg(path, backend="llava", **kw):
    return OmegaConf.structured(MLLMConfig(backend=backend, path=str(path), dtype="float32", device="cpu", **kw))


@pytest.fixture(scope="module")
def llava(tiny_llava_dir):
    return tiny_llava_dir


@pytest.mark.parametrize("fmt,end", [("llava_v0", "###"), ("llava_v1", "</s>")])
def test_llava_labels_are_exactly_the_answer_and_end_of_turn(llava, fmt, end):
    enc = SampleEncoder.from_config(_cfg(llava, prompt_format=fmt))
    sample = enc.encode("k1", IMAGE, PROMPT, ANSWER)
    labelled = [i for i, t in enumerate(sample.labels) if t != IGNORE]
    # one contiguous span reaching the end of the sequence ...
    assert labelled == list(range(labelled[0], len(sample.input_ids)))
    assert [sample.input_ids[i] for i in labelled] == [sample.labels[i] for i in labelled]
    # ... that decodes to the answer plus the end of turn, and nothing of the prompt
    tok = enc.tokenizer
    assert tok.decode([sample.input_ids[i] for i in labelled]).strip() == f"{ANSWER}{end}"
    # the prompt part is, token for token, what the guidance encoder feeds the model for this sample
    guidance = GuidanceEncoder.from_config(_cfg(llava, prompt_format=fmt))
    ids = guidance.prepare([IMAGE], [PROMPT], [guidance.question_index("k1")])["input_ids"][0].tolist()
    assert sample.input_ids[: labelled[0]] == ids
    conv = LLAVA_V0 if fmt == "llava_v0" else LLAVA_V1
    assert sample.prompt_text == conv.prompt(enc.question("k1", PROMPT)[1])
    # pixels: the guidance encoder's (pad to square with the mean colour, then the processor)
    expected = guidance.prepare([IMAGE], [PROMPT], [0])["pixel_values"]
    torch.testing.assert_close(sample.image_inputs["pixel_values"], expected)


def test_chat_template_labels_end_with_the_templates_eos(tiny_qwen_dir):
    cfg = _cfg(tiny_qwen_dir, backend="qwen2_5_vl", image_mode="processor", prompt_format="chat_template")
    enc = SampleEncoder.from_config(cfg)
    sample = enc.encode("k2", IMAGE, PROMPT, ANSWER)
    labelled = [i for i, t in enumerate(sample.labels) if t != IGNORE]
    assert labelled == list(range(labelled[0], labelled[-1] + 1))
    assert enc.tokenizer.decode([sample.input_ids[i] for i in labelled]) == f"{ANSWER}<|im_end|>"
    assert enc.tokenizer.decode(sample.input_ids[labelled[-1] + 1:]) == "\n"  # the template's newline: no loss
    guidance = GuidanceEncoder.from_config(cfg)
    ids = guidance.prepare([IMAGE], [PROMPT], [guidance.question_index("k2")])["input_ids"][0].tolist()
    assert sample.input_ids[: labelled[0]] == ids
    assert {"pixel_values", "image_grid_thw", "mm_token_type_ids"} <= set(sample.image_inputs)


def test_llava_hf_chat_template_answer_span(llava):
    enc = SampleEncoder.from_config(_cfg(llava, prompt_format="chat_template"))
    sample = enc.encode("k3", IMAGE, PROMPT, ANSWER)
    labelled = [t for t in sample.labels if t != IGNORE]
    # llava-hf's template ends the assistant turn with a space; the EOS is supervised after the answer
    assert enc.tokenizer.decode(labelled).strip() == f"{ANSWER}</s>"
    guidance = GuidanceEncoder.from_config(_cfg(llava, prompt_format="chat_template"))
    ids = guidance.prepare([IMAGE], [PROMPT], [guidance.question_index("k3")])["input_ids"][0].tolist()
    first = next(i for i, t in enumerate(sample.labels) if t != IGNORE)
    assert sample.input_ids[:first] == ids  # the prompt is still exactly the guidance encoder's


@pytest.mark.parametrize("backend,fmt", [("llava", "llava_v0"), ("llava", "llava_v1"), ("llava", "chat_template"),
                                         ("qwen2_5_vl", "chat_template")])
def test_supervised_span_ends_with_an_end_of_turn_for_every_format(backend, fmt, tiny_llava_dir, tiny_qwen_dir):
    """Without an end-of-turn token in the labels the model never learns to stop answering."""
    path = tiny_llava_dir if backend == "llava" else tiny_qwen_dir
    enc = SampleEncoder.from_config(_cfg(path, backend=backend, prompt_format=fmt,
                                         image_mode="pad" if backend == "llava" else "processor"))
    labelled = [t for t in enc.encode("k4", IMAGE, PROMPT, ANSWER).labels if t != IGNORE]
    tok = enc.tokenizer
    if fmt == "llava_v0":  # LLaVA's v0 separator; generation is cut there (SampleEncoder.end_of_turn)
        assert tok.decode(labelled).endswith(f"{ANSWER}###") and enc.end_of_turn == "###"
    else:  # EOS: generation stops on it
        assert labelled[-1] == tok.eos_token_id and tok.decode(labelled[:-1]).strip() == ANSWER
        assert enc.end_of_turn == tok.eos_token


def test_question_choice_is_the_guidance_encoders_and_comes_from_the_question_file(llava, tmp_path):
    questions = [f"Question {i}: what must change to match {{prompt}}?" for i in range(7)]
    path = tmp_path / "questions.json"
    path.write_text(json.dumps(questions))
    cfg = _cfg(llava, questions=str(path), prompt_format="llava_v0")
    enc = SampleEncoder.from_config(cfg)
    guidance = GuidanceEncoder.from_config(cfg)
    seen = set()
    for key in (f"triplet-{i}" for i in range(40)):
        index, question = enc.question(key, PROMPT)
        assert index == guidance.question_index(key) == enc.questions.index_for(key)
        assert question == questions[index].replace("{prompt}", PROMPT)
        assert enc.encode(key, IMAGE, PROMPT, ANSWER).question_index == index
        seen.add(index)
    assert len(seen) > 3  # the choice really varies with the key
    assert enc.question("triplet-3", PROMPT) == SampleEncoder.from_config(cfg).question("triplet-3", PROMPT)


def test_collate_pads_right_with_ignored_labels_and_left_for_generation(llava):
    enc = SampleEncoder.from_config(_cfg(llava))
    a = enc.encode("a", IMAGE, "red", "make it blue")
    b = enc.encode("b", IMAGE, PROMPT + " and a long tail of words", ANSWER + " and much more")
    batch = enc.collate([a, b])
    assert batch["input_ids"].shape == (2, max(a.num_tokens, b.num_tokens)) and batch["pixel_values"].shape[0] == 2
    assert batch["attention_mask"][0].tolist() == [1] * a.num_tokens + [0] * (b.num_tokens - a.num_tokens)
    assert batch["labels"][0, a.num_tokens:].eq(IGNORE).all()
    assert batch["labels"][0, : a.num_tokens].tolist() == a.labels
    left = enc.collate([a, b], padding_side="left")
    assert left["input_ids"][0, -a.num_tokens:].tolist() == a.input_ids and left["attention_mask"][0, 0] == 0


def test_over_long_placeholder_and_image_marker(llava):
    enc = SampleEncoder.from_config(_cfg(llava), max_length=40)
    with pytest.raises(OverLong, match="data.max_length=40"):
        enc.encode("k", IMAGE, PROMPT, ANSWER)
    enc = SampleEncoder.from_config(_cfg(llava))
    placeholder = enc.placeholder()
    assert placeholder.num_answer_tokens == 0 and placeholder.key == ""
    with pytest.raises(PromptTextError):
        enc.encode("k", IMAGE, "a photo of <image> here", ANSWER)
