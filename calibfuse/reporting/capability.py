"""The report's capability table (capability.md): per target and task, every setting's zero-shot accuracy
(acc, and acc_norm where lm-eval reports it) with its change against the target alone, paired by item
(calibfuse.evaluation.capability; docs/quality.md, "Capability retention")."""

from __future__ import annotations

import math

from calibfuse.evaluation.capability import PREFIX, capability_columns, metrics_of, paired_capability
from calibfuse.reporting.settings import Setting
from calibfuse.reporting.verdict import base_of, by_target, label


def add_capability(settings: dict[Setting, dict], cells: list[dict], resamples: int = 1000) -> None:
    """Each setting's accuracies (from its cells' stored per-item scores: seeds share them), then its
    paired changes against its target alone."""
    stored = {}
    for cell in cells:
        if cell.get("capability"):
            stored.setdefault(cell["setting_key"], cell["capability"])
    for row in settings.values():
        row["capability"] = stored.get(row["key"])
        row.update(capability_columns(row["capability"], resamples))
    for points in by_target(settings).values():
        for _, row in points:
            base = base_of(row, points)
            if base is not None and not row.get("target_alone") and row["capability"]:
                row.update(paired_capability(base.get("capability"), row["capability"], resamples))


def capability_keys(settings: dict[Setting, dict]) -> list[str]:
    """Every capability column the settings hold, in a stable order (summary.json's columns)."""
    return sorted({k for row in settings.values() for k in row if k.startswith(PREFIX)})


def _percent(row: dict, name: str, signed: bool = False) -> str:
    value = row.get(name)
    if not isinstance(value, float) or not math.isfinite(value):
        return "–"
    spec = "+.1f" if signed else ".1f"
    lo, hi = row.get(f"{name}_lo"), row.get(f"{name}_hi")
    interval = f" [{100 * lo:{spec}}, {100 * hi:{spec}}]" if isinstance(lo, float) and math.isfinite(lo) else ""
    return f"{100 * value:{spec}}{interval}"


def capability_table(settings: dict[Setting, dict]) -> str:
    """Markdown: per target, task and setting, accuracy in % with its 95 % bootstrap interval over items,
    and its change against the target alone in points, 95 % paired bootstrap over items; empty when no
    setting has capability scores."""
    tasks = sorted({t for row in settings.values() for t in (row.get("capability") or {})})
    if not tasks:
        return "No capability scores: the grids ran with `capability.tasks=[]` (docs/quality.md, Capability retention)."
    header = ["target", "task", "setting", "items", "acc %", "Δ acc (points, paired)", "acc_norm %", "Δ acc_norm (points, paired)", "seconds"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for target, points in sorted(by_target(settings).items()):
        ordered = sorted(points, key=lambda p: (not p[1].get("target_alone"), p[1]["method"], p[1]["setting"], p[0]))
        for task in tasks:
            for alpha, row in ordered:
                if task not in (row.get("capability") or {}):
                    continue
                cells = [target, task, label(row, alpha), str(row[f"{PREFIX}{task}_items"])]
                for metric in ("acc", "acc_norm"):
                    name = f"{PREFIX}{task}_{metric}"
                    cells += [_percent(row, name), _percent(row, f"{name}_change", True)] if metric in metrics_of(task) else ["–", "–"]
                cells.append(str(row.get(f"{PREFIX}{task}_seconds", "–")))
                lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
