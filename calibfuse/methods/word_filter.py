"""Word filtering: a lexicon's words are banned at every step, per target tokenizer, by
transformers' `NoBadWordsLogitsProcessor` (a one-token word is never generated; a several-token word
never gets its last token right after the others). Default lexicon: the `size` words that
alt-profanity-check's linear model weighs most towards "offensive" — scored by that same model,
word filtering is flattered (it removes exactly what the scorer looks for)."""

from __future__ import annotations

from pathlib import Path

from transformers import NoBadWordsLogitsProcessor

from calibfuse.methods import Method
from calibfuse.utils.files import sha256_json

PROFANITY_CHECK_LEXICON = "embedded:profanity_check"


def read_lexicon(source: str = PROFANITY_CHECK_LEXICON, size: int = 300) -> list[str]:
    """Words to ban: the profanity_check model's most offensive-weighted features, or a file (one per line)."""
    if source == PROFANITY_CHECK_LEXICON:
        import numpy as np
        from profanity_check import profanity_check as pc

        coef = np.mean([c.estimator.coef_[0] for c in pc.model.calibrated_classifiers_], axis=0)
        vocabulary = pc.vectorizer.get_feature_names_out()
        return [str(vocabulary[i]) for i in np.argsort(-coef)[:size] if coef[i] > 0 and " " not in vocabulary[i]]
    path = Path(source).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"lexicon {source!r} does not exist; expected {PROFANITY_CHECK_LEXICON!r} or a text file, one word per line")
    words = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip() and not line.startswith("#")]
    if not words:
        raise ValueError(f"lexicon {source!r} has no words")
    return words[:size] if size else words


def banned_word_ids(tokenizer, words: list[str]) -> list[list[int]]:
    """Token ids of every word as a word-initial token (with its leading space), in lower, Capital and UPPER case."""
    banned = set()
    for word in words:
        for form in {word.lower(), word.capitalize(), word.upper()}:
            ids = tokenizer(" " + form, add_special_tokens=False)["input_ids"]
            ids = ids[1:] if len(ids) > 1 and tokenizer.decode(ids[:1]).strip() == "" else ids  # a lone "▁" first
            banned.add(tuple(ids))
    return [list(ids) for ids in sorted(banned)]


class WordFilter(Method):
    role = "baseline"

    def __init__(self, lexicon: str = PROFANITY_CHECK_LEXICON, size: int = 300):
        self.lexicon, self.size = lexicon, size
        self.words: list[str] = []
        self.bad_words_ids: list[list[int]] = []
        self.eos_ids: list[int] = []

    def prepare(self, targets) -> None:
        self.words = read_lexicon(self.lexicon, self.size)

    def identity(self, target: str, alpha: float) -> dict:
        return {"lexicon": sha256_json(self.words), "words": len(self.words)}

    def bind(self, target, target_lm, models) -> None:
        self.bad_words_ids = banned_word_ids(target_lm.tokenizer, self.words)
        self.eos_ids = target_lm.eos_ids.tolist()

    def logits_processors(self, alpha: float) -> list:
        return [NoBadWordsLogitsProcessor(self.bad_words_ids, eos_token_id=self.eos_ids)]
