"""The report from grid files: cells read and grouped by setting, the paper-style table (Markdown and
LaTeX), the plots, and the frontier and verdict from calibfuse.reporting.pareto and .verdict. The
entry point, with its usage and outputs, is calibfuse.report."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from calibfuse.data.rows import jsonl_objects
from calibfuse.evaluation.paired import toxicity_metric
from calibfuse.methods import role_of
from calibfuse.reporting.pareto import DIAGNOSTIC_COLUMNS, frontier_table, plot_frontier, plot_paired, summary_rows
from calibfuse.reporting.recheck import recheck_table
from calibfuse.reporting.verdict import CONFIRM, add_paired, checked_goal, goal_table, roles
from calibfuse.utils.run import finish_wandb, instantiate_group

log = logging.getLogger(__name__)


def plain(node):
    """A config node as plain Python (`goal`, `confirm`); a string (confirm=held_out) or None as it is."""
    return OmegaConf.to_container(node) if OmegaConf.is_config(node) else node or None


def load_cells(paths: list[str | Path]) -> tuple[list[dict], dict]:
    """Every cell of every grid.json under `paths` (a cell reused by several runs counts once), each
    with its generations (`rows`, from the generations.jsonl beside it; None for older runs)."""
    files = []
    for path in map(Path, paths):
        if not path.exists():
            raise FileNotFoundError(f"report input {str(path)!r} does not exist; expected a run, multirun or pipeline dir")
        files += [path] if path.is_file() else sorted(path.rglob("grid.json"))
    if not files:
        raise FileNotFoundError(f"no grid.json under {[str(p) for p in paths]}; expected dirs written by calibfuse.evaluate or calibfuse.pipeline")
    cells, meta, seen = [], {}, set()
    for file in files:
        try:
            grid = json.loads(file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"{file} is not valid JSON ({error}); expected a grid.json as calibfuse.evaluate writes it: rerun that grid") from None
        if not meta:
            meta = {k: grid.get(k) for k in ("protocol", "metrics", "scorer", "scorer_note", "reference_lm", "prompts")}
            protocol = (grid.get("config") or {}).get("protocol") or {}
            meta |= {"empty": protocol.get("empty_continuations", "score"), "threshold": protocol.get("toxicity_threshold", 0.5)}
        if grid.get("metrics") != meta["metrics"]:
            raise ValueError(f"{file} reports {grid.get('metrics')} but {meta['metrics']} came first; report one protocol at a time")
        generations = load_generations(file.parent / "generations.jsonl")
        for cell in grid["cells"]:
            key = (cell.get("cell") or (cell["target"], cell["alpha"], cell["seed"]), cell.get("setting", ""), cell.get("method"))
            if key not in seen:
                seen.add(key)
                cell = {"setting": "", **cell}
                cell["rows"] = generations.get((cell["target"], cell["method"], cell["alpha"], cell["seed"])) if generations else None
                cells.append(cell)
    return label_by_what_varies(cells), meta


def overrides_of(setting: str) -> list[str]:
    """A setting's `key=value` parts (Hydra's override_dirname), splitting on commas outside brackets."""
    parts, depth, current = [], 0, ""
    for char in setting:
        depth += (char in "[{(") - (char in "]})")
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    return [*parts, current] if current else parts


def label_by_what_varies(cells: list[dict]) -> list[dict]:
    """Drop from every cell's setting the overrides that all the report's settings share: a multirun
    over alphas with method_names=[fusion] on every job is labelled by alpha, not by method_names."""
    settings = {c["setting"] for c in cells}
    parsed = {s: overrides_of(s) for s in settings}
    if not all(all("=" in part for part in parts) for parts in parsed.values()):  # a label a user chose stays as it is
        return cells
    common = set.intersection(*(set(parts) for parts in parsed.values()))
    for cell in cells:
        cell["setting"] = ",".join(part for part in parsed[cell["setting"]] if part not in common)
    return cells


def load_generations(path: Path) -> dict[tuple, list[dict]] | None:
    """A grid's generations by cell (target, method, alpha, seed: one grid has one setting), or None."""
    if not path.is_file():
        return None
    by_cell: dict[tuple, list[dict]] = {}
    for _, row in jsonl_objects(path):  # a damaged line is named by file and line
        by_cell.setdefault((row["target"], row["method"], row["alpha"], row["seed"]), []).append(row)
    return by_cell


def over_seeds(values: list[float]) -> tuple[float, float, float]:
    """Mean of per-seed values and its 95 % t-interval over seeds (interval ends are never averaged)."""
    from scipy import stats

    n = len(values)
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    t = float(stats.t.ppf(0.975, n - 1))
    return mean, mean - t * sd / math.sqrt(n), mean + t * sd / math.sqrt(n)


