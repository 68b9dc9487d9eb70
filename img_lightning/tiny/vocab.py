"""Offline tokenizer vocabularies for the tiny models (no hub access, no trained merges).

Real tokenizers are byte-level / byte-fallback BPE models; we build the same kinds of files from a
small word list: every single symbol is in the vocabulary (so any text encodes), and a merge chain
per word makes frequent demo words single tokens (so text carries signal into the tiny models).
"""

from __future__ import annotations

from functools import lru_cache

# Words the demo captions and question templates use most; anything else falls back to pieces.
COMMON_WORDS = (
    "a an the of on in with and to is be can how what image picture photo prompt modified "
    "modify change changed match matches correspond description caption scene "
    "red green blue yellow orange purple white black pink brown gray cyan "
    "circle square triangle star ring cross diamond shape shapes small large big "
    "background left right top bottom center two three one "
    # LLaVA-1.5's system line and roles, and frequent words of the question templates
    "chat between curious human artificial intelligence assistant gives helpful detailed polite "
    "answers questions user USER ASSISTANT A The this that it so for be should would could "
    "need needs made make edit edited edits changes adjusted altered better closer fit fits "
    "prompt: caption: description: with respect"
).split()


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP byte-level alphabet: every byte maps to a printable unicode character."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars), strict=True))


def _merge_chain(symbols: list[str]) -> list[tuple[str, str]]:
    """Left-to-right merges that turn ``symbols`` into one token."""
    merges = []
    while len(symbols) > 1:
        merges.append((symbols[0], symbols[1]))
        symbols = [symbols[0] + symbols[1]] + symbols[2:]
    return merges


def _add_merges(vocab: dict[str, int], merges: list[tuple[str, str]], chain: list[tuple[str, str]]) -> None:
    for left, right in chain:
        if (left, right) not in merges:
            merges.append((left, right))
        if left + right not in vocab:
            vocab[left + right] = len(vocab)


def clip_vocab(words=COMMON_WORDS) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocabulary + merges in CLIP's format (byte-level symbols, ``</w>`` end-of-word suffix)."""
    vocab: dict[str, int] = {}
    alphabet = list(bytes_to_unicode().values())
    for ch in alphabet:
        vocab[ch] = len(vocab)
    for ch in alphabet:
        vocab[ch + "</w>"] = len(vocab)
    merges: list[tuple[str, str]] = []
    for word in words:
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        _add_merges(vocab, merges, _merge_chain(symbols))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return vocab, merges


def gpt2_vocab(words=COMMON_WORDS, specials: tuple[str, ...] = ()) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Byte-level BPE vocabulary in GPT-2/Qwen2 format (``Ġ`` marks a leading space)."""
    vocab: dict[str, int] = {}
    for ch in bytes_to_unicode().values():
        vocab[ch] = len(vocab)
    merges: list[tuple[str, str]] = []
    space = bytes_to_unicode()[ord(" ")]
    for word in words:
        _add_merges(vocab, merges, _merge_chain(list(word)))
        _add_merges(vocab, merges, _merge_chain([space] + list(word)))
    for tok in specials:
        vocab[tok] = len(vocab)
    return vocab, merges


def sentencepiece_bpe_vocab(words=COMMON_WORDS) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Llama-style BPE vocabulary: ``<unk> <s> </s>``, 256 byte-fallback tokens, ``▁`` word marks."""
    vocab: dict[str, int] = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    letters = "▁" + "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,:;?!'\"-()"
    for ch in letters:
        vocab.setdefault(ch, len(vocab))
    merges: list[tuple[str, str]] = []
    for word in words:
        _add_merges(vocab, merges, _merge_chain(["▁"] + list(word)))
    return vocab, merges
