"""The decode loop every method runs through: batched left-padded prompts, the target's KV cache,
greedy or sampled choice (transformers' temperature and top-p warpers), stop at EOS.

Methods plug in at two points and never edit the loop (nanochat's engine/model split):
- a *hidden transform* between the target's final norm and its LM head (fusion);
- *logits processors* after the head: `transformers.LogitsProcessor`s (the word filter bans what
  would end a lexicon word; DExperts runs two more LMs).
A transform or processor that needs the step's inputs (mask, newest tokens) has `start(state)`: it
gets the batch's `DecodeState`, which the loop updates in place every step.

The loop's bookkeeping stays on the device: one host copy per batch, at the end (and one per step
only for a transform or processor that must read the text, e.g. fusion across tokenizers, the word filter).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

from calibfuse.models.lm import final_hidden, lm_head_logits, positions_from_mask

PROMPT_FORMATS = ("raw", "chat")
LONG_PROMPTS = ("refuse", "truncate_left")


@dataclass
class GenerationSettings:
    """Every decoding choice, explicit: a checkpoint's generation_config never changes them."""

    max_new_tokens: int = 20
    do_sample: bool = False  # greedy unless True
    temperature: float = 1.0
    top_p: float = 1.0  # nucleus sampling: keep the smallest set of tokens with this much mass
    num_samples: int = 1  # continuations per prompt (with do_sample)
    seed: int = 2025
    batch_size: int = 16  # prompts x samples per forward pass
    long_prompts: str = "refuse"  # a prompt that leaves no room for max_new_tokens in the context: refuse | truncate_left

    def __post_init__(self):
        if self.long_prompts not in LONG_PROMPTS:
            raise ValueError(f"long_prompts={self.long_prompts!r}; expected one of {list(LONG_PROMPTS)}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens}; expected at least 1")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p}; expected 0 < top_p <= 1")
        if self.temperature <= 0:
            raise ValueError(f"temperature={self.temperature}; expected > 0 (use do_sample=false for greedy)")
        if self.num_samples > 1 and not self.do_sample:
            raise ValueError(f"num_samples={self.num_samples} with greedy decoding gives identical samples; set do_sample=true")

    def warpers(self) -> LogitsProcessorList:
        warpers = LogitsProcessorList()
        if self.do_sample and self.temperature != 1.0:
            warpers.append(TemperatureLogitsWarper(self.temperature))
        if self.do_sample and self.top_p < 1.0:
            warpers.append(TopPLogitsWarper(self.top_p))  # the top token always stays
        return warpers


@dataclass
class Generation:
    prompt: str
    alpha: float  # the method's strength (fusion's alpha; 0 for the target alone)
    sample: int
    continuation: str
    prompt_tokens: int
    new_tokens: int
    token_ids: list[int] = field(repr=False)
    ended_with_eos: bool = False
    kl: float | None = None  # with diagnostics: mean KL(method || target) of the next-token distributions per step
    agreement: float | None = None  # with diagnostics: share of its steps whose top token is the target's own


@dataclass
class DecodeState:
    """One batch in flight, updated in place by the loop; what transforms and processors may read."""

    prompt_ids: list[list[int]]
    input_ids: torch.Tensor  # (B, W): the left-padded prompts
    attention_mask: torch.Tensor  # (B, W + steps fed so far)
    step_ids: torch.Tensor  # what the target reads this step: the prompts, then the newest tokens
    generated: torch.Tensor  # (B, steps so far)
    lengths: torch.Tensor  # tokens each row generated before it stopped (its EOS included)
    use_cache: bool = True
    step: int = 0
    record: dict | None = None  # this step's trace entry, when tracing

    def full_ids(self) -> torch.Tensor:
        return torch.cat([self.input_ids, self.generated], dim=1)

    def sequences(self) -> list[list[int]]:
        """Each row's prompt and generated ids so far, on the host."""
        generated, lengths = self.generated.tolist(), self.lengths.tolist()
        return [p + g[:n] for p, g, n in zip(self.prompt_ids, generated, lengths, strict=True)]


