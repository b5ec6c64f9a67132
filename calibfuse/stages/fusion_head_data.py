"""The fusion head's text (calibfuse.fusion_head): stage 1's non-toxic corpus as plain text, split into a
seeded held-out slice and the rest, and optionally toxic rows whose completions the head is pushed away from."""

from __future__ import annotations

import random

import lightning as L
from torch.utils.data import DataLoader

from calibfuse.data.resumable import shuffled_loader


class TextData(L.LightningDataModule):
    """Stage 1's corpus as plain text (prompt, newline, completion): a seeded held-out slice and the rest.
    With toxic rows ((text, completion start) pairs), each training batch also carries a batch of them."""

    def __init__(self, texts: list[str], val_rows: int, batch_size: int, seed: int, toxic: list[tuple[str, int]] | None = None):
        super().__init__()
        if len(texts) <= val_rows:
            raise ValueError(f"the corpus has {len(texts)} rows; expected more than val_rows={val_rows}")
        order = list(range(len(texts)))
        random.Random(seed).shuffle(order)
        self.val = [texts[i] for i in order[:val_rows]]
        self.train = [texts[i] for i in order[val_rows:]]
        self.toxic_train = self.toxic_val = None
        if toxic:
            if len(toxic) <= val_rows:
                raise ValueError(f"the toxic data has {len(toxic)} rows; expected more than val_rows={val_rows}")
            toxic = random.Random(seed + 1).sample(toxic, len(toxic))
            self.toxic_val, self.toxic_train = toxic[:val_rows], toxic[val_rows:]
        self.batch_size = batch_size

    def train_dataloader(self):
        clean = shuffled_loader(self.train, batch_size=self.batch_size, collate_fn=list)  # resumable mid-epoch
        if self.toxic_train is None:
            return clean
        toxic = shuffled_loader(self.toxic_train, batch_size=self.batch_size, collate_fn=unzip)
        return {"clean": clean, "toxic": toxic}  # Lightning cycles the shorter one

    def val_dataloader(self):
        return DataLoader(self.val, batch_size=self.batch_size, collate_fn=list)


def unzip(rows: list[tuple[str, int]]) -> tuple[list[str], list[int]]:
    return [text for text, _ in rows], [start for _, start in rows]


def toxic_rows(pairs) -> list[tuple[str, int]]:
    """Toxic prompt/completion rows as one text each, the completion continuing the prompt's sentence,
    and the character where the completion starts."""
    rows = []
    for p in pairs:
        context = p.prompt if not p.prompt or p.prompt[-1].isspace() else p.prompt + " "
        rows.append((context + p.completion, len(context)))
    return rows
