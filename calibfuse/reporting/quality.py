"""The report's quality table (quality.md): per target, every setting's own perplexity on held-out neutral
text and its dist-1/2/3, each with its paired change against the target alone (calibfuse.evaluation.quality;
definitions in docs/quality.md). The paper table, the frontier and the verdict are left as they are."""

from __future__ import annotations

import math

from calibfuse.evaluation import statistics as M
from calibfuse.evaluation.quality import DIST, dist_per_prompt, neutral_columns, paired_quality
from calibfuse.evaluation.results import paired
from calibfuse.reporting.settings import Setting
from calibfuse.reporting.verdict import base_of, by_target, label


def add_quality(settings: dict[Setting, dict], cells: list[dict], resamples: int = 1000) -> None:
    """Each setting's neutral perplexity (from its cells' stored per-text scores: seeds share them) and
    dist-n (per prompt over every seed's samples, with a bootstrap interval over prompts), then its paired
    changes against its target alone."""
    neutral = {}
    for cell in cells:
        if cell.get("neutral"):
            neutral.setdefault(cell["setting_key"], cell["neutral"])
    for row in settings.values():
        row["neutral"] = neutral.get(row["key"])
        row.update(neutral_columns(row["neutral"], resamples))
        for n, name in enumerate(DIST, start=1):
            values = list(dist_per_prompt(row["rows"], n).values()) if row.get("rows") else []
            lo, hi = M.bootstrap_interval(values, resamples=resamples) if values else (math.nan, math.nan)
            row[name], row[f"{name}_lo"], row[f"{name}_hi"] = M.mean(values), lo, hi
    for points in by_target(settings).values():
        for _, row in points:
            base = base_of(row, points)
            if base is not None and not row.get("target_alone"):
                row.update(paired_quality(base, row, resamples))


def _level(row: dict, name: str, spec: str) -> str:
    value = row.get(name)
    if not isinstance(value, float) or not math.isfinite(value):
        return "–"
    lo, hi = row.get(f"{name}_lo"), row.get(f"{name}_hi")
    interval = f" [{lo:{spec}}, {hi:{spec}}]" if isinstance(lo, float) and math.isfinite(lo) else ""
    return f"{value:{spec}}{interval}"


def quality_table(settings: dict[Setting, dict]) -> str:
    """Markdown: per target, every setting's neutral perplexity and dist-n, each with its paired change
    against the target alone (95 % paired bootstrap: by text for perplexity, by prompt for dist-n)."""
    header = ["target", "setting", "neutral perplexity", "Δ neutral perplexity (paired by text)", "texts (banned)"]
    for name in DIST:
        header += [name.replace("_", "-"), f"Δ {name.replace('_', '-')} (paired)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for target, points in sorted(by_target(settings).items()):
        for alpha, row in sorted(points, key=lambda p: (not p[1].get("target_alone"), p[1]["method"], p[1]["setting"], p[0])):
            counts = f"{row['neutral_texts']} ({row['neutral_banned']})" if row.get("neutral") else "–"
            cells = [target, label(row, alpha), _level(row, "neutral_ppl", ".2f"), paired(row, "neutral_ppl_ratio", as_change=True), counts]
            for name in DIST:
                cells += [_level(row, name, ".3f"), paired(row, f"{name}_change")]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
