"""The one rule for positions across tokenizers (character offsets), checked against what each token
spells, by hand, on the three embedded tokenizer families: SentencePiece with byte fallback and a BOS
(Gemma-3), byte-level BPE without one (SmolLM2, Qwen2.5)."""

import pytest
import torch

from calibfuse.models.loading import ModelSpec, load_tokenizer
from calibfuse.models.positions import first_token_past, matched_positions, with_offsets

FAMILIES = ["smollm2-135m-instruct", "gemma3-270m", "qwen2_5-coder-0_5b-instruct"]
TEXTS = [  # accents, emoji (byte fallback in Gemma-3), CJK, a word the boundary cuts, spaces at the seam
    ("Le café était", " déjà fermé 🙂 ce soir."),
    ("Emoji: 🤖🔥", "👍 and ok"),
    ("日本語の", "テキストです"),
    ("The unbeliev", "able story"),
    ("Spaces at the end  ", "  and the start"),
]


def test_matched_positions_by_hand():
    # text "ab cd": source tokens "ab", " c", "d" (+ padding); target tokens "a", "b c", "d"
    source = torch.tensor([[[0, 2], [2, 4], [4, 5], [0, 0]]])
    mask = torch.tensor([[1, 1, 1, 0]])
    target = torch.tensor([[[0, 1], [1, 4], [4, 5]]])
    assert matched_positions(source, mask, target).tolist() == [[0, 1, 2]]  # "a": nothing complete yet -> the first


def test_first_token_past_by_hand():
    offsets = [(0, 0), (0, 3), (3, 5), (5, 5), (5, 9)]  # BOS, "The", " c", an empty piece, "at s"
    assert first_token_past(offsets, 3) == 2
    assert first_token_past(offsets, 5) == 4  # the empty piece belongs to nothing
    assert first_token_past(offsets, 0) == 1  # BOS is always prefix
    assert first_token_past(offsets, 9) == 5


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_the_continuation_starts_where_its_characters_do(family):
    """The tokens from first_token_past decode to a text that ends the whole and covers every character
    after the prefix (a token that spans the seam belongs to the continuation)."""
    tokenizer = load_tokenizer(ModelSpec(family))
    for prefix, rest in TEXTS:
        encoded = with_offsets(tokenizer, prefix + rest, add_special_tokens=True)
        ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
        first = first_token_past(offsets, len(prefix))
        tail = tokenizer.decode(ids[first:], skip_special_tokens=True)
        head = tokenizer.decode(ids[:first], skip_special_tokens=True)
        assert head + tail == prefix + rest  # nothing lost or doubled at the seam
        assert len(tail) >= len(rest) and tail.endswith(rest), (family, prefix, tail)
        assert all(end <= len(prefix) for _, end in offsets[:first])  # every prefix token ends within the prefix


@pytest.mark.slow
@pytest.mark.parametrize("source_family,target_family", list(zip(FAMILIES, FAMILIES[1:] + FAMILIES[:1], strict=True)))  # each family as source and as target
def test_matched_calibration_token_ends_within_what_the_target_read(source_family, target_family):
    """For every target token, the matched source token is the last one whose characters all lie within
    the target's characters so far: the next source token, if any, ends past them."""
    source_tok, target_tok = load_tokenizer(ModelSpec(source_family)), load_tokenizer(ModelSpec(target_family))
    texts = [a + b for a, b in TEXTS]
    kwargs = dict(padding=True, padding_side="right", return_tensors="pt", add_special_tokens=True)
    s, t = with_offsets(source_tok, texts, **kwargs), with_offsets(target_tok, texts, **kwargs)
    index = matched_positions(s["offset_mapping"], s["attention_mask"], t["offset_mapping"])
    for row in range(len(texts)):
        ends = [int(e) for e, m in zip(s["offset_mapping"][row, :, 1], s["attention_mask"][row], strict=True) if m]
        for position in range(int(t["attention_mask"][row].sum())):
            read = int(t["offset_mapping"][row, position, 1])
            matched = int(index[row, position])
            assert ends[matched] <= read or matched == 0
            assert matched + 1 >= len(ends) or ends[matched + 1] > read
