"""Fluency: a reference LM's loss on each continuation given its prompt (paper: Llama-2-13B in fp16;
embedded default: Gemma-3-270M). Batched, right-padded; the prompt positions carry no loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from calibfuse.data import IGNORE_INDEX, collate
from calibfuse.models import ModelSpec, as_spec, load_model, load_tokenizer


class ReferenceLM:
    def __init__(self, spec: ModelSpec | dict | str, batch_size: int = 16, max_length: int = 1024):
        self.spec = as_spec(spec)
        self.model, self.tokenizer = load_model(self.spec), load_tokenizer(self.spec)
        self.batch_size, self.max_length = batch_size, max_length
        self.device = next(self.model.parameters()).device

    def _example(self, prompt: str, continuation: str) -> dict:
        prompt_ids = self.tokenizer(prompt, add_special_tokens=True)["input_ids"]
        continuation_ids = self.tokenizer(continuation, add_special_tokens=False)["input_ids"]
        prompt_ids = prompt_ids[-max(1, self.max_length - len(continuation_ids)):]  # keep the prompt's end
        return {"input_ids": prompt_ids + continuation_ids, "labels": [IGNORE_INDEX] * len(prompt_ids) + continuation_ids}

    @torch.no_grad()
    def sample_losses(self, prompts: list[str], continuations: list[str]) -> list[float | None]:
        """Mean token loss of each continuation given its prompt; None for an empty continuation."""
        if len(prompts) != len(continuations):
            raise ValueError(f"{len(prompts)} prompts but {len(continuations)} continuations; expected one each")
        losses: list[float | None] = [None] * len(prompts)
        todo = [i for i, c in enumerate(continuations) if c.strip()]
        for start in range(0, len(todo), self.batch_size):
            rows = todo[start:start + self.batch_size]
            batch = collate([self._example(prompts[i], continuations[i]) for i in rows], self.tokenizer.pad_token_id)
            batch = {k: v.to(self.device) for k, v in batch.items()}
            logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
            labels = batch["labels"][:, 1:]
            token_losses = F.cross_entropy(logits[:, :-1].transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none")
            counts = (labels != IGNORE_INDEX).sum(dim=1)
            for row, total, count in zip(rows, token_losses.sum(dim=1).tolist(), counts.tolist()):
                losses[row] = total / count if count else None
        return losses
