"""Teacher-forced scoring through any method: log p(continuation | context) under the method at a
strength, as lm-evaluation-harness's `loglikelihood` gives it for a plain LM: (sum of log-probs,
is_greedy), plus the number of continuation tokens.

It runs through the seams decode() runs through: the LM of `method.generator(target_lm, alpha)`, the
method's prompt, its `hidden_transform(alpha)` and `logits_processors(alpha)` (with their `start(state)`
hooks), the target's KV cache, one token per step. The forced tokens are fed instead of chosen ones, and
`state.generated` / `state.lengths` hold them, so a transform or processor that reads the text (fusion
across tokenizers, the word filter) reads the continuation so far, as in decoding.

Tokenization (lm-eval's `_encode_pair`): trailing whitespace of the context moves to the continuation;
context + continuation is encoded whole, and the continuation is what follows the context's own
encoding length; the model reads the context's own ids then those. The context is formatted as the
method prompts (its `prompt`, raw or the chat template); a context that encodes to no token (an empty
text, a tokenizer without BOS) is read after the BOS token, else EOS (lm-eval's rolling prefix).

A token a processor bans (the word filter's -inf) gives -inf: callers decide what that means
(calibfuse.evaluation.quality leaves such a text out of the perplexity and counts it).
"""

from __future__ import annotations

import torch
from transformers import LogitsProcessorList

from calibfuse.fusion.decoding import DecodeState, forward_step, left_pad
from calibfuse.models.lm import lm_head_logits


def generator_of(method, target_lm, alpha: float):
    """The LM that generates for `method` at `alpha`, as the grid's runner asks for it."""
    return method.generator(target_lm, alpha)


def encode_pairs(lm, contexts: list[str], continuations: list[str], prompt_format: str | None = None) -> list[tuple[list[int], list[int]]]:
    """(context ids, continuation ids) per row, lm-eval's way (module docstring)."""
    tokenizer, chat = lm.tokenizer, (prompt_format or lm.prompt_format) == "chat"
    pairs = []
    for context, continuation in zip(contexts, continuations, strict=True):
        if chat:  # the template's own ending (the assistant turn) stays in the context
            context = tokenizer.apply_chat_template([{"role": "user", "content": context}], tokenize=False, add_generation_prompt=True)
        else:
            stripped = context.rstrip()
            context, continuation = stripped, context[len(stripped) :] + continuation
        context_ids = tokenizer(context, add_special_tokens=not chat)["input_ids"]
        whole = tokenizer(context + continuation, add_special_tokens=not chat)["input_ids"]
        if not context_ids:
            prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
            context_ids = [prefix]
            whole = [prefix, *whole]
        pairs.append((context_ids, whole[len(context_ids) :]))
    return pairs


@torch.no_grad()
def forced_batch(model, tokenizer, prompt_ids: list[list[int]], forced_ids: list[list[int]], hidden_transform=None, processors=()) -> list[tuple[float, bool]]:
    """Per row: the sum of log p of its forced tokens, and whether each was the argmax. The decode loop's
    steps (calibfuse.fusion.decoding.decode) with the forced token fed at each step; a row whose forced
    tokens ran out feeds padding, masked out, as a finished row does in decoding."""
    device = next(model.parameters()).device
    ids, mask = left_pad(tokenizer, prompt_ids, device)
    rows, steps = len(ids), max(len(f) for f in forced_ids)
    forced = torch.full((rows, steps), tokenizer.pad_token_id, dtype=torch.long)
    live = torch.zeros((rows, steps), dtype=torch.bool)
    for row, tokens in enumerate(forced_ids):
        forced[row, : len(tokens)], live[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long), True
    forced, live = forced.to(device), live.to(device)
    empty = torch.zeros((rows, 0), dtype=torch.long, device=device)
    state = DecodeState(prompt_ids, ids, mask, ids, empty, torch.zeros(rows, dtype=torch.long, device=device), True)
    processors = LogitsProcessorList(processors)
    for hook in [hidden_transform, *processors]:
        if hasattr(hook, "start"):
            hook.start(state)
    total = torch.zeros(rows, dtype=torch.float64, device=device)
    greedy, cache = torch.ones(rows, dtype=torch.bool, device=device), None
    for step in range(steps):
        state.step = step
        h_target, cache = forward_step(model, state, cache)
        hidden = hidden_transform(h_target, state) if hidden_transform is not None else h_target
        logits = lm_head_logits(model, hidden).float()
        if processors:
            logits = processors(state.full_ids(), logits)
        token, alive = forced[:, step], live[:, step]
        logprob = logits.log_softmax(dim=-1).gather(1, token[:, None]).squeeze(1)
        total += torch.where(alive, logprob.double(), 0.0)
        greedy &= ~alive | (logits.argmax(dim=-1) == token)
        if step + 1 == steps:
            break
        state.generated = torch.cat([state.generated, token[:, None]], dim=1)
        state.lengths += alive.long()
        state.step_ids = token[:, None]
        state.attention_mask = torch.cat([state.attention_mask, alive.long()[:, None]], dim=1)
    return list(zip(total.tolist(), greedy.tolist(), strict=True))


