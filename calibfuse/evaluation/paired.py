"""Paired comparisons: two settings scored on the same prompts, compared on the same resamples.

Prompts differ from one another far more than two settings do, so two unpaired intervals that
overlap say little. A paired bootstrap resamples prompts (each with all its seeds and samples)
jointly and recomputes both settings' statistics on every resample; the interval of their relative
change is what decides. Also here: a seeded split of the prompts into a selection half (choose the
best setting) and a confirmation half (report it), so that the best of many is not judged on the
prompts it was chosen on.

Definitions (docs/method.md, "How a setting is judged"):
- `toxicity_change` = T_B / T_A - 1, where T is the toxicity metric over prompts (e.g. the mean of
  per-prompt mean toxicity); -0.25 is a 25 % cut.
- `perplexity_ratio` = PPL_B / PPL_A, where PPL = exp(mean per-continuation loss) over the prompts'
  non-empty continuations; 1.05 is 5 % more perplexity.
"""

from __future__ import annotations

import hashlib
import math
import warnings

import numpy as np

from calibfuse.evaluation.metrics import METRICS, TOXICITY_METRICS, group_by_prompt, is_empty

PAIRED_COLUMNS = ("toxicity_change", "perplexity_ratio")
LEVEL = 0.95


def per_prompt(rows: list[dict], toxicity: str = "toxicity", empty: str = "score", threshold: float = 0.5) -> dict[str, tuple]:
    """prompt_id -> (toxicity value of the prompt, sum of its continuations' losses, their number).
    The toxicity value is the metric's per-prompt value over all the prompt's rows (seeds and samples
    nested within it); None when `empty="exclude"` leaves the prompt no continuation."""
    metric = METRICS[toxicity]
    values = {}
    for group in group_by_prompt(rows):
        scored = [r for r in group if not is_empty(r)] if empty == "exclude" else group
        value = metric.per_prompt([scored], {"threshold": threshold})[0] if scored else None
        losses = [r["loss"] for r in group if r.get("loss") is not None]
        values[group[0]["prompt_id"]] = (value, math.fsum(losses), len(losses))
    return values


def _toxicity_change(a, b, axis=-1):
    return np.mean(b, axis=axis) / np.mean(a, axis=axis) - 1


def _perplexity_ratio(sum_a, count_a, sum_b, count_b, axis=-1):
    return np.exp(np.sum(sum_b, axis=axis) / np.sum(count_b, axis=axis) - np.sum(sum_a, axis=axis) / np.sum(count_a, axis=axis))


def _interval(data: tuple, statistic, resamples: int, seed: int) -> tuple[float, float, float]:
    """The statistic and its 95 % paired percentile bootstrap interval (scipy.stats.bootstrap with
    paired=True: one resample of prompt indices drives every array)."""
    from scipy import stats

    with np.errstate(divide="ignore", invalid="ignore"):
        point = float(statistic(*data))
    if not math.isfinite(point) or len(data[0]) < 2:
        return point, math.nan, math.nan
    with warnings.catch_warnings(), np.errstate(divide="ignore", invalid="ignore"):
        warnings.simplefilter("ignore")  # a resample whose base is all zero gives inf; the percentile still holds
        result = stats.bootstrap(
            data,
            statistic,
            paired=True,
            vectorized=True,
            n_resamples=resamples,
            confidence_level=LEVEL,
            method="percentile",
            rng=np.random.default_rng(seed),
        )
    return point, float(result.confidence_interval.low), float(result.confidence_interval.high)


def paired_change(base: dict[str, tuple], other: dict[str, tuple], prompts: set[str] | None = None, resamples: int = 1000, seed: int = 0) -> dict:
    """`other` against `base` (both from `per_prompt`) on the prompts they share (restricted to
    `prompts` when given): the relative toxicity change and the perplexity ratio, each with its 95 %
    paired bootstrap interval, and the number of prompts compared."""
    shared = [p for p in base if p in other and base[p][0] is not None and other[p][0] is not None and (prompts is None or p in prompts)]
    result = {"paired_prompts": len(shared)}
    if not shared:
        return result | {f"{c}{s}": math.nan for c in PAIRED_COLUMNS for s in ("", "_lo", "_hi")}
    a, b = (np.array([values[p] for p in shared], dtype=float).T for values in (base, other))
    change = _interval((a[0], b[0]), _toxicity_change, resamples, seed)
    ratio = _interval((a[1], a[2], b[1], b[2]), _perplexity_ratio, resamples, seed) if a[2].sum() and b[2].sum() else (math.nan,) * 3
    for name, (point, lo, hi) in zip(PAIRED_COLUMNS, (change, ratio), strict=True):
        result |= {name: point, f"{name}_lo": lo, f"{name}_hi": hi}
    return result


def confirmation_split(prompts: dict[str, str], fraction: float = 0.5, seed: int = 0) -> tuple[set[str], set[str]]:
    """A seeded split of prompt ids into (selection, confirmation) by a hash of each prompt's text, so
    that a prompt listed twice (or under two ids) falls on one side only: the sides never overlap."""
    selection, confirmation = set(), set()
    for prompt_id, text in prompts.items():
        digest = hashlib.sha256(f"{seed}\0{text}".encode()).digest()
        (confirmation if int.from_bytes(digest[:8], "big") / 2**64 < fraction else selection).add(prompt_id)
    return selection, confirmation


def toxicity_metric(names) -> str | None:
    """The grid's toxicity metric: the first of the toxicity metrics it reports."""
    return next((m for m in TOXICITY_METRICS if m in names), None)


def annotate_grid(grid: list[dict], generations: list[list[dict]], options: dict, resamples: int = 1000) -> None:
    """Add to every grid row that lacks it the paired change against the target alone of the same run
    (same target, same seed, same prompts): `toxicity_change`, `perplexity_ratio` with `_lo`/`_hi`, and
    `paired_prompts`. `options`: per_prompt's (toxicity metric, empty rule, threshold)."""
    bases = {(r["target"], r["seed"]): rows for r, rows in zip(grid, generations, strict=True) if r.get("target_alone")}
    for row, rows in zip(grid, generations, strict=True):
        base = bases.get((row["target"], row["seed"]))
        if base is not None and not row.get("target_alone") and "toxicity_change" not in row:
            row.update(paired_change(per_prompt(base, **options), per_prompt(rows, **options), resamples=resamples))
