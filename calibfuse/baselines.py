"""Baselines that run through the same grid as fusion (METHOD.md, "Peer methods").

- `none`: the target alone (fusion at alpha = 0; the cells are shared with fusion's alpha = 0).
- `word_filter`: the tokens of a profanity lexicon are banned at every step, per target tokenizer.
- `prompting`: a respectful-continuation instruction before the prompt (chat template if asked).
- `dexperts`: logits z_target + alpha * (z_expert - z_antiexpert), with an expert and an
  anti-expert LM that share the target's tokenizer (Liu et al., 2021).

The default lexicon is the `lexicon_size` words that alt-profanity-check's linear model weighs most
towards "offensive". Scored by that same model, word filtering is flattered (it removes exactly
the words the scorer looks for); a scorer such as Detoxify or Perspective does not share that bias.
"""

from __future__ import annotations

from pathlib import Path

import torch

from calibfuse.fusion import (
    final_hidden,
    lm_head_logits,
    positions_from_mask,
    same_tokenizer,
)

METHODS = ("fusion", "none", "word_filter", "prompting", "dexperts")
PROFANITY_CHECK_LEXICON = "embedded:profanity_check"
RESPECTFUL = "Continue the following text in a respectful, polite and non-toxic way.\n\n"


def check_method(name: str) -> str:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; expected one of {list(METHODS)}")
    return name


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


class WordFilter:
    """Bans a lexicon's words: a word that is one token (as a word-initial token, with its leading
    space, in lower, Capital and UPPER case) is never generated; a word of several tokens loses its
    last token whenever the tokens before it were just generated (transformers' bad_words_ids rule)."""

    def __init__(self, tokenizer, words: list[str]):
        singles, sequences = set(), set()
        for word in words:
            for form in {word.lower(), word.capitalize(), word.upper()}:
                ids = tokenizer(" " + form, add_special_tokens=False)["input_ids"]
                ids = ids[1:] if len(ids) > 1 and tokenizer.decode(ids[:1]).strip() == "" else ids  # a lone "▁" first
                (singles.add(ids[0]) if len(ids) == 1 else sequences.add(tuple(ids)))
        self.banned = torch.tensor(sorted(singles), dtype=torch.long)
        self.sequences = sorted(sequences)

    def reset(self, ids, mask) -> None:
        self.banned = self.banned.to(ids.device)

    def __call__(self, logits, step_ids, mask, generated: list[list[int]]):
        logits = logits.clone()
        logits[:, self.banned] = float("-inf")
        for row, tokens in enumerate(generated):
            for sequence in self.sequences:
                prefix = list(sequence[:-1])
                if len(tokens) >= len(prefix) and tokens[len(tokens) - len(prefix):] == prefix:
                    logits[row, sequence[-1]] = float("-inf")
        return logits


class DExperts:
    """z_target + alpha * (z_expert - z_antiexpert) at every step; the two experts keep their own KV caches."""

    def __init__(self, expert, anti_expert, target_tokenizer, expert_tokenizer, anti_expert_tokenizer, alpha: float = 0.0):
        for role, tokenizer in (("expert", expert_tokenizer), ("anti_expert", anti_expert_tokenizer)):
            if not same_tokenizer(target_tokenizer, tokenizer):
                raise ValueError(f"dexperts: the {role}'s tokenizer ({len(tokenizer)} tokens) differs from the target's "
                                 f"({len(target_tokenizer)} tokens); expected experts that share the target's tokenizer")
        self.expert, self.anti_expert, self.alpha = expert.eval(), anti_expert.eval(), alpha
        self.caches = [None, None]

    def to(self, device) -> DExperts:
        self.expert.to(device)
        self.anti_expert.to(device)
        return self

    def reset(self, ids, mask) -> None:
        self.caches = [None, None]

    @torch.no_grad()
    def __call__(self, logits, step_ids, mask, generated):
        if self.alpha == 0:
            return logits  # the target alone, exactly
        positions = positions_from_mask(mask)[:, -step_ids.shape[1]:]
        expert_logits = []
        for i, model in enumerate((self.expert, self.anti_expert)):
            hidden, self.caches[i] = final_hidden(model, input_ids=step_ids, attention_mask=mask, position_ids=positions,
                                                  past_key_values=self.caches[i], use_cache=True)
            expert_logits.append(lm_head_logits(model, hidden[:, -1]).float())
        width = min(logits.shape[-1], expert_logits[0].shape[-1], expert_logits[1].shape[-1])  # padded vocab rows
        steered = logits.clone()
        steered[:, :width] += self.alpha * (expert_logits[0][:, :width] - expert_logits[1][:, :width])
        return steered
