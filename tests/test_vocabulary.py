"""Shared vocabulary: exact (reference) vs normalized (surface form) matching across tokenizer families."""

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from calibfuse.models.vocabulary import raw_forms, shared_vocabulary, surface_forms


@pytest.fixture
def byte_level(tiny_tokenizer_dir):
    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir)


@pytest.fixture
def metaspace(metaspace_tokenizer_dir):
    return AutoTokenizer.from_pretrained(metaspace_tokenizer_dir)


def test_surface_forms_unify_leading_space_marks(byte_level, metaspace):
    a, b = surface_forms(byte_level), surface_forms(metaspace)
    assert "Ġthe" in raw_forms(byte_level) and "▁the" in raw_forms(metaspace)
    assert " the" in a and " the" in b
    assert byte_level.convert_ids_to_tokens(a[" the"]) == "Ġthe"
    assert metaspace.convert_ids_to_tokens(b[" the"]) == "▁the"


def test_normalized_matching_finds_far_more_across_families(byte_level, metaspace):
    vocabulary = shared_vocabulary(byte_level, metaspace, "normalized")
    assert vocabulary.counts["normalized"] > vocabulary.counts["exact"] + 40  # every word with a leading space
    assert " the" in vocabulary.forms and "Ġthe" not in shared_vocabulary(byte_level, metaspace, "exact").forms
    assert len(vocabulary) == vocabulary.counts["normalized"]
    for form, i, j in zip(vocabulary.forms, vocabulary.calibration_ids.tolist(), vocabulary.target_ids.tolist(), strict=True):
        assert byte_level.decode([i]).strip() == metaspace.decode([j]).strip() == form.strip()


def test_exact_matching_is_the_reference_rule(byte_level, metaspace):
    """Every token string both vocabularies hold, special tokens aside: none missing, none extra."""
    vocabulary = shared_vocabulary(byte_level, metaspace, "exact")
    assert len(vocabulary) == vocabulary.counts["exact"]
    a, b = byte_level.get_vocab(), metaspace.get_vocab()
    specials = set(byte_level.all_special_tokens) | set(metaspace.all_special_tokens)
    expected = {(a[t], b[t]) for t in a.keys() & b.keys() if t not in specials}
    assert len(expected) > 20 and set(zip(vocabulary.calibration_ids.tolist(), vocabulary.target_ids.tolist(), strict=True)) == expected


def test_same_tokenizer_shares_everything_but_special_tokens(byte_level):
    vocabulary = shared_vocabulary(byte_level, byte_level, "exact")
    assert len(vocabulary) == len(byte_level) - 3
    assert vocabulary.calibration_ids.tolist() == vocabulary.target_ids.tolist()
    assert not set(vocabulary.calibration_ids.tolist()) & set(byte_level.all_special_ids)


def word_level(words):
    from tokenizers import Tokenizer, models, pre_tokenizers

    tokenizer = Tokenizer(models.WordLevel({"[UNK]": 0, **{w: i + 1 for i, w in enumerate(words)}}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]")


def test_no_shared_tokens_is_a_clear_error():
    with pytest.raises(ValueError, match=r"share no tokens under matching='normalized' \(shared counts: \{'exact': 0, 'normalized': 0\}\)"):
        shared_vocabulary(word_level(["alpha", "beta"]), word_level(["gamma", "delta"]))


def test_unknown_matching_rule():
    with pytest.raises(ValueError, match=r"matching='fuzzy'"):
        shared_vocabulary(word_level(["a"]), word_level(["a"]), "fuzzy")
