"""Fluency: a reference LM's loss on each continuation given its prompt (paper: Llama-2-13B in fp16;
embedded default: Gemma-3-270M). Batched, right-padded; the prompt positions carry no loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from calibfuse.models.lm import IGNORE_INDEX, check_head, collate, lm_head_logits
from calibfuse.models.loading import ModelSpec, as_spec, load_model, load_tokenizer
from calibfuse.models.positions import first_token_past, with_offsets


class ReferenceLM:
    def __init__(self, spec: ModelSpec | dict | str, batch_size: int = 16, max_length: int = 1024, model=None, tokenizer=None):
        """`model`/`tokenizer`: already loaded instances of `spec` (e.g. a target that is also the reference)."""
        self.spec = as_spec(spec)
        self.model = (model if model is not None else load_model(self.spec)).eval()
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(self.spec)
        self.batch_size, self.max_length = batch_size, max_length
        self._known: dict[tuple[str, str], float] = {}  # a grid repeats continuations (small alphas often change nothing)
        self.device = next(self.model.parameters()).device
        check_head(self.model, self.tokenizer)

    def to(self, device) -> ReferenceLM:
        self.model.to(device)
        self.device = torch.device(device)
        return self

    def _example(self, prompt: str, continuation: str) -> dict:
        """Prompt and continuation tokenized together, as the model reads them in context; the continuation's
        tokens are those that end past the prompt's last character (character offsets). Tokenized apart, a
        SentencePiece tokenizer (Llama-2, Gemma) would add a prefix token that in-context text never has."""
        encoded = with_offsets(self.tokenizer, prompt + continuation, add_special_tokens=True)
        ids = encoded["input_ids"]
        first = first_token_past(encoded["offset_mapping"], len(prompt))
        first = max(first, 1)  # position 0 is never predicted: the first token is context
        keep = max(1, self.max_length - (len(ids) - first))  # too long: keep the prompt's end
        ids, first = ids[max(0, first - keep) :][: self.max_length], min(first, keep)
        return {"input_ids": ids, "labels": [IGNORE_INDEX] * first + ids[first:]}

    @torch.no_grad()
    def sample_losses(self, prompts: list[str], continuations: list[str]) -> list[float | None]:
        """Mean token loss of each continuation given its prompt; None for an empty continuation."""
        if len(prompts) != len(continuations):
            raise ValueError(f"{len(prompts)} prompts but {len(continuations)} continuations; expected one each")
        todo = list(dict.fromkeys((p, c) for p, c in zip(prompts, continuations, strict=True) if c.strip() and (p, c) not in self._known))
        todo.sort(key=lambda pair: len(pair[0]) + len(pair[1]))  # similar lengths per batch: less padding to compute
        for start in range(0, len(todo), self.batch_size):
            pairs = todo[start : start + self.batch_size]
            batch = collate([self._example(p, c) for p, c in pairs], self.tokenizer.pad_token_id)
            batch = {k: v.to(self.device) for k, v in batch.items()}
            hidden = self.model.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
            labels = batch["labels"][:, 1:]
            scored = labels != IGNORE_INDEX  # the LM head only where a continuation token is predicted:
            logits = lm_head_logits(self.model, hidden[:, :-1][scored]).float()  # a 262k vocabulary makes full logits costly
            token_losses = torch.zeros(labels.shape, device=self.device)
            token_losses[scored] = F.cross_entropy(logits, labels[scored], reduction="none")
            for pair, total, count in zip(pairs, token_losses.sum(dim=1).tolist(), scored.sum(dim=1).tolist(), strict=True):
                if count:
                    self._known[pair] = total / count
        return [self._known.get((p, c)) if c.strip() else None for p, c in zip(prompts, continuations, strict=True)]