def by_setting(cells: list[dict], metrics: list[str]) -> dict[tuple, dict]:
    """(line, alpha) -> metrics, where a line names the target and, when they vary, the method and the
    setting (e.g. an ablation's value). One seed: the cell's point and bootstrap interval over prompts.
    Several seeds: the mean over seeds and a t-interval over seeds (the seeds' spread, not averaged ends)."""
    groups: dict[tuple, list[dict]] = {}
    methods = {c["method"] for c in cells}
    for cell in cells:
        parts = [cell["target"]] + ([cell["method"]] if len(methods) > 1 else []) + ([cell["setting"]] if cell["setting"] else [])
        line = parts[0] + (f" ({', '.join(parts[1:])})" if parts[1:] else "")
        groups.setdefault((line, cell["alpha"]), []).append(cell)
    merged = {}
    for key, group in sorted(groups.items()):
        row = {
            "seeds": len(group),
            "target": group[0]["target"],
            "method": group[0]["method"],
            "role": role_of(group[0]),  # what the method says it is: method | baseline | diagnostic
            "setting": group[0]["setting"],
            "target_alone": all(target_alone(c) for c in group),
            "degenerate": any(c.get("degenerate") for c in group),
            # every seed's generations, for paired comparisons (seeds nested within a prompt)
            "rows": [r for c in group for r in c["rows"]] if all(c.get("rows") for c in group) else None,
        }
        for name in metrics:
            values = [c[name] for c in group if c.get(name) is not None]
            if len(values) > 1:
                row[name], row[f"{name}_lo"], row[f"{name}_hi"] = over_seeds(values)
            else:
                single = next((c for c in group if c.get(name) is not None), {})
                row[name], row[f"{name}_lo"], row[f"{name}_hi"] = (single.get(name + s, math.nan) for s in ("", "_lo", "_hi"))
        merged[key] = row
    return merged


def target_alone(cell: dict) -> bool:
    """A cell of the target as it is (`none`, fusion at alpha 0); grids before the column existed: alpha 0."""
    if "target_alone" in cell:
        return bool(cell["target_alone"])
    return cell["alpha"] == 0.0


def fmt(row: dict, name: str, latex: bool = False) -> str:
    value, lo, hi = row[name], row[f"{name}_lo"], row[f"{name}_hi"]
    if math.isnan(value):
        return "–"
    return f"{value:.2f} [{lo:.2f}, {hi:.2f}]" if not latex else f"{value:.2f} \\scriptsize{{[{lo:.2f}, {hi:.2f}]}}"


def paper_table(settings: dict[tuple, dict], toxicity: str, alpha: float, note: str | None, judged: set[str] = frozenset()) -> tuple[str, str]:
    """Per target (and setting): toxicity and perplexity of the target alone (alpha 0) and with each
    method: a judged method (fusion) at `alpha`, any other at its strongest setting."""
    judged_alphas = sorted({a for (_, a), r in settings.items() if r["method"] in judged})
    if judged_alphas and alpha not in judged_alphas:
        raise ValueError(f"alpha={alpha} must be in the grid; its alphas are {judged_alphas}")
    base_of = {(r["target"], r["setting"]): r for r in settings.values() if r["target_alone"]}
    header = ["target", "method", f"{toxicity}: target alone", f"{toxicity}: with the method", "perplexity: alone", "perplexity: with the method"]
    md = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    tex = ["\\begin{tabular}{llcccc}", "\\toprule", "Target & Method & Tox. alone & Tox. with method & PPL alone & PPL with method \\\\", "\\midrule"]
    lines: dict[str, list] = {}
    for (line, a), row in settings.items():
        lines.setdefault(line, []).append((a, row))
    for line in sorted(lines):
        points = sorted(lines[line], key=lambda p: p[0])
        method = points[0][1]["method"]
        if all(r["target_alone"] for _, r in points):  # the base itself
            continue
        shown, row = next(((a, r) for a, r in points if a == alpha), (None, None)) if method in judged else points[-1]
        base = base_of.get((points[0][1]["target"], points[0][1]["setting"]))
        if row is None or base is None:
            continue
        target = points[0][1]["target"] + (f" ({points[0][1]['setting']})" if points[0][1]["setting"] else "")
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


