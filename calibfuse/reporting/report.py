"""The report from grid files: cells read (calibfuse.reporting.runs) and grouped by setting (.settings), the paper-style table (Markdown and
LaTeX), the plots, and the frontier and verdict from calibfuse.reporting.pareto and .verdict. The
entry point, with its usage and outputs, is calibfuse.report."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from calibfuse.evaluation.paired import toxicity_metric
from calibfuse.reporting.capability import add_capability, capability_table
from calibfuse.reporting.pareto import DIAGNOSTIC_COLUMNS, Labels, fit_axis, frontier_table, plot_frontier, plot_paired, save, summary_rows
from calibfuse.reporting.quality import add_quality, quality_table
from calibfuse.reporting.recheck import recheck_table
from calibfuse.reporting.runs import load_cells
from calibfuse.reporting.settings import Setting, by_setting, prompt_ids
from calibfuse.reporting.subsets import SUBSETS, checked_subsets, subset_changes, subsets_table, with_subsets
from calibfuse.reporting.verdict import CONFIRM, add_paired, base_of, by_target, checked_goal, goal_table, roles
from calibfuse.utils.run import finish_wandb, instantiate_group

log = logging.getLogger(__name__)


def plain(node):
    """A config node as plain Python (`goal`, `confirm`); a string (confirm=held_out) or None as it is."""
    return OmegaConf.to_container(node) if OmegaConf.is_config(node) else node or None


def on_prompts(row: dict, ids: set[str], toxicity: str) -> dict:
    """A setting's toxicity and perplexity read again on `ids` only, from its generations (bootstrap
    intervals over those prompts, seeds nested within each)."""
    from calibfuse.evaluation.metrics import cell_metrics

    rows = [r for r in row["rows"] if r["prompt_id"] in ids]
    return row | cell_metrics(rows, [toxicity, "perplexity"], row.get("threshold", 0.5), 1000, row.get("empty_rule", "score"))


def fmt(row: dict, name: str, latex: bool = False) -> str:
    value, lo, hi = row[name], row[f"{name}_lo"], row[f"{name}_hi"]
    if math.isnan(value):
        return "–"
    return f"{value:.2f} [{lo:.2f}, {hi:.2f}]" if not latex else f"{value:.2f} \\scriptsize{{[{lo:.2f}, {hi:.2f}]}}"


def paper_table(settings: dict[Setting, dict], toxicity: str, alpha: float, note: str | None, judged: set[str] = frozenset()) -> tuple[str, str]:
    """Per target (and setting): toxicity and perplexity of the target alone (alpha 0) and with each
    method: a judged method (fusion) at `alpha`, any other at its strongest setting."""
    judged_alphas = sorted({s.alpha for s, r in settings.items() if r["method"] in judged})
    if judged_alphas and alpha not in judged_alphas:
        raise ValueError(f"alpha={alpha} must be in the grid; its alphas are {judged_alphas}")
    groups = by_target(settings)
    header = ["target", "method", f"{toxicity}: target alone", f"{toxicity}: with the method", "perplexity: alone", "perplexity: with the method"]
    md = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    tex = ["\\begin{tabular}{llcccc}", "\\toprule", "Target & Method & Tox. alone & Tox. with method & PPL alone & PPL with method \\\\", "\\midrule"]
    lines: dict[str, list] = {}
    for setting, row in settings.items():
        lines.setdefault(setting.line, []).append((setting.alpha, row))
    for line in sorted(lines):
        points = sorted(lines[line], key=lambda p: p[0])
        if all(r["target_alone"] for _, r in points):  # the base itself
            continue
        method = next(r["method"] for _, r in points if not r["target_alone"])
        shown, row = next(((a, r) for a, r in points if a == alpha), (None, None)) if method in judged else points[-1]
        base = base_of(row, groups[row.get("group", row["target"])]) if row is not None else None
        if row is None or base is None:
            continue
        target = row.get("group", row["target"]) + (f" ({row['setting']})" if row["setting"] else "")
        if row.get("shared_prompts"):  # prompt sets differ: both read on the prompts they share
            base, row = (on_prompts(r, prompt_ids(base) & prompt_ids(row), toxicity) for r in (base, row))
            target += f" (on the {row['prompts']} prompts both ran)"
        label = f"{method} α={shown:g}" if shown else method
        md.append(f"| {target} | {label} | {fmt(base, toxicity)} | {fmt(row, toxicity)} | {fmt(base, 'perplexity')} | {fmt(row, 'perplexity')} |")
        tex_label = label.replace("_", "\\_").replace("α", "$\\alpha$")
        tex.append(
            f"{target.replace('_', chr(92) + '_')} & {tex_label} & {fmt(base, toxicity, True)} & {fmt(row, toxicity, True)} & "
            f"{fmt(base, 'perplexity', True)} & {fmt(row, 'perplexity', True)} \\\\"
        )
    tex += ["\\bottomrule", "\\end{tabular}"]
    if note:
        md += ["", f"Note: {note}."]
        tex.append(f"% {note}")
    return "\n".join(md), "\n".join(tex)


def plot(settings: dict[Setting, dict], toxicity: str, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    lines: dict[str, list] = {}
    for setting, row in settings.items():
        lines.setdefault(setting.line, []).append((setting.alpha, row))
    groups = by_target(settings)
    for points in lines.values():  # a strength sweep starts from its target alone (α = 0), drawn on its line too
        rows = [r for _, r in points if not r["target_alone"]]
        base = base_of(rows[0], groups[rows[0].get("group", rows[0]["target"])]) if rows else None
        if len({a for a, _ in points}) > 1 and base is not None and all(a > 0 for a, _ in points):
            points.append((0.0, base))
    written = []
    for name in (toxicity, "perplexity"):
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for label, points in sorted(lines.items()):
            points.sort(key=lambda p: p[0])
            xs = [a for a, _ in points]
            ax.plot(xs, [r[name] for _, r in points], marker="o", label=label)
            ax.fill_between(xs, [max(r[f"{name}_lo"], 0.0) for _, r in points], [r[f"{name}_hi"] for _, r in points], alpha=0.2)
        fit_axis(ax, "y", [r[name] for points in lines.values() for _, r in points], log=name == "perplexity")
        ax.set_xlabel("α (weight of the calibration state)")
        ax.set_ylabel(name)
        ax.legend(fontsize=7)
        written.append(save(fig, out_dir / f"{name}_vs_alpha.png"))
    fig, ax = plt.subplots(figsize=(5, 3.5))
    labels = Labels(ax)
    for label, points in sorted(lines.items()):
        points.sort(key=lambda p: p[0])
        ax.plot([r["perplexity"] for _, r in points], [r[toxicity] for _, r in points], marker="o", label=label)
        for alpha, r in points:
            labels.add(f"{alpha:g}", r["perplexity"], r[toxicity])
    fit_axis(ax, "x", [r["perplexity"] for points in lines.values() for _, r in points], log=True)
    fit_axis(ax, "y", [r[toxicity] for points in lines.values() for _, r in points])
    ax.set_xlabel("perplexity (lower is more fluent)")
    ax.set_ylabel(f"{toxicity} (lower is safer)")
    ax.legend(fontsize=7)
    written.append(save(fig, out_dir / "tradeoff.png"))
    return written


def build_report(
    paths: list[str | Path],
    out_dir: str | Path,
    alpha: float = 0.3,
    goal: dict | None = None,
    confirm: dict | None = CONFIRM,
    resamples: int = 1000,
    held_out_scorer=None,
    subsets: dict | None = SUBSETS,
) -> dict:
    """The report's files in `out_dir`; `held_out_scorer` (a scorer object): goal.md also rechecks each
    target's chosen setting with every continuation scored again by it (calibfuse.reporting.recheck);
    `subsets` (None: off): subsets.md, results by the prompt's own score (calibfuse.reporting.subsets)."""
    goal, subsets = checked_goal(goal), checked_subsets(subsets)
    cells, meta = load_cells(paths)
    metrics = list(meta["metrics"])
    toxicity = toxicity_metric(metrics)
    if toxicity is None or "perplexity" not in metrics:
        raise ValueError(f"the grids report {metrics}; a report needs a toxicity metric and perplexity")
    settings = by_setting(cells, metrics + [d for d in DIAGNOSTIC_COLUMNS if d not in metrics and any(d in c for c in cells)])
    add_paired(settings, toxicity, meta["empty"], meta["threshold"], resamples)
    add_quality(settings, cells, resamples)  # neutral perplexity and dist-n, paired (quality.md, summary.json)
    add_capability(settings, cells, resamples)  # zero-shot accuracy per task, paired by item (capability.md, summary.json)
    for setting, row in settings.items():
        if not all(isinstance(row.get(k), float) and math.isfinite(row[k]) for k in (toxicity, "perplexity")):
            values = f"{toxicity} {row.get(toxicity)}, perplexity {row.get('perplexity')}"
            log.warning("%s at alpha %g has %s: not a number, so it is left off the frontier", setting.line, setting.alpha, values)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    markdown, latex = paper_table(settings, toxicity, float(alpha), meta.get("scorer_note"), roles(settings, goal)[0])
    (out_dir / "table.md").write_text(markdown + "\n", encoding="utf-8")
    (out_dir / "table.tex").write_text(latex + "\n", encoding="utf-8")
    header = ["target", "alpha", "seeds", *metrics]
    full = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    full += [f"| {t} | {a:g} | {r['seeds']} | " + " | ".join(fmt(r, n) for n in metrics) + " |" for s, r in settings.items() for t, a in [(s.line, s.alpha)]]
    (out_dir / "grid.md").write_text("\n".join(full) + "\n", encoding="utf-8")
    plots = plot(settings, toxicity, out_dir) + [plot_frontier(settings, toxicity, out_dir)]
    plots += [p for p in [plot_paired(settings, toxicity, out_dir, goal)] if p]
    best = frontier_table(settings, toxicity)
    (out_dir / "frontier.md").write_text(best + "\n", encoding="utf-8")
    (out_dir / "quality.md").write_text(quality_table(settings) + "\n", encoding="utf-8")
    (out_dir / "capability.md").write_text(capability_table(settings) + "\n", encoding="utf-8")
    verdict = goal_table(settings, toxicity, goal, confirm)
    if held_out_scorer is not None:
        options = {"empty": meta["empty"], "threshold": meta["threshold"], "resamples": resamples}
        verdict += "\n\n" + recheck_table(settings, toxicity, held_out_scorer, goal, confirm, options, meta["scorer"])
    (out_dir / "goal.md").write_text(verdict + "\n", encoding="utf-8")
    summary = summary_rows(settings, toxicity, goal, confirm)  # meets_goal by the same goal and split as goal.md
    by_subset, empty = subset_changes(settings, toxicity, subsets, resamples)
    if subsets:
        (out_dir / "subsets.md").write_text(subsets_table(by_subset, empty, toxicity, subsets) + "\n", encoding="utf-8")
    (out_dir / "summary.json").write_text(json.dumps(with_subsets(summary, by_subset) if by_subset else summary, indent=1) + "\n", encoding="utf-8")
    log.info("report: %d cells from %d setting(s) -> %s", len(cells), len(settings), out_dir)
    return {
        "summary": summary,
        "markdown": markdown,
        "latex": latex,
        "frontier": best,
        "quality": str(out_dir / "quality.md"),
        "capability": str(out_dir / "capability.md"),
        "goal": verdict,
        "plots": [str(p) for p in plots],
        "cells": len(cells),
        "groups": sorted(g for g in meta["groups"] if g),
        "out_dir": str(out_dir),
    }


