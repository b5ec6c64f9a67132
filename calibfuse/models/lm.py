"""Small helpers on any Hugging Face causal LM, shared by decoding, fusion, baselines and scoring:
the final hidden state (after the final norm), the LM head with the model's own logit
post-processing, and position ids for left-padded or masked sequences."""

from __future__ import annotations

import functools
import inspect

import torch

IGNORE_INDEX = -100  # label value that the loss skips (prompt and padding positions)


@functools.cache
def _cache_argument(forward) -> str:
    # transformers renamed the cache argument (past_key_values -> cache) during 5.x; speak both.
    # Looked up once per model class, not on every forward.
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"


def final_hidden(model, use_cache: bool, past_key_values=None, **inputs):
    """The last hidden state after the final norm (HF's hidden_states[-1]) and, if asked, the KV cache."""
    base = model.base_model
    if past_key_values is not None:
        inputs[_cache_argument(type(base).forward)] = past_key_values
    out = base(**inputs, use_cache=use_cache)
    if not use_cache:
        return out.last_hidden_state, None
    cache = getattr(out, "cache", None)
    return out.last_hidden_state, cache if cache is not None else out.past_key_values


def lm_head_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """The model's own LM head on final hidden states, with the logit post-processing of its family:
    soft-capping (Gemma-2/3), a multiplier (Cohere's logit_scale) or a divisor (Granite's logits_scaling)."""
    logits = model.get_output_embeddings()(hidden)
    config = model.config
    if getattr(config, "logit_scale", None):
        logits = logits * config.logit_scale
    if getattr(config, "logits_scaling", None):
        logits = logits / config.logits_scaling
    cap = getattr(config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


@torch.no_grad()
def check_head(model, tokenizer) -> None:
    """Refuse a model whose logits are not lm_head_logits(final hidden state): its family post-processes
    logits in a way calibfuse does not reproduce, and fused or steered logits would be wrong. One short
    forward pass on a probe text."""
    ids = torch.tensor([tokenizer("The quick brown fox")["input_ids"][:8]], device=next(model.parameters()).device)
    hidden, _ = final_hidden(model, input_ids=ids, use_cache=False)
    ours, theirs = lm_head_logits(model, hidden).float(), model(input_ids=ids).logits.float()
    if not torch.allclose(ours, theirs, rtol=1e-3, atol=1e-3 * float(theirs.abs().max())):
        raise ValueError(
            f"{type(model).__name__} computes its logits differently from its LM head on the final hidden state "
            f"(max difference {float((ours - theirs).abs().max()):.3g}); calibfuse handles soft-capping, logit_scale "
            "and logits_scaling; expected a causal LM whose logits are lm_head(final hidden state)"
        )


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Position ids that skip padding and masked-out slots: what a left-padded sequence would have alone."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def same_tokenizer(a, b) -> bool:
    return a is b or (len(a) == len(b) and a.get_vocab() == b.get_vocab() and a.bos_token_id == b.bos_token_id)


def collate(examples: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch; padded positions are masked out of attention and loss."""
    length = max(len(e["input_ids"]) for e in examples)
    input_ids = torch.full((len(examples), length), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), length), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        input_ids[i, :n] = torch.tensor(e["input_ids"])
        labels[i, :n] = torch.tensor(e["labels"])
        attention_mask[i, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
