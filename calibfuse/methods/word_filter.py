"""Word filtering: no lexicon word ever appears as a whole word in the decoded continuation, in any
letter case, whatever precedes it (the continuation's start, a space, a newline, a quote, "(", "#"...).
Default lexicon: the `size` words that alt-profanity-check's linear model weighs most towards
"offensive" — scored by that same model, word filtering is flattered (it removes exactly what the
scorer looks for).

The rule is read on text, not on token ids. Banning the ids of `" " + word` (transformers'
`NoBadWordsLogitsProcessor`, rule 1) leaked wherever a tokenizer spells the word otherwise: without a
space marker (`"\\nfuck"` is `\\n`+`fuck` in Gemma-3 and Qwen2.5), merged with punctuation (`(f`+`uck`
in Qwen2.5), or in any of the other splits a model may sample (`fu`+`ck`). So each token's text is
read once per tokenizer (what decoding adds for it), and at every step a token is banned if, appended
to the continuation so far, it would end a lexicon word that starts at a word boundary. The
continuation's start is a boundary (it is scored alone). So is the text's end: what comes next is
unknown, so a word's last piece is banned even where a longer word could follow (as
`NoBadWordsLogitsProcessor` bans a several-token word's last token); "assistant" after a newline is
then spelled `as`+`sistant`, not SmolLM2's `ass`+`istant`. Words are runs of `\\w` characters (regex
`\\b`): "class" and "Scunthorpe" are never banned by "ass" or "cunt".
"""

from __future__ import annotations

import re
import weakref
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import LogitsProcessor

from calibfuse.methods import Method
from calibfuse.utils.files import sha256_json

PROFANITY_CHECK_LEXICON = "embedded:profanity_check"
# What the filter bans, in the cell key: 1 was `" " + word` token ids (leaky); 2 is whole words in the decoded text.
RULE = 2
WORD_RUN = re.compile(r"\w+")
TRAILING_RUN = re.compile(r"\w*\Z")


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
    not_words = [w for w in words if not WORD_RUN.fullmatch(w)]
    if not_words:
        raise ValueError(f"lexicon {source!r} has entries that are not single words (letters, digits, _): {not_words[:5]}")
    return words[:size] if size else words