@torch.no_grad()
def full_forward_batch(model, tokenizer, prompt_ids: list[list[int]], forced_ids: list[list[int]]) -> list[tuple[float, bool]]:
    """The same as forced_batch for the target alone, in one forward over context + continuation."""
    from calibfuse.models.lm import final_hidden, positions_from_mask

    device = next(model.parameters()).device
    ids, mask = left_pad(tokenizer, [p + f for p, f in zip(prompt_ids, forced_ids, strict=True)], device)
    hidden, _ = final_hidden(model, input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask), use_cache=False)
    width, results = ids.shape[1], []
    for row, tokens in enumerate(forced_ids):
        n = len(tokens)
        logits = lm_head_logits(model, hidden[row, width - n - 1 : width - 1]).float()  # the positions that predict the continuation
        target = torch.tensor(tokens, device=device)
        logprob = logits.log_softmax(dim=-1).gather(1, target[:, None]).double().sum()
        results.append((float(logprob), bool((logits.argmax(dim=-1) == target).all())))
    return results


def continuation_logprobs(
    target_lm, method, alpha: float, contexts: list[str], continuations: list[str], batch_size: int = 16, stepwise: bool | None = None
) -> list[tuple[float, int, bool]]:
    """Per row: (sum of log p(continuation tokens | context) under `method` at `alpha`, the number of
    continuation tokens, whether every continuation token was the argmax). An empty continuation gives
    (0.0, 0, True). `stepwise` None: one full forward where the method has no hidden transform and no
    processor (the target alone, or another LM alone: the same numbers to float error, much faster),
    else the decode loop's steps; True forces the steps, False the full forward."""
    if len(contexts) != len(continuations):
        raise ValueError(f"{len(contexts)} contexts but {len(continuations)} continuations; expected one each")
    lm = generator_of(method, target_lm, alpha)
    texts, prompt_format = method.prompt(list(contexts), lm)
    pairs = encode_pairs(lm, texts, list(continuations), prompt_format)
    if lm.context_length:  # too long: keep the context's end (lm-eval cuts from the left too)
        room = [lm.context_length - len(c) for _, c in pairs]
        if min(room) < 1:
            raise ValueError(f"a continuation of {max(len(c) for _, c in pairs)} tokens does not fit {lm.name}'s context of {lm.context_length}")
        pairs = [(p[max(0, len(p) - r) :], c) for (p, c), r in zip(pairs, room, strict=True)]
    results: list[tuple[float, int, bool]] = [(0.0, 0, True)] * len(pairs)
    order = sorted((i for i, (_, c) in enumerate(pairs) if c), key=lambda i: -len(pairs[i][0]) - len(pairs[i][1]))  # alike lengths per batch
    transform, processors = method.hidden_transform(alpha), method.logits_processors(alpha)
    full = (transform is None and not processors) if stepwise is None else not stepwise
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        prompts, forced = [pairs[i][0] for i in chunk], [pairs[i][1] for i in chunk]
        if full:
            scored = full_forward_batch(lm.model, lm.tokenizer, prompts, forced)
        else:  # as in decoding, one transform and processor list for every batch: start(state) resets them
            scored = forced_batch(lm.model, lm.tokenizer, prompts, forced, transform, processors)
        for i, (logprob, greedy) in zip(chunk, scored, strict=True):
            results[i] = (logprob, len(pairs[i][1]), greedy)
    return results
