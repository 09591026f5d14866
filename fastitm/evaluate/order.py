"""ARO's order tasks (COCO-Order, Flickr30k-Order): each caption against four shufflings of itself.

The perturbations follow the published ``aro/dataset_zoo/perturbations.py`` (TextShuffler): shuffle
the nouns among themselves and the adjectives among themselves; shuffle everything but nouns and
adjectives; shuffle within each trigram; shuffle the trigrams. Then the published ``pre_caption``
(lower case, punctuation to spaces, at most ``max_words`` words) is applied to all five. The published
code draws its shufflings from unseeded global random state; here each caption's are drawn from a
generator seeded by (seed, caption index), so a run can be repeated.

Part-of-speech tags come from spaCy's ``en_core_web_sm`` and trigram tokens from NLTK's
``word_tokenize``, as published; both need their models installed (``python -m spacy download
en_core_web_sm``; ``nltk.download("punkt_tab")``). :data:`TAGGER` and :data:`TOKENIZER` can be
replaced (tests use a small tagger).
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable

NOUNS = ("NN", "NNS", "NNP", "NNPS")
ADJECTIVES = ("JJ", "JJR", "JJS")

# (text) -> [(token, Penn Treebank tag)]; (text) -> [token]. None: load spaCy / NLTK on first use.
TAGGER: Callable[[str], list[tuple[str, str]]] | None = None
TOKENIZER: Callable[[str], list[str]] | None = None


class MissingModel(RuntimeError):
    """A language model the order tasks need (spaCy's tagger, NLTK's tokenizer) is not installed."""


def _tagger() -> Callable[[str], list[tuple[str, str]]]:
    global TAGGER
    if TAGGER is None:
        try:
            import spacy

            nlp = spacy.load("en_core_web_sm")
        except Exception as e:  # ImportError, or OSError when the model package is missing
            raise MissingModel("the order tasks tag parts of speech with spaCy's en_core_web_sm, as published: "
                               f"pip install spacy && python -m spacy download en_core_web_sm ({e})") from None
        TAGGER = lambda text: [(t.text, t.tag_) for t in nlp(text)]  # noqa: E731
    return TAGGER


def _tokenizer() -> Callable[[str], list[str]]:
    global TOKENIZER
    if TOKENIZER is None:
        try:
            import nltk

            nltk.word_tokenize("a test")
        except Exception as e:
            raise MissingModel("the order tasks split trigrams with NLTK's word_tokenize, as published: "
                               f"pip install nltk and nltk.download('punkt_tab') ({e})") from None
        TOKENIZER = nltk.word_tokenize
    return TOKENIZER


def pre_caption(caption: str, max_words: int = 30) -> str:
    """The published ``pre_caption``: lower case, ``.!"()*#:;~`` to spaces, spaces collapsed, at most
    ``max_words`` words."""
    caption = re.sub(r"([.!\"()*#:;~])", " ", caption.lower())
    caption = re.sub(r"\s{2,}", " ", caption).rstrip("\n").strip(" ")
    words = caption.split(" ")
    return " ".join(words[:max_words]) if len(words) > max_words else caption


def _permute(tokens: list[str], idx: list[int], rng: random.Random) -> None:
    picked = [tokens[i] for i in idx]
    rng.shuffle(picked)
    for i, t in zip(idx, picked, strict=True):
        tokens[i] = t


def shuffle_nouns_and_adj(text: str, rng: random.Random) -> str:
    tagged = _tagger()(text)
    tokens = [t for t, _ in tagged]
    _permute(tokens, [i for i, (_, tag) in enumerate(tagged) if tag in NOUNS], rng)
    _permute(tokens, [i for i, (_, tag) in enumerate(tagged) if tag in ADJECTIVES], rng)
    return " ".join(tokens)


def shuffle_allbut_nouns_and_adj(text: str, rng: random.Random) -> str:
    tagged = _tagger()(text)
    tokens = [t for t, _ in tagged]
    _permute(tokens, [i for i, (_, tag) in enumerate(tagged) if tag not in NOUNS + ADJECTIVES], rng)
    return " ".join(tokens)


def trigrams(tokens: list[str]) -> list[list[str]]:
    return [tokens[i : i + 3] for i in range(0, len(tokens), 3)]


def shuffle_within_trigrams(text: str, rng: random.Random) -> str:
    grams = trigrams(_tokenizer()(text))
    for g in grams:
        rng.shuffle(g)
    return " ".join(" ".join(g) for g in grams)


def shuffle_trigrams(text: str, rng: random.Random) -> str:
    grams = trigrams(_tokenizer()(text))
    rng.shuffle(grams)
    return " ".join(" ".join(g) for g in grams)


PERTURBATIONS = (shuffle_nouns_and_adj, shuffle_allbut_nouns_and_adj, shuffle_within_trigrams, shuffle_trigrams)


def caption_options(caption: str, index: int, seed: int = 0, max_words: int = 30) -> list[str]:
    """The true caption (first) and its four shufflings, each through ``pre_caption``."""
    rng = random.Random(f"fastitm-order:{seed}:{index}")
    return [pre_caption(caption, max_words)] + [pre_caption(f(caption, rng), max_words) for f in PERTURBATIONS]
