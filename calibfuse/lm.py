"""Small helpers on any Hugging Face causal LM, shared by decoding, fusion, baselines and scoring:
the final hidden state (after the final norm), the LM head with the model's own logit
post-processing, and position ids for left-padded or masked sequences."""

from __future__ import annotations

import functools
import inspect

import torch


@functools.lru_cache(maxsize=None)
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
    """The model's own LM head on final hidden states, with its logit soft-capping if it has one."""
    logits = model.get_output_embeddings()(hidden)
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Position ids that skip padding and masked-out slots: what a left-padded sequence would have alone."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def same_tokenizer(a, b) -> bool:
    return a is b or (len(a) == len(b) and a.get_vocab() == b.get_vocab() and a.bos_token_id == b.bos_token_id)