_TOKEN_TEXTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def token_texts(tokenizer) -> list[str]:
    """What decoding adds to a text for each token id: decode([a, id]) minus decode([a]) (decoders drop a
    leading space at a text's start, not after a prefix); special tokens add nothing (continuations are
    decoded with skip_special_tokens) and a lone byte of a multi-byte character adds U+FFFD. One pass over
    the vocabulary per tokenizer, cached (Gemma-3's 262,144 tokens: 2-3 s of CPU)."""
    if tokenizer in _TOKEN_TEXTS:
        return _TOKEN_TEXTS[tokenizer]
    prefix = tokenizer.encode("a", add_special_tokens=False)
    head = tokenizer.decode(prefix, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    decoded = tokenizer.batch_decode([prefix + [i] for i in range(len(tokenizer))], skip_special_tokens=True, clean_up_tokenization_spaces=False)
    texts = [text[len(head) :] if text.startswith(head) else text for text in decoded]
    _TOKEN_TEXTS[tokenizer] = texts
    return texts


@dataclass
class LexiconIndex:
    """Which tokens end a lexicon word, by what the continuation so far ends with. Words are lower case; a
    token's word runs are compared lower-cased, so every letter case is banned."""

    texts: list[str]  # each token's text (token_texts)
    within: torch.Tensor  # ids holding a word that starts after a non-word character inside them: banned everywhere
    leading: torch.Tensor  # ids whose text starts with a word: banned at a boundary (the start, or a non-word last character)
    completing: dict[str, torch.Tensor]  # a word's proper prefix p -> ids whose leading word run r makes p + r a word
    _on_device: dict = field(default_factory=dict)

    @classmethod
    def build(cls, tokenizer, words: list[str]) -> LexiconIndex:
        texts, lexicon = token_texts(tokenizer), {w.lower() for w in words}
        rests = defaultdict(set)  # proper prefix -> the rests that make it a word
        for word in lexicon:
            for cut in range(1, len(word)):
                rests[word[:cut]].add(word[cut:])
        all_rests = set().union(*rests.values()) if rests else set()
        within, leading = set(), set()
        starting = defaultdict(list)  # a rest -> ids whose text starts with it as a whole run
        for i, text in enumerate(texts):
            for run in WORD_RUN.finditer(text):  # maximal runs: one at position > 0 follows a non-word character
                word = run.group().lower()
                if word in lexicon:
                    (within if run.start() > 0 else leading).add(i)
                if run.start() == 0 and word in all_rests:
                    starting[word].append(i)
        completing = {p: _ids(i for r in rs for i in starting.get(r, ())) for p, rs in rests.items()}
        return cls(texts, _ids(within), _ids(leading), completing)

    def ids(self, device, width: int, kind: str, prefix: str = "") -> torch.Tensor:
        """`within`, `leading` or a prefix's `completing` ids on `device`, below the logits' width. Id lists,
        not vocabulary masks: a step costs O(rows x banned ids), not O(rows x vocabulary)."""
        key = (str(device), width, kind, prefix)
        if key not in self._on_device:
            ids = self.completing[prefix] if kind == "completing" else getattr(self, kind)
            self._on_device[key] = ids[ids < width].to(device)
        return self._on_device[key]


def _ids(found) -> torch.Tensor:
    return torch.tensor(sorted(found), dtype=torch.long)


class WholeWordFilter(LogitsProcessor):
    """Bans, per row and step, every token that would end a lexicon word starting at a word boundary.

    Per row it keeps the continuation's trailing word run: "" at a boundary (the start, or after a
    non-word character), a word's proper prefix that started at a boundary (then only the tokens that
    complete that word are banned), or None (no word can end here). Reading the newest tokens costs one
    host copy per step, as for any method that reads text. The scores are changed in place."""

    def __init__(self, index: LexiconIndex):
        self.index, self.width, self.runs, self.seen = index, None, [], 0

    def start(self, state) -> None:
        """A new batch: its continuations start after the prompts' (padded) width."""
        self.width, self.runs, self.seen = state.input_ids.shape[1], [""] * len(state.input_ids), 0

    def advance(self, new_ids: list[int]) -> None:
        for row, token in enumerate(new_ids):
            text, run = self.index.texts[token] if token < len(self.index.texts) else "", self.runs[row]
            if not text:
                continue  # a special token: the decoded continuation skips it
            trailing = TRAILING_RUN.search(text)
            run = (None if run is None else run + text.lower()) if trailing.start() == 0 else trailing.group().lower()
            self.runs[row] = run if run == "" or run in self.index.completing else None

    @torch.no_grad()
    def __call__(self, input_ids, scores):
        if self.width is None:
            raise RuntimeError("WholeWordFilter needs start(state) from calibfuse's decode loop before its first step")
        for step in range(self.seen, input_ids.shape[1] - self.width):
            self.advance(input_ids[:, self.width + step].tolist())
        self.seen = input_ids.shape[1] - self.width
        width, device = scores.shape[-1], scores.device
        scores[:, self.index.ids(device, width, "within")] = float("-inf")
        at_boundary = [row for row, run in enumerate(self.runs) if run == ""]
        if at_boundary:
            scores[torch.tensor(at_boundary, device=device)[:, None], self.index.ids(device, width, "leading")] = float("-inf")
        for row, run in enumerate(self.runs):
            if run:
                scores[row, self.index.ids(device, width, "completing", run)] = float("-inf")
        return scores


_INDEXES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def lexicon_index(tokenizer, words: list[str]) -> LexiconIndex:
    """The index of `words` for `tokenizer`, built once per tokenizer and lexicon."""
    key = tuple(sorted({w.lower() for w in words}))
    per_tokenizer = _INDEXES.setdefault(tokenizer, {})
    if key not in per_tokenizer:
        per_tokenizer[key] = LexiconIndex.build(tokenizer, list(key))
    return per_tokenizer[key]


class WordFilter(Method):
    role = "baseline"

    def __init__(self, lexicon: str = PROFANITY_CHECK_LEXICON, size: int = 300):
        self.lexicon, self.size = lexicon, size
        self.words: list[str] = []
        self.index: LexiconIndex | None = None

    def prepare(self, targets) -> None:
        self.words = read_lexicon(self.lexicon, self.size)

    def identity(self, target: str, alpha: float) -> dict:
        return {"lexicon": sha256_json(self.words), "words": len(self.words), "rule": RULE}

    def bind(self, target, target_lm, models) -> None:
        self.index = lexicon_index(target_lm.tokenizer, self.words)

    def logits_processors(self, alpha: float) -> list:
        return [WholeWordFilter(self.index)]
