"""Conversation formats and token ids: our LLaVA prompts are LLaVA's conversations, and the ids
equal LLaVA's tokenizer_image_token on a SentencePiece Llama tokenizer trained here."""

import io

import pytest

from img_lightning.encoders.conversation import (
    LLAVA_V0,
    LLAVA_V1,
    PromptFormat,
    PromptTextError,
    encode_llava_conversation,
    llava_input_ids,
    llava_pieces_ids,
    resolve_format,
)

IMAGE_INDEX = -200
SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
          "The assistant gives helpful, detailed, and polite answers to the human's questions.")

CORPUS = [
    SYSTEM, "###Human: ###Assistant: USER: ASSISTANT:",
    "How can the image be modified to correspond with the prompt: a red cube on a table?",
    "Make the sky purple and add two small boats.", "Zürich café naïve — 東京 タワー 🙂 «quotes»",
    "lines\nwith\n\nnewlines and  double  spaces", "<div> tags </div> and {braces} and [brackets] 12345",
]

QUESTIONS = [
    "How can the image be modified to correspond with the prompt: a red cube?",
    "What changes?\nList them:\n1. colour\n2. size",
    "Zürich café naïve — 東京 タワー 🙂",
    "a <image > of a <imag and </image> and <IMAGE>",
    "  leading and trailing spaces  ",
    "ends with a newline\n",
    "{prompt} braces {} and ### separators ###",
]


@pytest.fixture(scope="module")
def sp_files(tmp_path_factory):
    """A Llama-style SentencePiece BPE model (byte fallback), trained here, loaded by transformers."""
    import sentencepiece as spm

    folder = tmp_path_factory.mktemp("sp")
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 10), model_writer=model, vocab_size=450, model_type="bpe",
        byte_fallback=True, split_digits=True, add_dummy_prefix=True, remove_extra_whitespaces=False,
        normalization_rule_name="identity", character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        hard_vocab_limit=False, num_threads=1, minloglevel=2)
    (folder / "tokenizer.model").write_bytes(model.getvalue())
    return folder, spm.SentencePieceProcessor(model_proto=model.getvalue())


@pytest.fixture(scope="module")
def tokenizer(sp_files):
    from transformers import LlamaTokenizer

    tok = LlamaTokenizer.from_pretrained(sp_files[0], legacy=False, add_bos_token=True)
    assert len(tok) == sp_files[1].get_piece_size()  # the trained model, not an empty default
    return tok


def ref_tokenizer_image_token(prompt, tokenizer):
    """LLaVA's tokenizer_image_token, from its documented behaviour."""
    chunks = [tokenizer(c).input_ids for c in prompt.split("<image>")]
    keep_bos = bool(chunks[0]) and chunks[0][0] == tokenizer.bos_token_id
    out = [chunks[0][0]] if keep_bos else []
    for n, chunk in enumerate(chunks):
        if n:
            out.append(IMAGE_INDEX)
        out += chunk[1:] if keep_bos else chunk
    return out


def test_llava_prompts_are_llavas_conversations():
    q = "What should change?"
    assert LLAVA_V0.prompt(q) == f"{SYSTEM}###Human: <image>\n{q}###Assistant:"
    assert LLAVA_V1.prompt(q) == f"{SYSTEM} USER: <image>\n{q} ASSISTANT:"
    v0 = LLAVA_V0.conversation(q, "Make it blue.")
    assert v0.text == f"{SYSTEM}###Human: <image>\n{q}###Assistant: Make it blue.###"
    assert v0.prompt == LLAVA_V0.prompt(q) and v0.answer == " Make it blue.###"
    v1 = LLAVA_V1.conversation(q, "Make it blue.")
    assert v1.text.endswith(" ASSISTANT: Make it blue.</s>") and v1.answer == " Make it blue.</s>"
    with pytest.raises(PromptTextError, match="<image>"):
        LLAVA_V0.prompt("a photo of <image> here")
    assert resolve_format("auto", "llava") is PromptFormat.llava_v1
    assert resolve_format(PromptFormat.llava_v0, "llava") is PromptFormat.llava_v0
    assert resolve_format("auto", "qwen2_5_vl") is PromptFormat.chat_template
    with pytest.raises(ValueError, match="chat_template"):
        resolve_format("llava_v0", "qwen2_5_vl")


