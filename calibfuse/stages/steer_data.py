"""LM-Steer's labelled text (calibfuse.steer): stage 1's non-toxic corpus (steer value +1) and toxic text
(-1), each split into training and held-out rows, read as token ids of the target's tokenizer. Every
training batch holds as many rows of each class (balanced sampling: the smaller class is cycled)."""

from __future__ import annotations

import random

import lightning as L
from torch.utils.data import DataLoader

from calibfuse.data.datamodule import encode_many, read_prompt_completions
from calibfuse.data.resumable import shuffled_loader
from calibfuse.stages.fusion_head_data import toxic_rows


def clean_split(data, tokenizer) -> tuple[list[list[int]], list[list[int]], dict]:
    """Stage 1's rows as its data module splits them (PromptCompletionDataModule.setup: one row per
    completion, a shuffle seeded by data.seed, rows that data.max_length leaves without a completion token
    dropped, the first data.val_fraction held out), each `prompt\\n completion EOS` as stage 1 reads it. With
    stage 1's seed, max_length and tokenizer these are exactly its training and held-out rows."""
    pairs = read_prompt_completions(**data.source)
    first: dict = {}
    for pair in pairs:
        first.setdefault(" ".join(pair.completion.split()), pair)
    rows = list(first.values())
    random.Random(data.seed).shuffle(rows)
    if data.max_examples is not None:
        rows = rows[: data.max_examples]
    examples = [e["input_ids"] for e in encode_many(tokenizer, rows, data.max_length, data.tokenization) if e is not None]
    if len(examples) < 2:
        raise ValueError(f"{len(examples)} usable non-toxic row(s) in {data.source['path']!r}; expected at least 2 (training and held-out)")
    held_out = min(max(1, round(len(examples) * data.val_fraction)), len(examples) - 1)
    return examples[held_out:], examples[:held_out], {"source": data.source["path"], "rows": len(rows), "seed": data.seed}


def toxic_split(data, tokenizer, max_length: int) -> tuple[list[list[int]], list[list[int]], dict]:
    """Toxic prompt/completion rows as one sentence each (the completion continues the prompt), with EOS as
    the clean rows have it (so an ending is no class feature); a seeded toxic_data.val_fraction held out."""
    texts = [text for text, _ in toxic_rows(read_prompt_completions(**data.source))]
    texts = list(dict.fromkeys(texts))
    random.Random(data.seed).shuffle(texts)
    if data.max_examples is not None:
        texts = texts[: data.max_examples]
    ids = [row[: max_length - 1] + [tokenizer.eos_token_id] for row in tokenizer(texts, add_special_tokens=True)["input_ids"]]
    if len(ids) < 2:
        raise ValueError(f"{len(ids)} toxic row(s) in {data.source['path']!r}; expected at least 2 (training and held-out)")
    held_out = min(max(1, round(len(ids) * data.val_fraction)), len(ids) - 1)
    return ids[held_out:], ids[:held_out], {"source": data.source["path"], "rows": len(ids), "seed": data.seed}


class SteerData(L.LightningDataModule):
    """Training batches {"clean": ids, "toxic": ids} of batch_size rows each (Lightning cycles the shorter
    loader), from the first train_rows of each class's (shuffled) training split; held-out loaders per
    class in the order given (clean first: calibfuse.stages.steer.CLASSES), capped at val_rows each."""

    def __init__(self, train: dict[str, list], val: dict[str, list], batch_size: int, max_length: int, val_rows: int | None = None, train_rows=None):
        super().__init__()
        self.train = {c: [ids[:max_length] for ids in rows[:train_rows]] for c, rows in train.items()}
        self.val = {c: [ids[:max_length] for ids in rows[:val_rows]] for c, rows in val.items()}
        self.batch_size = batch_size

    def train_dataloader(self):
        return {c: shuffled_loader(self.train[c], batch_size=self.batch_size, collate_fn=list) for c in self.train}  # resumable mid-epoch

    def val_dataloader(self):
        return [DataLoader(self.val[c], batch_size=self.batch_size, collate_fn=list) for c in self.val]
