"""A report's input: every cell of the grid.json files under the runs given, with its generations (each
with its prompt's own scores, from prompt_scores.jsonl), its setting's key and description, and its
grid's protocol; a multirun's unfinished jobs named."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from calibfuse.data.rows import jsonl_objects
from calibfuse.evaluation.results import read_prompt_scores
from calibfuse.reporting.settings import legacy_identity

log = logging.getLogger(__name__)


def load_cells(paths: list[str | Path]) -> tuple[list[dict], dict]:
    """Every cell of every grid.json under `paths`, each with its generations (`rows`, from the
    generations.jsonl beside it; None for older runs), its setting's key and description
    (calibfuse.reporting.settings) and its grid's protocol options. A cell reused by several runs counts
    once: a setting's cells are told apart by seed only."""
    files = []
    for path in map(Path, paths):
        if not path.exists():
            raise FileNotFoundError(f"report input {str(path)!r} does not exist; expected a run, multirun or pipeline dir")
        files += [path] if path.is_file() else sorted(path.rglob("grid.json"))
        if path.is_dir():
            warn_unfinished_jobs(path)
    if not files:
        raise FileNotFoundError(f"no grid.json under {[str(p) for p in paths]}; expected dirs written by calibfuse.evaluate or calibfuse.pipeline")
    cells, meta, seen = [], {}, set()
    for file in files:
        try:
            grid = json.loads(file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"{file} is not valid JSON ({error}); expected a grid.json as calibfuse.evaluate writes it: rerun that grid") from None
        protocol = (grid.get("config") or {}).get("protocol") or {}
        options = {"empty_rule": protocol.get("empty_continuations", "score"), "threshold": protocol.get("toxicity_threshold", 0.5)}
        if not meta:
            meta = {k: grid.get(k) for k in ("protocol", "metrics", "scorer", "reference_lm", "prompts")} | {"notes": {}, "groups": set()}
            meta |= {"empty": options["empty_rule"], "threshold": options["threshold"]}
        if grid.get("metrics") != meta["metrics"]:
            raise ValueError(f"{file} reports {grid.get('metrics')} but {meta['metrics']} came first; report one protocol at a time")
        if grid.get("scorer_note"):
            meta["notes"].setdefault(grid.get("scorer"), grid["scorer_note"])
        meta["groups"].add(((grid.get("config") or {}).get("logger") or {}).get("wandb", {}).get("group"))
        generations = load_generations(file.parent / "generations.jsonl")
        scores = read_prompt_scores(file.parent)  # the prompts' own scores, for subsets.md ({}: an older grid, every prompt unscored)
        for row in (r for rows in (generations or {}).values() for r in rows):
            row["prompt_scores"] = scores.get(row["prompt_id"])
        legacy = False
        for cell in grid["cells"]:
            cell = {"setting": "", **cell, **options}
            if not cell.get("setting_key"):
                legacy = True
                cell["setting_key"], cell["decided_by"] = legacy_identity(cell, grid)
            if (cell["setting_key"], cell["seed"]) in seen:  # the same cell, reused by another run
                continue
            seen.add((cell["setting_key"], cell["seed"]))
            cell["rows"] = generations.get((cell["target"], cell["method"], cell["alpha"], cell["seed"])) if generations else None
            cells.append(cell)
        if legacy:
            log.warning("%s predates setting keys: its settings are told apart by target, method, alpha, run label, scorer and prompt count", file)
    meta["scorer_note"] = "; ".join(f"{n}: {note}" if len(meta["notes"]) > 1 else note for n, note in meta["notes"].items()) or None
    return label_by_what_varies(cells), meta


def warn_unfinished_jobs(path: Path) -> list[Path]:
    """A multirun's jobs that did not finish (no evaluate.json or pipeline.json): failed or still running.
    The report over the sweep names them, so a missing arm is not mistaken for one that was never asked for."""
    if not (path / "multirun.yaml").is_file():
        return []
    unfinished = []
    for job in sorted(p for p in path.iterdir() if is_multirun_job(p)):
        if not any(job.rglob("evaluate.json")) and not (job / "pipeline.json").is_file():
            overrides = (job / ".hydra" / "overrides.yaml").read_text(encoding="utf-8").replace("\n", " ").strip()
            log.warning(
                "multirun job %s did not finish (failed, stopped or still running; overrides: %s): its cells are missing from the report",
                job,
                overrides,
            )
            unfinished.append(job)
    return unfinished


def is_multirun_job(directory: Path) -> bool:
    """A job dir of a multirun (not a single run kept in the sweep dir, such as its report)."""
    hydra = directory / ".hydra" / "hydra.yaml"
    return hydra.is_file() and (directory / ".hydra" / "overrides.yaml").is_file() and "mode: MULTIRUN" in hydra.read_text(encoding="utf-8")


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
    """Drop from every cell's run label (`setting`: a pipeline job's overrides) the overrides that all the
    report's labels share: a multirun over alphas with method_names=[fusion] on every job is labelled by
    alpha, not by method_names. A label is only a name: cells are grouped by their setting key."""
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