@pytest.mark.parametrize("conv", [LLAVA_V0, LLAVA_V1], ids=["v0", "v1"])
def test_ids_equal_tokenizer_image_token(conv, tokenizer, sp_files):
    sp = sp_files[1]
    texts = [conv.prompt(q) for q in QUESTIONS]
    ours = llava_pieces_ids(tokenizer, texts)  # one batched call
    for text, ids in zip(texts, ours, strict=True):
        ref = ref_tokenizer_image_token(text, tokenizer)
        assert [IMAGE_INDEX if i is None else i for i in ids] == ref
        # ... and equal to SentencePiece itself, which LLaVA's slow tokenizer (use_fast=False) ran
        head, tail = text.split("<image>")
        assert ref == [sp.bos_id()] + sp.encode(head) + [IMAGE_INDEX] + sp.encode(tail)
    expanded = llava_input_ids(tokenizer, texts[:1], image_token_id=999, num_image_tokens=5)[0]
    ref = ref_tokenizer_image_token(texts[0], tokenizer)
    k = ref.index(IMAGE_INDEX)
    assert expanded == ref[:k] + [999] * 5 + ref[k + 1:]


def test_whole_string_tokenisation_differs(tokenizer, sp_files):
    """Why the ids are built piecewise: with <image> as a special token, tokenising the whole prompt
    (what llava-hf's processor does) changes the tokens right after the image."""
    from transformers import AddedToken

    tok = tokenizer.__class__.from_pretrained(sp_files[0], legacy=False, add_bos_token=True)
    tok.add_tokens(AddedToken("<image>", special=True, normalized=False), special_tokens=True)
    image_id = tok.convert_tokens_to_ids("<image>")
    text = LLAVA_V0.prompt(QUESTIONS[0])
    whole = tok(text).input_ids
    pieces = [image_id if i is None else i for i in llava_pieces_ids(tok, [text])[0]]
    assert whole != pieces and whole[: whole.index(image_id) + 1] == pieces[: pieces.index(image_id) + 1]


@pytest.mark.parametrize("fmt", [PromptFormat.llava_v0, PromptFormat.llava_v1])
def test_answer_labels_cover_answer_and_end_of_turn(fmt, tokenizer):
    conv = LLAVA_V0 if fmt is PromptFormat.llava_v0 else LLAVA_V1
    for q, a in [(QUESTIONS[0], "Make the cube blue."), (QUESTIONS[2], "Add 東京 tower 🙂\nand a boat.")]:
        enc = encode_llava_conversation(tokenizer, fmt, q, a, image_token_id=998, num_image_tokens=4)
        full = ref_tokenizer_image_token(conv.conversation(q, a).text, tokenizer)
        k = full.index(IMAGE_INDEX)
        assert enc.input_ids == full[:k] + [998] * 4 + full[k + 1:]
        prompt_ids = llava_input_ids(tokenizer, [conv.prompt(q)], 998, 4)[0]
        assert enc.answer_start == len(prompt_ids) and enc.input_ids[: enc.answer_start] == prompt_ids
        assert enc.answer_end == len(enc.input_ids)
        labels = enc.labels()
        assert all(x == -100 for x in labels[: enc.answer_start])
        assert labels[enc.answer_start:] == enc.input_ids[enc.answer_start:]
        answer = tokenizer.decode(enc.input_ids[enc.answer_start:])
        if fmt is PromptFormat.llava_v1:
            assert enc.input_ids[-1] == tokenizer.eos_token_id and answer.endswith("</s>")
        else:
            assert answer.endswith("###")
        assert a.split()[0] in answer


def test_chat_template_conversation_locates_the_answer(tiny_qwen_dir):
    from transformers import AutoProcessor

    from img_lightning.encoders.conversation import chat_template_conversation, chat_template_prompt

    processor = AutoProcessor.from_pretrained(tiny_qwen_dir)
    rendered = chat_template_conversation(processor, "What should change?", "Make it blue.")
    assert rendered.prompt == chat_template_prompt(processor, "What should change?")
    assert rendered.prompt.endswith("<|im_start|>assistant\n")
    assert rendered.answer == "Make it blue.<|im_end|>" and rendered.text[rendered.answer_end:] == "\n"
    with pytest.raises(PromptTextError, match="image_pad"):
        chat_template_prompt(processor, "a <|image_pad|> here")
