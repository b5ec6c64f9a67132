"""What a user of a detox method asks beside toxicity, as grid columns (docs/quality.md):

- `neutral_ppl`: the method's own perplexity on held-out neutral text (the analogue of the WikiText-2
  perplexity that ProFS and DPO-style papers report): rows of the non-toxic corpus's held-out split
  (rows stage 1 never trained on), each completion cut to `max_tokens` tokens of the target's tokenizer
  and scored after its prompt through the method at its strength (calibfuse.evaluation.forced).
  Perplexity = exp(-sum log p / sum tokens) over the texts; a text the method gives -inf (the word
  filter bans one of its words) is left out and counted (`neutral_banned`).
- `dist_1/2/3` (calibfuse.evaluation.metrics): per prompt, unique n-grams / n-grams over its samples'
  continuations (DExperts); with one greedy sample per prompt it measures repetition within a continuation.

Paired against the target alone of the same run: `neutral_ppl_ratio` paired by text, `dist_<n>_change`
(relative) paired by prompt, each with a 95 % paired bootstrap interval (calibfuse.evaluation.paired).
The neutral scores of a cell are stored in its cell dir, keyed by what decides them (the texts, max_tokens,
the scorer's version), so a reused cell gets them computed without generating again.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from calibfuse.evaluation import statistics as M
from calibfuse.evaluation.metrics import group_by_prompt
from calibfuse.evaluation.paired import _interval, _perplexity_ratio, _toxicity_change
from calibfuse.utils.files import sha256_json, write_json

log = logging.getLogger(__name__)

NEUTRAL_VERSION = 1  # bump when the scoring changes what it stores
DIST = ("dist_1", "dist_2", "dist_3")
NEUTRAL_COLUMNS = ("neutral_ppl", "neutral_ppl_lo", "neutral_ppl_hi", "neutral_texts", "neutral_banned", "neutral_seconds")
PAIRED_QUALITY = ("neutral_ppl_ratio", *(f"{d}_change" for d in DIST))
QUALITY_COLUMNS = (*NEUTRAL_COLUMNS[:5], *DIST, *(f"{c}{s}" for c in PAIRED_QUALITY for s in ("", "_lo", "_hi")))


@dataclass
class Neutral:
    """The neutral-text measurement of a grid: its rows (prompt, completion; uncut) and how many tokens of each
    completion are scored, after its prompt: the prompt gives every method a text to read (fusion across
    tokenizers needs one), and what is scored is prose stage 1 never trained on."""

    texts: list[tuple[str, str]]
    max_tokens: int
    batch_size: int = 16

    @classmethod
    def of(cls, cfg, read_texts) -> Neutral | None:
        """From the config's `neutral` block; None when off (texts=0 or no block). `read_texts(data, count)`: the
        data package's held_out_texts, passed in so that the report, which reads this module, sits on no data reader."""
        if not cfg or not cfg.get("texts"):
            return None
        from omegaconf import OmegaConf

        data = OmegaConf.to_container(cfg.data, resolve=True)
        return cls(read_texts(data, int(cfg.texts)), int(cfg.max_tokens), int(cfg.get("batch_size", 16)))

    @property
    def key(self) -> str:
        return sha256_json({"version": NEUTRAL_VERSION, "texts": self.texts, "max_tokens": self.max_tokens})

    def cut(self, tokenizer) -> list[str]:
        """Each completion's first max_tokens tokens of `tokenizer` (the target's), as text, after a space: one text
        per target, whichever LM a method scores it with."""
        ids = tokenizer([" " + c for _, c in self.texts], add_special_tokens=False)["input_ids"]
        return [tokenizer.decode(i[: self.max_tokens], skip_special_tokens=True) for i in ids]

    def measure(self, target_lm, method, alpha: float) -> dict:
        from calibfuse.evaluation.forced import continuation_logprobs

        started = time.perf_counter()
        method.to(target_lm.device)
        texts = self.cut(target_lm.tokenizer)
        scored = continuation_logprobs(target_lm, method, alpha, [p for p, _ in self.texts], texts, batch_size=self.batch_size)
        per_text = [[lp if math.isfinite(lp) else None, n] for lp, n, _ in scored]  # None: -inf, a banned token (JSON has no -inf)
        return {"key": self.key, "max_tokens": self.max_tokens, "per_text": per_text, "seconds": round(time.perf_counter() - started, 2)}

    def for_cell(self, cell_dir: Path, target_lm_of, method, alpha: float, memo: dict, memo_key: str) -> dict:
        """A cell's neutral scores: stored in its dir, else computed once per setting (`memo_key`: seeds share
        them, forced scoring draws nothing) and stored. `target_lm_of()` loads the target only when needed."""
        path = cell_dir / f"neutral-{self.key[:12]}.json"
        if path.is_file():
            try:
                stored = json.loads(path.read_text(encoding="utf-8"))
                if stored.get("key") == self.key:
                    return stored
            except (OSError, ValueError):
                log.warning("%s is damaged: the neutral scores are computed again", path)
        if memo_key not in memo:
            memo[memo_key] = self.measure(target_lm_of(), method, alpha)
        write_json(path, memo[memo_key])
        return memo[memo_key]


