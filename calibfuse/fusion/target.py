"""A target LM ready to decode: its model, tokenizer, stop tokens, prompt format and context length.

Prompts are checked against the context before the first batch: a prompt that leaves no room for
`max_new_tokens` is refused (the default) or, with `long_prompts: truncate_left`, keeps its last tokens.
"""

from __future__ import annotations

import logging

import torch

from calibfuse.fusion.decoding import PROMPT_FORMATS, Generation, GenerationSettings, decode, row_generators
from calibfuse.models.lm import check_head

log = logging.getLogger(__name__)

# Context lengths above this are tokenizers' "no limit" sentinels (e.g. 1e30), not limits.
NO_LIMIT = 10_000_000


def context_length(model, tokenizer=None) -> int | None:
    """The longest sequence the model takes: its config's position limit, else the tokenizer's."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and 0 < value < NO_LIMIT:
            return value
    value = getattr(tokenizer, "model_max_length", None)
    return value if isinstance(value, int) and 0 < value < NO_LIMIT else None


class TargetLM:
    """A target LM ready to decode: model, tokenizer, stop tokens and how prompts are formatted."""

    def __init__(self, model, tokenizer, prompt_format: str = "raw", name: str | None = None):
        if prompt_format not in PROMPT_FORMATS:
            raise ValueError(f"prompt_format={prompt_format!r}; expected one of {list(PROMPT_FORMATS)}")
        if prompt_format == "chat" and not getattr(tokenizer, "chat_template", None):
            raise ValueError("prompt_format='chat' but the target's tokenizer has no chat template; use prompt_format='raw'")
        self.model, self.tokenizer, self.prompt_format = model.eval(), tokenizer, prompt_format
        check_head(model, tokenizer)  # a family with other logit post-processing is refused, not silently wrong
        eos = {tokenizer.eos_token_id}
        configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)  # stop tokens only
        eos |= set(configured if isinstance(configured, list) else [configured])
        self.eos_ids = torch.tensor(sorted(i for i in eos if i is not None), device=self.device)
        self.context_length = context_length(model, tokenizer)
        self.name = name or getattr(model.config, "name_or_path", "") or type(model).__name__

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device) -> TargetLM:
        self.model.to(device)
        self.eos_ids = self.eos_ids.to(device)
        return self

    def prompt_ids(self, prompts: list[str], prompt_format: str | None = None) -> list[list[int]]:
        if (prompt_format or self.prompt_format) == "chat":
            texts = [self.tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True) for p in prompts]
            return self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        return self.tokenizer(prompts, add_special_tokens=True)["input_ids"]

    def fit_context(self, prompt_ids: list[list[int]], settings: GenerationSettings, names: list[str] | None = None) -> list[list[int]]:
        """Every prompt with room for max_new_tokens in the context: refused (naming the first by its id in
        `names`, else its position), or cut from the left."""
        if self.context_length is None:
            return prompt_ids
        room = self.context_length - settings.max_new_tokens
        if room < 1:
            raise ValueError(f"max_new_tokens={settings.max_new_tokens} leaves no room for a prompt in {self.name}'s context of {self.context_length} tokens")
        long = [i for i, ids in enumerate(prompt_ids) if len(ids) > room]
        if not long:
            return prompt_ids
        if settings.long_prompts == "refuse":
            raise ValueError(
                f"{len(long)} of {len(prompt_ids)} prompts are too long for {self.name}: prompt {names[long[0]] if names else long[0]!r} has "
                f"{len(prompt_ids[long[0]])} tokens, and its context of {self.context_length} tokens holds at most {room} "
                f"with max_new_tokens={settings.max_new_tokens}; shorten them, or keep their last {room} tokens with "
                "long_prompts=truncate_left (protocol.generation.long_prompts in the grid)"
            )
        bos = self.tokenizer.bos_token_id
        log.warning("%d of %d prompts keep only their last %d tokens (long_prompts=truncate_left)", len(long), len(prompt_ids), room)
        fitted = list(prompt_ids)
        for i in long:  # a leading BOS stays: the model was trained with it
            ids = prompt_ids[i]
            fitted[i] = [ids[0], *ids[len(ids) - room + 1 :]] if bos is not None and ids[0] == bos else ids[len(ids) - room :]
        return fitted

    def generate(
        self,
        prompts: list[str],
        settings: GenerationSettings,
        *,
        alpha: float = 0.0,
        prompt_format: str | None = None,
        hidden_transform=None,
        processors=(),
        use_cache: bool = True,
        seeds: list[int] | None = None,
        diagnostics: bool = False,
        names: list[str] | None = None,
    ) -> list[Generation]:
        """One Generation per (prompt, sample), in batches of settings.batch_size rows. Sample s of prompt i
        draws with its own seed, from `seeds[i]` (default settings.seed + i) and s: batching never changes it.
        `names`: the prompts' ids, which name a prompt too long for the context."""
        if isinstance(prompts, str) or len(prompts) == 0:
            raise ValueError(f"prompts must be a non-empty list of strings; got {prompts!r}")
        prompt_ids = self.fit_context(self.prompt_ids(list(prompts), prompt_format), settings, names)
        seeds = seeds if seeds is not None else [settings.seed + i for i in range(len(prompts))]
        jobs = [(i, s) for i in range(len(prompts)) for s in range(settings.num_samples)]
        rows = []
        for start in range(0, len(jobs), settings.batch_size):
            chunk = jobs[start : start + settings.batch_size]
            generators = row_generators([seeds[i] * 1_000_003 + s for i, s in chunk], self.device)
            stats: dict = {"diagnostics": diagnostics}
            outputs = decode(
                self.model,
                self.tokenizer,
                [prompt_ids[i] for i, _ in chunk],
                settings,
                generators,
                eos_ids=self.eos_ids,
                hidden_transform=hidden_transform,
                processors=processors,
                use_cache=use_cache,
                stats=stats,
            )
            rows += [
                Generation(
                    prompt=prompts[i],
                    alpha=alpha,
                    sample=s,
                    continuation=self.tokenizer.decode(new, skip_special_tokens=True),
                    prompt_tokens=len(prompt_ids[i]),
                    new_tokens=len(new),
                    token_ids=new,
                    ended_with_eos=eos,
                    kl=kl,
                    agreement=agree,
                )
                for (i, s), new, eos, kl, agree in zip(
                    chunk, outputs, stats["ended_with_eos"], stats.get("kl", [None] * len(chunk)), stats.get("agreement", [None] * len(chunk)), strict=True
                )
            ]
        return rows
