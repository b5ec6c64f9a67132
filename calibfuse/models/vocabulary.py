"""The shared vocabulary of two tokenizers: the tokens whose embeddings stage 2 aligns.

`exact` is the reference implementation's rule: equal raw token strings. It nearly fails across
tokenizer families, whose strings mark a leading space differently (`Ġthe` in byte-level BPE,
`▁the` in SentencePiece). `normalized` (the default) compares decoded surface forms instead: what
the token adds to a text, leading space included. Special tokens never take part.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MATCHING = ("normalized", "exact")


def special_token_ids(tokenizer) -> set[int]:
    ids = set(tokenizer.all_special_ids)
    ids |= {i for i, token in getattr(tokenizer, "added_tokens_decoder", {}).items() if token.special}
    return ids


def raw_forms(tokenizer) -> dict[str, int]:
    """Raw token string -> id (the reference's matching key), special tokens excluded."""
    specials = special_token_ids(tokenizer)
    return {token: i for token, i in tokenizer.get_vocab().items() if i not in specials}


def surface_forms(tokenizer) -> dict[str, int]:
    """Decoded surface form -> lowest id with that form, special tokens and partial bytes excluded.

    A token's surface form is what decoding adds after a fixed prefix: decode(prefix + [id]) minus
    decode(prefix). Decoders drop a leading space at the start of a text; after the prefix they
    keep it, the same way in every tokenizer family.
    """
    specials = special_token_ids(tokenizer)
    prefix = tokenizer.encode("a", add_special_tokens=False)
    head = tokenizer.decode(prefix, clean_up_tokenization_spaces=False)
    ids = [i for i in range(len(tokenizer)) if i not in specials]
    decoded = tokenizer.batch_decode([prefix + [i] for i in ids], clean_up_tokenization_spaces=False)
    forms: dict[str, int] = {}
    for i, text in zip(ids, decoded, strict=True):
        if not text.startswith(head):
            continue
        form = text[len(head) :]
        # Empty forms and lone bytes of a multi-byte character (decoded as U+FFFD) name no surface text.
        if form and "\ufffd" not in form:
            forms.setdefault(form, i)
    return forms


@dataclass
class SharedVocabulary:
    """Matched token pairs: calibration_ids[k] and target_ids[k] are the same token `forms[k]`."""

    calibration_ids: torch.Tensor
    target_ids: torch.Tensor
    forms: list[str]
    matching: str
    counts: dict[str, int]  # shared tokens under each matching rule

    def __len__(self) -> int:
        return len(self.forms)


def shared_vocabulary(calibration_tokenizer, target_tokenizer, matching: str = "normalized") -> SharedVocabulary:
    """Tokens both tokenizers have, matched by `matching`, in calibration-id order; counts of both rules."""
    if matching not in MATCHING:
        raise ValueError(f"matching={matching!r}; expected one of {list(MATCHING)}")
    keyed = {
        "exact": (raw_forms(calibration_tokenizer), raw_forms(target_tokenizer)),
        "normalized": (surface_forms(calibration_tokenizer), surface_forms(target_tokenizer)),
    }
    counts = {rule: len(a.keys() & b.keys()) for rule, (a, b) in keyed.items()}
    calibration, target = keyed[matching]
    forms = sorted(calibration.keys() & target.keys(), key=calibration.__getitem__)
    if not forms:
        raise ValueError(
            f"the calibration tokenizer ({len(calibration_tokenizer)} tokens) and the target tokenizer "
            f"({len(target_tokenizer)} tokens) share no tokens under matching={matching!r} "
            f"(shared counts: {counts}); expected at least one"
        )
    return SharedVocabulary(
        calibration_ids=torch.tensor([calibration[f] for f in forms]),
        target_ids=torch.tensor([target[f] for f in forms]),
        forms=forms,
        matching=matching,
        counts=counts,
    )
