"""Noun phrases of a prompt, for T2I-CompBench's BLIP-VQA questions (``"{np}?"``).

T2I-CompBench uses spaCy ``en_core_web_sm`` noun chunks. Its weights are not on PyPI, so the
fallback here is a small rule-based chunker made for the benchmark's prompt styles ("a purple kite
and an orange boat", "The yellow lamp was on top of the wooden desk."): it splits at conjunctions,
prepositions, auxiliaries, relative pronouns and punctuation, drops verbs by a word list and by
their -ed/-ing position after a noun, and keeps the runs that remain. ``spacy:MODEL`` uses spaCy
itself (install spaCy and the model) and reproduces the official questions exactly; ``auto``
(the default) takes spaCy when it is installed and the rules otherwise, and the report labels
columns computed with the rules as proxies.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from functools import lru_cache

from ...config.loading import ConfigError

SPLIT_WORDS = frozenset(
    # coordination, prepositions, auxiliaries/copulas, relatives, adverbs that never head a noun phrase
    """and or but nor while whereas as than then so
    on in at of to with without under over above below behind beside besides near by from into onto
    inside outside between among against across through around atop beneath underneath toward towards
    along upon off up down out for within beyond past via next top bottom left right side front middle
    is are was were be been being am has have had do does did will would can could should may might must
    that which who whom whose where when there here it itself they them
    very too also just not no""".split()
)
# Chunks spaCy produces that T2I-CompBench's later scripts drop as questions about positions.
POSITION_CHUNKS = frozenset({"top", "the side", "the left", "the right", "the top", "the bottom"})
COMMON_VERBS = frozenset(
    # unambiguous verb forms only (words like "watch" or "rest" are nouns too often)
    """sat sits stood lay lies lying ran flew flies hung grew grows ate eats drank drinks wore wears
    held holds rode swam swims slept sleeps sang sings cooked rested perched leaned floated flowed
    shone shines glowed sparkled stretched covered filled surrounded placed displayed draped topped
    decorated made makes carried carries painted wrote writes""".split()
)
ING_NOUNS = frozenset(
    """building painting ring king clothing ceiling string wing thing swing pudding icing wedding
    evening morning earring stuffing frosting railing lighting dumpling sibling duckling bedding
    stocking awning carving drawing sapling seedling pudding spring""".split()
)
ED_ADJECTIVES = frozenset({"red", "bed", "shed", "sled", "wed", "sped"})
DETERMINERS = frozenset("a an the its their his her my your our this these those some".split())
_TOKEN = re.compile(r"[A-Za-z0-9'\-]+|[^\sA-Za-z0-9]")


def _is_verbish(word: str) -> bool:
    w = word.lower()
    if w in COMMON_VERBS:
        return True
    if w.endswith("ing") and len(w) > 4 and w not in ING_NOUNS:
        return True
    return w.endswith("ed") and len(w) > 4 and w not in ED_ADJECTIVES


def _boundary(tok: str | None) -> bool:
    """End of text, punctuation, a split word or a determiner: what follows a verb, not a modifier."""
    return tok is None or not re.match(r"[A-Za-z0-9]", tok) or tok.lower() in SPLIT_WORDS or tok.lower() in DETERMINERS


def rule_noun_phrases(prompt: str) -> list[str]:
    """Rule-based noun chunks, in order of appearance (see module docstring)."""
    toks = _TOKEN.findall(prompt)
    runs: list[list[str]] = [[]]
    for i, tok in enumerate(toks):
        low = tok.lower()
        nxt = toks[i + 1] if i + 1 < len(toks) else None
        if not re.match(r"[A-Za-z0-9]", tok) or low in SPLIT_WORDS:
            runs.append([])
            continue
        run = runs[-1]
        has_content = any(w.lower() not in DETERMINERS for w in run)
        # A word right after a noun and before a determiner is a verb ("bowl mix the batter"), and so
        # is a verb-like word before a boundary ("the river flowed next to"); -ing/-ed words before a
        # noun are modifiers ("rocking chair", "striped shirt").
        verb = (has_content and nxt is not None and nxt.lower() in DETERMINERS) or (
            _is_verbish(tok) and _boundary(nxt) and (has_content or not run)
        )
        if verb and low not in DETERMINERS:
            runs.append([])
            continue
        run.append(tok)
    phrases = []
    for run in runs:
        while run and run[-1].lower() in DETERMINERS:
            run = run[:-1]
        if not run:
            continue
        phrase = " ".join(run)
        if phrase.lower() not in POSITION_CHUNKS:
            phrases.append(phrase)
    return phrases


# Adjectives of T2I-CompBench's prompts (colours, materials, shapes, sizes, common qualities): what
# the rule-based stand-in for spaCy's part-of-speech tags drops from complex prompts.
ADJECTIVES = frozenset(
    """red green blue yellow black white brown pink orange purple gray grey golden silver beige violet
    wooden metallic metal fluffy glass plastic leather rubber fabric furry woolen wool silk silky velvet
    ceramic stone marble concrete paper cardboard porcelain crystal transparent shiny soft hard smooth
    rough round square triangular rectangular oval circular cylindrical spherical cubic conical oblong
    hexagonal big small large tiny little huge tall short long wide narrow thick thin giant massive
    old new young ancient modern beautiful cute pretty ugly bright dark colorful colourful vibrant
    delicious fresh happy sad angry calm quiet loud busy empty full heavy light warm cold hot cozy
    elegant sleek sturdy fragile broken clean dirty wet dry striped spotted checkered plaid floral""".split()
)


@lru_cache(maxsize=4)
def _spacy(model: str):
    try:
        import spacy
    except ImportError:
        raise ConfigError("noun_phrases=spacy:... needs spaCy: pip install spacy (or use noun_phrases=rules)") from None
    try:
        return spacy.load(model)
    except OSError:
        raise ConfigError(
            f"spaCy model '{model}' is not installed (python -m spacy download {model}, or pip install its "
            f"wheel), or use noun_phrases=rules"
        ) from None


DEFAULT_SPACY = "spacy:en_core_web_sm"  # T2I-CompBench's own chunker


def resolve_noun_phrases(spec: str = "auto") -> str:
    """``"auto"`` -> ``"spacy:en_core_web_sm"`` when spaCy and that model load, else ``"rules"``;
    anything else is returned as given (and checked when used)."""
    if spec != "auto":
        return spec
    try:
        _spacy(DEFAULT_SPACY.split(":", 1)[1])
    except ConfigError:
        return "rules"
    return DEFAULT_SPACY


def is_exact(spec: str) -> bool:
    """Whether a resolved ``noun_phrases`` spec runs T2I-CompBench's own chunker (spaCy)."""
    return spec.startswith("spacy:")


