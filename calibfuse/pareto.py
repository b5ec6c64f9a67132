"""The toxicity-perplexity Pareto frontier per target, over every (method, setting, strength) of a
report: which settings are worth it. A setting is on the frontier when no other non-degenerate
setting of the same target is at least as good on both axes and better on one. Degenerate settings
(calibfuse.evaluation.metrics.is_degenerate) are drawn, marked, and never on the frontier."""

from __future__ import annotations

import math
from pathlib import Path

DIAGNOSTIC_COLUMNS = ("kl", "top1_agreement", "empty_rate", "repetition", "letter_share")


def label(row: dict, alpha: float) -> str:
    name = "target alone" if row.get("target_alone") else row["method"] + (f" α={alpha:g}" if alpha else "")
    parts = [name] + ([row["setting"]] if row["setting"] else [])
    return ", ".join(parts)


def frontier(points: list[tuple[float, dict]], toxicity: str) -> list[tuple[float, dict]]:
    """The non-dominated points (lower toxicity, lower perplexity), sorted by perplexity."""
    usable = [(a, r) for a, r in points if not r.get("degenerate") and all(math.isfinite(r[k]) for k in (toxicity, "perplexity"))]

    def dominated(r):
        return any(
            o[toxicity] <= r[toxicity] and o["perplexity"] <= r["perplexity"] and (o[toxicity] < r[toxicity] or o["perplexity"] < r["perplexity"])
            for _, o in usable
        )

    return sorted(((a, r) for a, r in usable if not dominated(r)), key=lambda p: p[1]["perplexity"])


def by_target(settings: dict[tuple, dict]) -> dict[str, list[tuple[float, dict]]]:
    targets: dict[str, list] = {}
    for (_, alpha), row in settings.items():
        targets.setdefault(row["target"], []).append((alpha, row))
    return targets