def log_summary(report: dict, logger_cfg: DictConfig | None) -> None:
    """The report to W&B (a run of its own, job type `report`): every setting as one summary table with
    its frontier flag, the frontier table and every plot. Unless the config names a group, the run joins
    the group of the jobs it reports on, when they share one, so a dashboard shows it beside them."""
    group = jobs_group(report, logger_cfg)
    if group:
        logger_cfg = OmegaConf.merge(logger_cfg, {"wandb": {"group": group}})
    for logger in instantiate_group(logger_cfg, "logger"):
        if type(logger).__name__ != "WandbLogger":
            continue
        import wandb

        rows = report["summary"]
        table = wandb.Table(columns=list(rows[0]), data=[list(r.values()) for r in rows])
        logger.experiment.log({"summary": table} | {f"plots/{Path(p).stem}": wandb.Image(p) for p in report["plots"]})
        logger.finalize("success")
    finish_wandb()


def jobs_group(report: dict, logger_cfg: DictConfig | None) -> str | None:
    """The W&B group of the jobs a report reads, when they share one and the config leaves the report's
    own default group (`report`); else None."""
    groups = report.get("groups") or []
    wandb = logger_cfg.get("wandb") if logger_cfg else None
    if wandb is None or len(groups) != 1 or wandb.get("group") not in (None, "report"):
        return None
    return groups[0]


def printable(report: dict) -> str:
    """What a report run prints: the paper's table, the frontier and the goal's verdict."""
    return f"{report['markdown']}\n\nPareto frontier (toxicity vs perplexity, per target):\n{report['frontier']}\n\n{report['goal']}"