def noun_phrase_extractor(spec: str = "rules") -> Callable[[str], list[str]]:
    """``"rules"``, ``"spacy:MODEL"`` or ``"auto"`` -> a function prompt -> list of noun phrases."""
    spec = resolve_noun_phrases(spec)
    if spec == "rules":
        return rule_noun_phrases
    if spec.startswith("spacy:"):
        nlp = _spacy(spec.split(":", 1)[1])
        return lambda text: [chunk.text for chunk in nlp(text).noun_chunks]
    raise ConfigError(f"noun_phrases must be 'auto', 'rules' or 'spacy:MODEL', got '{spec}'")


def rule_strip_adjectives(prompt: str) -> str:
    """The rules' stand-in for removing spaCy ADJ tokens: drop :data:`ADJECTIVES`, join the
    remaining tokens with single spaces (punctuation split off, as spaCy tokenises)."""
    return " ".join(t for t in _TOKEN.findall(prompt) if t.lower() not in ADJECTIVES)


def adjective_stripper(spec: str = "rules") -> Callable[[str], str]:
    """Prompt -> prompt without adjectives, the text T2I-CompBench's ``CLIP_similarity.py --complex``
    scores: spaCy tokens whose ``pos_`` is not ADJ, joined with spaces (``spacy:MODEL``), or the
    word-list stand-in (``rules``, a proxy)."""
    spec = resolve_noun_phrases(spec)
    if spec == "rules":
        return rule_strip_adjectives
    if spec.startswith("spacy:"):
        nlp = _spacy(spec.split(":", 1)[1])
        return lambda text: " ".join(tok.text for tok in nlp(text) if tok.pos_ != "ADJ")
    raise ConfigError(f"noun_phrases must be 'auto', 'rules' or 'spacy:MODEL', got '{spec}'")
