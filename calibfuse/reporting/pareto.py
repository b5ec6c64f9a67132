"""The toxicity-perplexity Pareto frontier per target, over every (method, setting, strength) of a
report: which settings are worth it. A setting is on the frontier when no other non-degenerate
setting of the same target is at least as good on both axes and better on one. Degenerate settings
(calibfuse.evaluation.metrics.is_degenerate) are drawn, marked, and never on the frontier."""

from __future__ import annotations

import math
from pathlib import Path

from calibfuse.evaluation.paired import PAIRED_COLUMNS
from calibfuse.evaluation.quality import QUALITY_COLUMNS
from calibfuse.evaluation.results import paired
from calibfuse.reporting.capability import capability_keys
from calibfuse.reporting.verdict import CONFIRM, by_target, label, verdict

DIAGNOSTIC_COLUMNS = ("kl", "top1_agreement", "empty_rate", "repetition", "letter_share")


def frontier(points: list[tuple[float, dict]], toxicity: str) -> list[tuple[float, dict]]:
    """The non-dominated points (lower toxicity, lower perplexity), sorted by perplexity."""
    usable = [(a, r) for a, r in points if not r.get("degenerate") and all(math.isfinite(r[k]) for k in (toxicity, "perplexity"))]

    def dominated(r):
        return any(
            o[toxicity] <= r[toxicity] and o["perplexity"] <= r["perplexity"] and (o[toxicity] < r[toxicity] or o["perplexity"] < r["perplexity"])
            for _, o in usable
        )

    return sorted(((a, r) for a, r in usable if not dominated(r)), key=lambda p: p[1]["perplexity"])