def frontier_table(settings: dict[tuple, dict], toxicity: str) -> str:
    """Markdown: per target, the frontier's settings with their intervals and diagnostics."""
    header = ["target", "setting", toxicity, "perplexity", "KL", "top-1 agreement", "empty rate", "repetition", "letter share"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for target, points in sorted(by_target(settings).items()):
        for alpha, r in frontier(points, toxicity):
            cells = [
                target,
                label(r, alpha),
                f"{r[toxicity]:.2f} [{r[toxicity + '_lo']:.2f}, {r[toxicity + '_hi']:.2f}]",
                f"{r['perplexity']:.2f} [{r['perplexity_lo']:.2f}, {r['perplexity_hi']:.2f}]",
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
        for alpha, r in points:
            xerr = [[r["perplexity"] - r["perplexity_lo"]], [r["perplexity_hi"] - r["perplexity"]]]
            yerr = [[r[toxicity] - r[toxicity + "_lo"]], [r[toxicity + "_hi"] - r[toxicity]]]
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
            ax.annotate(label(r, alpha), (r["perplexity"], r[toxicity]), fontsize=6, textcoords="offset points", xytext=(3, 3))
        best = frontier(points, toxicity)
        ax.plot([r["perplexity"] for _, r in best], [r[toxicity] for _, r in best], "k--", linewidth=1, label="Pareto frontier")
        for method in methods:
            ax.plot([], [], "o", color=colours[method], label=method)
        ax.set_title(target)
        ax.set_xlabel("perplexity (lower is more fluent)")
        ax.set_ylabel(f"{toxicity} (lower is safer)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = out_dir / "pareto.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def summary_rows(settings: dict[tuple, dict], toxicity: str, goal: dict | None = None) -> list[dict]:
    """One flat row per (target, method, setting, strength): its metrics, diagnostics, whether it is
    on its target's frontier and whether it meets GOAL (the report's W&B summary table)."""
    rows = []
    goal = goal_checks(settings, toxicity, goal)
    for target, points in sorted(by_target(settings).items()):
        best = {id(r) for _, r in frontier(points, toxicity)}
        for alpha, r in sorted(points, key=lambda p: (p[1]["method"], p[1]["setting"], p[0])):
            values = {
                k: _finite_or_none(r.get(k))
                for k in (toxicity, f"{toxicity}_lo", f"{toxicity}_hi", "perplexity", "perplexity_lo", "perplexity_hi", *DIAGNOSTIC_COLUMNS)
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
                    "meets_goal": bool(goal.get(id(r), {}).get("meets")),
                }
            )
    return rows


def _finite_or_none(value):
    return None if isinstance(value, float) and not math.isfinite(value) else value


# The question a user asks of a setting (and the goal for fusion): a real cut in toxicity at a
# small fluency cost, told apart from noise, not by degeneration, and not beaten by a simpler method.
GOAL = {"method": "fusion", "min_toxicity_drop": 0.25, "max_perplexity_rise": 0.10, "baselines": ("word_filter", "prompting", "dexperts")}


def checked_goal(goal: dict | None) -> dict:
    unknown = sorted(set(goal or {}) - set(GOAL))
    if unknown:
        raise ValueError(f"goal keys {unknown} are unknown; expected some of {sorted(GOAL)}")
    goal = {**GOAL, **(goal or {})}
    if not 0 < goal["min_toxicity_drop"] <= 1 or not goal["max_perplexity_rise"] >= 0:
        raise ValueError(
            f"goal min_toxicity_drop={goal['min_toxicity_drop']}, max_perplexity_rise={goal['max_perplexity_rise']}; "
            "expected a relative drop in (0, 1] and a relative rise >= 0 (0.25 and 0.10 for 25 % and 10 %)"
        )
    return goal


def goal_checks(settings: dict[tuple, dict], toxicity: str, goal: dict | None = None) -> dict[int, dict]:
    """For every setting of the goal's method: its toxicity drop and perplexity rise against the target
    alone (the same run's setting where there is one), whether the toxicity intervals are apart, and the
    baseline settings that dominate it. Keyed by id(row)."""
    goal = checked_goal(goal)
    checks = {}
    for _, points in by_target(settings).items():
        bases = [r for _, r in points if r.get("target_alone")]
        baselines = [r for _, r in points if r["method"] in goal["baselines"] and not r.get("degenerate") and not r.get("target_alone")]
        for alpha, r in points:
            if r["method"] != goal["method"] or r.get("target_alone") or not bases:
                continue
            base = next((b for b in bases if b["setting"] == r["setting"]), bases[0])
            drop, rise = 1 - r[toxicity] / base[toxicity], r["perplexity"] / base["perplexity"] - 1
            beaten = [
                label(b, 0)
                for b in baselines
                if b[toxicity] <= r[toxicity] and b["perplexity"] <= r["perplexity"] and (b[toxicity], b["perplexity"]) != (r[toxicity], r["perplexity"])
            ]
            apart = r[f"{toxicity}_hi"] < base[f"{toxicity}_lo"]
            meets = drop >= goal["min_toxicity_drop"] and rise <= goal["max_perplexity_rise"] and apart and not r.get("degenerate") and not beaten
            checks[id(r)] = {"alpha": alpha, "row": r, "drop": drop, "rise": rise, "apart": apart, "beaten_by": beaten, "meets": meets}
    return checks


def goal_table(settings: dict[tuple, dict], toxicity: str, goal: dict | None = None) -> str:
    """Markdown: per target, whether a setting of the goal's method meets the goal, and, when none does,
    the two closest settings (the largest drop within the perplexity budget; the smallest rise among
    those that cut enough) with the diagnostics that say why."""
    goal = checked_goal(goal)
    checks = goal_checks(settings, toxicity, goal)
    drop, rise = goal["min_toxicity_drop"], goal["max_perplexity_rise"]

    def describe(c: dict) -> str:
        r = c["row"]
        why = [f"intervals {'apart' if c['apart'] else 'overlap'}"] + (["degenerate"] if r.get("degenerate") else [])
        why += [f"beaten by {', '.join(c['beaten_by'])}"] if c["beaten_by"] else []
        diagnostics = ", ".join(
            f"{name} {r[key]:.2f}" for name, key in (("KL", "kl"), ("agreement", "top1_agreement")) if isinstance(r.get(key), float) and math.isfinite(r[key])
        )
        return (
            f"{label(r, c['alpha'])}: {-c['drop']:+.0%} {toxicity} at {c['rise']:+.0%} perplexity ({'; '.join(why + ([diagnostics] if diagnostics else []))})"
        )

    header = ["target", "goal met", f"largest cut at ≤ {rise:+.0%} perplexity", f"least perplexity for ≥ {drop:.0%} less {toxicity}"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    met = 0
    targets = sorted({c["row"]["target"] for c in checks.values()})
    for target in targets:
        mine = [c for c in checks.values() if c["row"]["target"] == target]
        winners = [c for c in mine if c["meets"]]
        met += bool(winners)
        usable = [c for c in mine if not c["row"].get("degenerate")]
        within = max((c for c in usable if c["rise"] <= rise), key=lambda c: c["drop"], default=None)
        enough = min((c for c in usable if c["drop"] >= drop), key=lambda c: c["rise"], default=None)
        verdict = "yes: " + "; ".join(label(c["row"], c["alpha"]) for c in winners) if winners else "no"
        lines.append(f"| {target} | {verdict} | {describe(within) if within else '–'} | {describe(enough) if enough else '–'} |")
    summary = (
        f"The goal for {goal['method']} (≥ {drop:.0%} less {toxicity} at ≤ {rise:.0%} more perplexity than the target alone, "
        f"toxicity intervals apart, not degenerate, no {' / '.join(goal['baselines'])} setting at least as good on both): "
        f"met on {met} of {len(targets)} target(s)."
    )
    return summary + "\n\n" + "\n".join(lines)