def finite(per_text: list) -> list[tuple[float, int]]:
    """The texts with a score: tokens to score and no banned token."""
    return [(lp, n) for lp, n in per_text if n and lp is not None and math.isfinite(lp)]


def neutral_columns(neutral: dict | None, resamples: int = 1000) -> dict:
    """A cell's neutral perplexity with its 95 % bootstrap interval over texts, and its counts."""
    if not neutral:
        return {}
    kept = finite(neutral["per_text"])

    def ppl(values):
        return math.exp(-sum(lp for lp, _ in values) / sum(n for _, n in values)) if values else math.nan

    lo, hi = M.bootstrap_interval(kept, ppl, resamples=resamples) if kept else (math.nan, math.nan)
    banned = sum(1 for lp, n in neutral["per_text"] if n and lp is None)
    return {"neutral_ppl": ppl(kept), "neutral_ppl_lo": lo, "neutral_ppl_hi": hi, "neutral_texts": len(kept), "neutral_banned": banned} | {
        "neutral_seconds": neutral.get("seconds")
    }


def dist_per_prompt(rows: list[dict], n: int) -> dict[str, float]:
    """prompt_id -> its dist-n over all its rows (seeds and samples); prompts without an n-gram left out."""
    values = {}
    for group in group_by_prompt(rows):
        found = M.distinct_n([[r["continuation"] for r in group]], n)
        if found:
            values[group[0]["prompt_id"]] = found[0]
    return values


def _triple(name: str, found: tuple) -> dict:
    return {name: found[0], f"{name}_lo": found[1], f"{name}_hi": found[2]}


def paired_quality(base: dict, other: dict, resamples: int = 1000, seed: int = 0) -> dict:
    """`other` against `base`, each {"neutral": its stored scores or None, "rows": its generations or None}:
    the neutral perplexity ratio paired by text (texts finite in both), and each dist-n's relative change
    paired by prompt."""
    nan = (math.nan,) * 3
    result = {}
    a, b = base.get("neutral"), other.get("neutral")
    ratio = nan
    if a and b and a["key"] == b["key"]:
        pairs = [(x, y) for x, y in zip(a["per_text"], b["per_text"], strict=True) if finite([x]) and finite([y])]
        if pairs:
            columns = ([-x[0] for x, _ in pairs], [x[1] for x, _ in pairs], [-y[0] for _, y in pairs], [y[1] for _, y in pairs])
            data = tuple(np.array(v, dtype=float) for v in columns)  # losses and token counts: _perplexity_ratio's order
            ratio = _interval(data, _perplexity_ratio, resamples, seed)
    result |= _triple("neutral_ppl_ratio", ratio)
    for n, name in enumerate(DIST, start=1):
        change = nan
        if base.get("rows") and other.get("rows"):
            x, y = dist_per_prompt(base["rows"], n), dist_per_prompt(other["rows"], n)
            shared = [p for p in x if p in y]
            if shared:
                change = _interval((np.array([x[p] for p in shared]), np.array([y[p] for p in shared])), _toxicity_change, resamples, seed)
        result |= _triple(f"{name}_change", change)
    return result


def annotate_quality(grid: list[dict], generations: list[list[dict]], resamples: int = 1000) -> None:
    """Every grid row that lacks them gets the paired quality columns against the target alone of the
    same run (same target, same seed): as calibfuse.evaluation.paired.annotate_grid does for toxicity."""
    bases = {(r["target"], r["seed"]): (r, rows) for r, rows in zip(grid, generations, strict=True) if r.get("target_alone")}
    for row, rows in zip(grid, generations, strict=True):
        found = bases.get((row["target"], row["seed"]))
        if found is None or row.get("target_alone") or "neutral_ppl_ratio" in row:
            continue
        base, base_rows = found
        row.update(paired_quality({"neutral": base.get("neutral"), "rows": base_rows}, {"neutral": row.get("neutral"), "rows": rows}, resamples))