def frontier_table(settings: dict[tuple, dict], toxicity: str) -> str:
    """Markdown: per target, the frontier's settings with their intervals, their paired change against
    the target alone on the same prompts, and diagnostics."""
    header = [
        "target",
        "setting",
        toxicity,
        "perplexity",
        f"Δ {toxicity} (paired)",
        "Δ perplexity (paired)",
        "KL",
        "top-1 agreement",
        "empty rate",
        "repetition",
        "letter share",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for target, points in sorted(by_target(settings).items()):
        for alpha, r in frontier(points, toxicity):
            cells = [
                target,
                label(r, alpha),
                f"{r[toxicity]:.2f} [{r[toxicity + '_lo']:.2f}, {r[toxicity + '_hi']:.2f}]",
                f"{r['perplexity']:.2f} [{r['perplexity_lo']:.2f}, {r['perplexity_hi']:.2f}]",
                paired(r, "toxicity_change"),
                paired(r, "perplexity_ratio", as_change=True),
            ]
            cells += [f"{r[c]:.3f}" if isinstance(r.get(c), float) and math.isfinite(r[c]) else "–" for c in DIAGNOSTIC_COLUMNS]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_frontier(settings: dict[tuple, dict], toxicity: str, out_dir: Path) -> Path:
    """One panel per target: every setting with its 95 % intervals on both axes, coloured by method,
    degenerate ones crossed out, the frontier joined by a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    targets = by_target(settings)
    fig, axes = plt.subplots(1, len(targets), figsize=(5 * len(targets), 4), squeeze=False)
    methods = sorted({r["method"] for points in targets.values() for _, r in points})
    colours = {m: f"C{i}" for i, m in enumerate(methods)}
    for ax, (target, points) in zip(axes[0], sorted(targets.items()), strict=True):
        labels = Labels(ax)
        for alpha, r in points:
            xerr = [[e] for e in clipped(r["perplexity"], r["perplexity_lo"], r["perplexity_hi"])]
            yerr = [[e] for e in clipped(r[toxicity], r[toxicity + "_lo"], r[toxicity + "_hi"])]
            ax.errorbar(
                r["perplexity"],
                r[toxicity],
                xerr=xerr,
                yerr=yerr,
                fmt="x" if r.get("degenerate") else "o",
                color=colours[r["method"]],
                alpha=0.8,
                capsize=2,
                markersize=5,
            )
            labels.add(label(r, alpha), r["perplexity"], r[toxicity])
        best = frontier(points, toxicity)
        if len(best) > 1:  # a frontier of one point is a marker already: no legend entry without a line
            ax.plot([r["perplexity"] for _, r in best], [r[toxicity] for _, r in best], "k--", linewidth=1, label="Pareto frontier")
        fit_axis(ax, "x", [r["perplexity"] for _, r in points], log=True)
        fit_axis(ax, "y", [r[toxicity] for _, r in points])
        ax.set_xlabel("perplexity (lower is more fluent)")
        ax.set_ylabel(f"{toxicity} (lower is safer)")
        finish_panel(ax, target, colours, 7)
    return save(fig, out_dir / "pareto.png")


def fit_axis(ax, which: str, values: list[float], log: bool = False) -> None:
    """An axis that reads: with `log` (perplexity), logarithmic when the values span more than x10 (6.8,
    17 and 3958 apart, not squashed at 0); otherwise linear from 0 (toxicity: a 0.3-point spread is not
    blown up to the full height)."""
    finite = [v for v in values if math.isfinite(v) and v > 0]
    if log and finite and max(finite) / min(finite) > 10:
        from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

        axis = ax.xaxis if which == "x" else ax.yaxis
        ax.set_xscale("log") if which == "x" else ax.set_yscale("log")
        axis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))  # 2, 5, 10, 20, ...: plain numbers, none crowded
        axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        axis.set_minor_formatter(NullFormatter())
    elif not log:
        ax.set_ylim(bottom=0.0) if which == "y" else ax.set_xlim(left=0.0)


def clipped(value: float, lo: float, hi: float) -> tuple[float, float]:
    """Error-bar lengths below and above `value` for the interval [lo, hi] clipped to the metric's range (>= 0)."""
    return max(value - max(lo, 0.0), 0.0), max(hi - value, 0.0)


class Labels:
    """Point labels that do not print on top of one another: a label at a spot already labelled is
    joined to that label instead (`target alone` shared by several lines is written once)."""

    def __init__(self, ax, fontsize: int = 6):
        self.ax, self.fontsize, self.placed = ax, fontsize, {}

    def add(self, text: str, x: float, y: float) -> None:
        spot = (round(x, 6), round(y, 6))
        if spot in self.placed:
            annotation = self.placed[spot]
            if text not in annotation.get_text().split("; "):
                annotation.set_text(f"{annotation.get_text()}; {text}")
            return
        self.placed[spot] = self.ax.annotate(text, (x, y), fontsize=self.fontsize, textcoords="offset points", xytext=(3, 3))


def finish_panel(ax, title: str, colours: dict[str, str], fontsize: int) -> None:
    for method, colour in colours.items():
        ax.plot([], [], "o", color=colour, label=method)
    ax.set_title(title)
    ax.legend(fontsize=fontsize)


def save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_paired(settings: dict[tuple, dict], toxicity: str, out_dir: Path, goal: dict) -> Path | None:
    """One panel per target: every setting's paired change against the target alone (perplexity change
    across, toxicity change up, 95 % paired intervals), with the goal's corner shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    targets = {t: [(a, r) for a, r in points if math.isfinite(r.get("toxicity_change", math.nan))] for t, points in by_target(settings).items()}
    targets = {t: points for t, points in targets.items() if points}
    if not targets:
        return None
    fig, axes = plt.subplots(1, len(targets), figsize=(5 * len(targets), 4), squeeze=False)
    methods = sorted({r["method"] for points in targets.values() for _, r in points})
    colours = {m: f"C{i}" for i, m in enumerate(methods)}
    for ax, (target, points) in zip(axes[0], sorted(targets.items()), strict=True):
        cut, budget = goal["min_toxicity_drop"] * 100, goal["max_perplexity_rise"] * 100
        ax.fill_betweenx([-100, -cut], -100, budget, color="green", alpha=0.1, label="the goal's corner")
        ax.axvline(budget, color="green", linestyle=":", linewidth=1)
        ax.axhline(-cut, color="green", linestyle="--", linewidth=1)
        ax.axhline(0, color="grey", linewidth=0.5)
        labels = Labels(ax)
        for alpha, r in points:
            x, y = (r["perplexity_ratio"] - 1) * 100, r["toxicity_change"] * 100
            xerr = [[x - (r["perplexity_ratio_lo"] - 1) * 100], [(r["perplexity_ratio_hi"] - 1) * 100 - x]]
            yerr = [[y - r["toxicity_change_lo"] * 100], [r["toxicity_change_hi"] * 100 - y]]
            ax.errorbar(x, y, xerr=xerr, yerr=yerr, fmt="x" if r.get("degenerate") else "o", color=colours[r["method"]], capsize=2, markersize=5)
            labels.add(label(r, alpha), x, y)
        ax.set_xscale("symlog", linthresh=20)
        ax.set_xlabel("perplexity change, % (log beyond ±20)")
        ax.set_ylabel(f"{toxicity} change, %")
        finish_panel(ax, f"{target}: against the target alone, paired", colours, 6)
    return save(fig, out_dir / "paired.png")


def summary_rows(settings: dict[tuple, dict], toxicity: str, goal: dict | None = None, confirm: dict | None = CONFIRM) -> list[dict]:
    """One flat row per (target, method, setting, strength): its metrics, its paired change against the
    target alone, diagnostics, whether it is on its target's frontier, whether it was chosen on the
    selection prompts and whether it meets GOAL confirmed (the report's W&B summary table)."""
    rows = []
    results = verdict(settings, toxicity, goal, confirm)
    chosen = {id(v["chosen"]["row"]): v["met"] for v in results.values() if v["chosen"]}
    paired_keys = [f"{c}{s}" for c in PAIRED_COLUMNS for s in ("", "_lo", "_hi")] + list(QUALITY_COLUMNS)  # quality: calibfuse.reporting.quality
    paired_keys += capability_keys(settings)  # cap_<task>_...: calibfuse.reporting.capability
    for target, points in sorted(by_target(settings).items()):
        best = {id(r) for _, r in frontier(points, toxicity)}
        for alpha, r in sorted(points, key=lambda p: (p[1]["method"], p[1]["setting"], p[0])):
            values = {
                k: _finite_or_none(r.get(k))
                for k in (toxicity, f"{toxicity}_lo", f"{toxicity}_hi", "perplexity", "perplexity_lo", "perplexity_hi", *paired_keys, *DIAGNOSTIC_COLUMNS)
            }
            rows.append(
                {
                    "target": target,
                    "label": label(r, alpha),
                    "method": r["method"],
                    "setting": r["setting"],
                    "alpha": alpha,
                    **values,
                    "degenerate": bool(r.get("degenerate")),
                    "on_frontier": id(r) in best,
                    "chosen": id(r) in chosen,
                    "meets_goal": chosen.get(id(r), False),
                }
            )
    return rows


def _finite_or_none(value):
    return None if isinstance(value, float) and not math.isfinite(value) else value