def left_pad(tokenizer, prompt_ids: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    """The tokenizer's own left padding: every row's newest token is last."""
    batch = tokenizer.pad({"input_ids": prompt_ids}, padding=True, padding_side="left", return_tensors="pt")
    return batch["input_ids"].to(device), batch["attention_mask"].to(device)


def forward_step(model, state: DecodeState, cache):
    """A model's final hidden state at every row's newest position, cached or recomputed from scratch."""
    mask = state.attention_mask
    if state.use_cache:
        hidden, cache = final_hidden(
            model,
            input_ids=state.step_ids,
            attention_mask=mask,
            position_ids=positions_from_mask(mask)[:, -state.step_ids.shape[1] :],
            past_key_values=cache,
            use_cache=True,
        )
    else:  # the reference point of the cache tests
        hidden, _ = final_hidden(model, input_ids=state.full_ids(), attention_mask=mask, position_ids=positions_from_mask(mask), use_cache=False)
    return hidden[:, -1], cache


def choose(logits: torch.Tensor, settings: GenerationSettings, warpers: LogitsProcessorList, generators) -> torch.Tensor:
    """Greedy, or a draw per row from the warped distribution with that row's own generator (one
    generator for the whole batch is accepted too)."""
    if not settings.do_sample:
        return logits.argmax(dim=-1)
    probs = warpers(None, logits).softmax(dim=-1)
    if isinstance(generators, torch.Generator):
        return torch.multinomial(probs, 1, generator=generators).squeeze(-1)
    return torch.cat([torch.multinomial(probs[row : row + 1], 1, generator=g) for row, g in enumerate(generators)]).squeeze(-1)


def row_generators(seeds: list[int], device) -> list[torch.Generator]:
    """One generator per row, so a row's draws depend on its own seed only: not on its batch, its
    position in it, or how a run was resumed or sharded."""
    return [torch.Generator(device=device).manual_seed(seed % 2**63) for seed in seeds]


class Divergence:
    """Per row, over its generated steps: KL(method || target) of the next-token distributions, and how
    often the method's top token is the one the target alone would rank first. Zero and one for the
    target alone; a diagnostic of how far a method moves the target, step by step."""

    def __init__(self, rows: int, device):
        self.kl = torch.zeros(rows, device=device)
        self.agree = torch.zeros(rows, device=device)

    def update(self, base: torch.Tensor, logits: torch.Tensor, live: torch.Tensor) -> None:
        """`base`: the target's own next-token logits; `logits`: the method's, after its processors."""
        log_p, log_q = logits.log_softmax(dim=-1), base.log_softmax(dim=-1)
        kl = (log_p.exp() * (log_p - log_q)).nan_to_num_(0.0).sum(dim=-1)  # a banned token: p = 0, and 0 * -inf -> 0
        self.kl += kl * live
        self.agree += (logits.argmax(dim=-1) == base.argmax(dim=-1)).float() * live

    def result(self, lengths: torch.Tensor, changed: bool) -> dict:
        steps = lengths.clamp(min=1).float()
        if not changed:
            return {"kl": [0.0] * len(lengths), "agreement": [1.0] * len(lengths)}
        return {"kl": (self.kl / steps).tolist(), "agreement": (self.agree / steps).tolist()}


def _refuse_nonfinite(steps: list[int]) -> None:
    """`steps`: per row, the first step whose hidden state was not finite, or -1."""
    if any(k >= 0 for k in steps):
        row = next(r for r, k in enumerate(steps) if k >= 0)
        raise FloatingPointError(
            f"the hidden state before the LM head is not finite (NaN or inf) at generation step {steps[row]} of "
            f"batch row {row} ({sum(k >= 0 for k in steps)} of {len(steps)} rows); expected finite values: "
            "check the alignment A and the models' dtype"
        )


@torch.no_grad()
def decode(
    model,
    tokenizer,
    prompt_ids: list[list[int]],
    settings: GenerationSettings,
    generators,
    *,
    eos_ids: torch.Tensor,
    hidden_transform=None,
    processors=(),
    use_cache: bool = True,
    trace: list | None = None,
    stats: dict | None = None,
) -> list[list[int]]:
    """New token ids of every row (up to and including its EOS). `generators`: one per row (or one for all).
    `stats`, if given, receives per row `ended_with_eos` and, if it holds diagnostics=True, `kl` and `agreement`
    (see Divergence: one more LM-head projection per step)."""
    device, pad_id = eos_ids.device, tokenizer.pad_token_id
    ids, mask = left_pad(tokenizer, prompt_ids, device)
    state = DecodeState(
        prompt_ids,
        ids,
        mask,
        ids,
        torch.zeros((len(ids), 0), dtype=torch.long, device=device),
        torch.zeros(len(ids), dtype=torch.long, device=device),
        use_cache,
    )
    processors = LogitsProcessorList(processors)
    for hook in [hidden_transform, *processors]:
        if hasattr(hook, "start"):
            hook.start(state)
    warpers, finished, cache = settings.warpers(), torch.zeros(len(ids), dtype=torch.bool, device=device), None
    nonfinite_step = torch.full((len(ids),), -1, dtype=torch.long, device=device)
    changed = hidden_transform is not None or len(processors) > 0
    divergence = Divergence(len(ids), device) if stats is not None and stats.get("diagnostics") and changed else None
    for step in range(settings.max_new_tokens):
        state.step, state.record = step, {} if trace is not None else None
        h_target, cache = forward_step(model, state, cache)
        hidden = hidden_transform(h_target, state) if hidden_transform is not None else h_target
        bad = ~torch.isfinite(hidden).all(dim=-1) & ~finished  # checked once per batch, below: no sync per step
        nonfinite_step = torch.where(bad & (nonfinite_step < 0), step, nonfinite_step)
        logits = lm_head_logits(model, hidden).float()
        if processors:
            logits = processors(state.full_ids(), logits)
        if divergence is not None:
            # The target's own logits in a call of their own: one call over both rows would change the
            # method's logits in the last bits (a GEMM's order depends on its rows) and so its sampled tokens.
            divergence.update(lm_head_logits(model, h_target).float(), logits, (~finished).float())
        if trace is not None:
            trace.append({"logits": logits.cpu(), "h_target": h_target.float().cpu(), **state.record})
        next_tokens = torch.where(finished, pad_id, choose(logits, settings, warpers, generators))
        state.generated = torch.cat([state.generated, next_tokens[:, None]], dim=1)
        state.lengths += (~finished).long()
        was_finished, finished = finished, finished | torch.isin(next_tokens, eos_ids)
        if finished.all():
            break
        state.step_ids = next_tokens[:, None]
        state.attention_mask = torch.cat([state.attention_mask, (~was_finished).long()[:, None]], dim=1)  # ended rows feed padding
    _refuse_nonfinite(nonfinite_step.tolist())
    if stats is not None:
        if stats.get("diagnostics"):
            stats.update((divergence or Divergence(0, device)).result(state.lengths, changed))
        stats["ended_with_eos"] = finished.tolist()
    generated, lengths = state.generated.tolist(), state.lengths.tolist()
    return [g[:n] for g, n in zip(generated, lengths, strict=True)]
