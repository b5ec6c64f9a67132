"""The grid's files: grid.json, grid.csv and generations.jsonl of the cells finished so far (each
replaced atomically as a cell finishes), prompt_scores.jsonl (the prompts' own scores, for the report's
subsets), and the grid as a Markdown table."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

from calibfuse.data.rows import jsonl_objects
from calibfuse.utils.files import write_json, write_text

GENERATION_FIELDS = ("target", "method", "alpha", "seed", "prompt_id", "prompt", "sample", "continuation", "toxicity", "loss", "new_tokens")


def write_grid(output_dir: Path, grid: list[dict], generations: list[list[dict]], meta: dict) -> None:
    json_safe = [{k: None if isinstance(v, float) and math.isnan(v) else v for k, v in row.items()} for row in grid]
    write_json(output_dir / "grid.json", {**meta, "cells": json_safe})
    if grid:
        text = io.StringIO()
        flat_rows = [scalar_columns(row) for row in grid]  # decided_by stays in grid.json
        writer = csv.DictWriter(text, fieldnames=list(dict.fromkeys(k for row in flat_rows for k in row)))
        writer.writeheader()
        writer.writerows(flat_rows)
        write_text(output_dir / "grid.csv", text.getvalue())
    write_text(output_dir / "generations.jsonl", "".join(json.dumps(generation_record(row), ensure_ascii=False) + "\n" for rows in generations for row in rows))


def scalar_columns(row: dict) -> dict:
    """A grid row's columns that fit a CSV cell or a W&B table column: its nested descriptions left out."""
    return {k: v for k, v in row.items() if not isinstance(v, (dict, list))}


def generation_record(row: dict) -> dict:
    """A generation as generations.jsonl holds it: the fixed fields, then the scorer's labels if it has several."""
    diagnostics = {k: row[k] for k in ("kl", "agreement", "ended_with_eos") if k in row}
    return {k: row[k] for k in GENERATION_FIELDS} | diagnostics | ({"attributes": row["attributes"]} if row.get("attributes") else {})


def _number(value, spec: str) -> str:
    """A diagnostic, or – where it does not apply (NaN, None: another LM generated, or the prompt was rewritten)."""
    return "–" if value is None or value != value else format(value, spec)


def paired(row: dict, name: str, as_change: bool = False) -> str:
    """A paired comparison against the target alone, as a relative change with its 95 % interval:
    -25% [-42%, -4%]; – where there is none (the target alone itself, or no base in the run)."""
    value = row.get(name)
    if value is None or value != value:
        return "–"
    shift = 1.0 if as_change else 0.0  # a ratio is shown as its change: 1.05 -> +5%
    lo, hi = row.get(name + "_lo"), row.get(name + "_hi")
    interval = f" [{lo - shift:+.0%}, {hi - shift:+.0%}]" if lo is not None and math.isfinite(lo) else ""  # none: unpaired means
    return f"{value - shift:+.0%}{interval}"


def format_table(grid: list[dict], names: list[str]) -> str:
    """The grid as a Markdown table, each metric with its interval, and the paired change in toxicity
    and perplexity against the target alone on the same prompts."""
    header = ["target", "method", "alpha", "seed", *names, "Δ toxicity (paired)", "Δ perplexity (paired)", "KL", "top-1 agree", "empty", "degenerate", "tok/s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in grid:
        cells = [row["target"], row["method"], f"{row['alpha']:g}", str(row["seed"])]
        cells += [f"{row[n]:.2f} [{row[f'{n}_lo']:.2f}, {row[f'{n}_hi']:.2f}]" for n in names]
        cells += [paired(row, "toxicity_change"), paired(row, "perplexity_ratio", as_change=True)]
        cells += [
            _number(row.get("kl", 0.0), ".3f"),
            _number(row.get("top1_agreement", 1.0), ".2f"),
            str(row["empty"]),
            "yes" if row.get("degenerate") else "no",
            f"{row['tokens_per_second']:.1f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def sample_rows(generations: list[list[dict]], per_cell: int) -> list[dict]:
    """The first `per_cell` generations of every cell, for a table of examples."""
    return [{k: row[k] for k in ("target", "method", "alpha", "seed", "prompt", "continuation", "toxicity")} for rows in generations for row in rows[:per_cell]]


PROMPT_SCORES = "prompt_scores.jsonl"  # beside grid.json: every prompt of the grid and its own scores


def write_prompt_scores(output_dir: Path, prompts: list) -> None:
    """One line per prompt of the grid: its id and the source's scores of the prompt text (Perspective
    attributes; None where the source has none). Kept beside the cells, not in them: cell keys and
    stored cells stay as they are, and a rerun that reuses every cell still writes it."""
    write_text(output_dir / PROMPT_SCORES, "".join(json.dumps({"prompt_id": p.id, "scores": p.scores}, ensure_ascii=False) + "\n" for p in prompts))


def read_prompt_scores(run_dir: Path) -> dict[str, dict | None]:
    """prompt_id -> its scores (None: unscored) from a grid's prompt_scores.jsonl; {} for grids written before it."""
    path = run_dir / PROMPT_SCORES
    if not path.is_file():
        return {}
    return {row["prompt_id"]: row.get("scores") for _, row in jsonl_objects(path)}  # a damaged line is named by file and line