def plot(settings: dict[tuple, dict], toxicity: str, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    lines: dict[str, list] = {}
    for (line, alpha), row in settings.items():
        lines.setdefault(line, []).append((alpha, row))
    written = []
    for name in (toxicity, "perplexity"):
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for label, points in sorted(lines.items()):
            points.sort(key=lambda p: p[0])
            xs = [a for a, _ in points]
            ax.plot(xs, [r[name] for _, r in points], marker="o", label=label)
            ax.fill_between(xs, [r[f"{name}_lo"] for _, r in points], [r[f"{name}_hi"] for _, r in points], alpha=0.2)
        ax.set_xlabel("α (weight of the calibration state)")
        ax.set_ylabel(name)
        ax.legend(fontsize=7)
        fig.tight_layout()
        written.append(out_dir / f"{name}_vs_alpha.png")
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for label, points in sorted(lines.items()):
        points.sort(key=lambda p: p[0])
        ax.plot([r["perplexity"] for _, r in points], [r[toxicity] for _, r in points], marker="o", label=label)
        for alpha, r in points:
            ax.annotate(f"{alpha:g}", (r["perplexity"], r[toxicity]), fontsize=6, textcoords="offset points", xytext=(3, 3))
    ax.set_xlabel("perplexity (lower is more fluent)")
    ax.set_ylabel(f"{toxicity} (lower is safer)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    written.append(out_dir / "tradeoff.png")
    fig.savefig(written[-1], dpi=120)
    plt.close(fig)
    return written


def build_report(
    paths: list[str | Path],
    out_dir: str | Path,
    alpha: float = 0.3,
    goal: dict | None = None,
    confirm: dict | None = CONFIRM,
    resamples: int = 1000,
    held_out_scorer=None,
) -> dict:
    """The report's files in `out_dir`; `held_out_scorer` (a scorer object): goal.md also rechecks each
    target's chosen setting with every continuation scored again by it (calibfuse.reporting.recheck)."""
    goal = checked_goal(goal)
    cells, meta = load_cells(paths)
    metrics = list(meta["metrics"])
    toxicity = toxicity_metric(metrics)
    if toxicity is None or "perplexity" not in metrics:
        raise ValueError(f"the grids report {metrics}; a report needs a toxicity metric and perplexity")
    settings = by_setting(cells, metrics + [d for d in DIAGNOSTIC_COLUMNS if d not in metrics and any(d in c for c in cells)])
    add_paired(settings, toxicity, meta["empty"], meta["threshold"], resamples)
    for (line, at), row in settings.items():  # not `alpha`: that is the table's column
        if not all(isinstance(row.get(k), float) and math.isfinite(row[k]) for k in (toxicity, "perplexity")):
            values = f"{toxicity} {row.get(toxicity)}, perplexity {row.get('perplexity')}"
            log.warning("%s at alpha %g has %s: not a number, so it is left off the frontier", line, at, values)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    markdown, latex = paper_table(settings, toxicity, float(alpha), meta.get("scorer_note"), roles(settings, goal)[0])
    (out_dir / "table.md").write_text(markdown + "\n", encoding="utf-8")
    (out_dir / "table.tex").write_text(latex + "\n", encoding="utf-8")
    header = ["target", "alpha", "seeds", *metrics]
    full = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    full += [f"| {t} | {a:g} | {r['seeds']} | " + " | ".join(fmt(r, n) for n in metrics) + " |" for (t, a), r in settings.items()]
    (out_dir / "grid.md").write_text("\n".join(full) + "\n", encoding="utf-8")
    plots = plot(settings, toxicity, out_dir) + [plot_frontier(settings, toxicity, out_dir)]
    plots += [p for p in [plot_paired(settings, toxicity, out_dir, goal)] if p]
    best = frontier_table(settings, toxicity)
    (out_dir / "frontier.md").write_text(best + "\n", encoding="utf-8")
    verdict = goal_table(settings, toxicity, goal, confirm)
    if held_out_scorer is not None:
        options = {"empty": meta["empty"], "threshold": meta["threshold"], "resamples": resamples}
        verdict += "\n\n" + recheck_table(settings, toxicity, held_out_scorer, goal, confirm, options, meta["scorer"])
    (out_dir / "goal.md").write_text(verdict + "\n", encoding="utf-8")
    summary = summary_rows(settings, toxicity, goal, confirm)  # meets_goal by the same goal and split as goal.md
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    log.info("report: %d cells from %d setting(s) -> %s", len(cells), len(settings), out_dir)
    return {
        "summary": summary,
        "markdown": markdown,
        "latex": latex,
        "frontier": best,
        "goal": verdict,
        "plots": [str(p) for p in plots],
        "cells": len(cells),
        "out_dir": str(out_dir),
    }


def log_summary(report: dict, logger_cfg: DictConfig | None) -> None:
    """The report to W&B (a run of its own, job type `report`): every setting as one summary table with
    its frontier flag, the frontier table and the Pareto plot."""
    for logger in instantiate_group(logger_cfg, "logger"):
        if type(logger).__name__ != "WandbLogger":
            continue
        import wandb

        rows = report["summary"]
        table = wandb.Table(columns=list(rows[0]), data=[list(r.values()) for r in rows])
        logger.experiment.log({"summary": table, "pareto": wandb.Image(str(Path(report["out_dir"]) / "pareto.png"))})
        logger.finalize("success")
    finish_wandb()


def printable(report: dict) -> str:
    """What a report run prints: the paper's table, the frontier and the goal's verdict."""
    return f"{report['markdown']}\n\nPareto frontier (toxicity vs perplexity, per target):\n{report['frontier']}\n\n{report['goal']}"
