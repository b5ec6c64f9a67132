"""What a report row stands for and what it is compared with.

A *setting* is everything that decides its cells but the seed: target, method, strength, the method's
knobs (fusion options, calibration model, alignment), prompts, decoding, scorer and reference LM. Its
identity is the grid's `setting_key` (calibfuse.evaluation.cells.setting_key), never a label a user
set, so a report pools only true repeats (distinct seeds of one setting) and never two arms of an
ablation. Settings are shown by what varies across the runs given:

- a *group* is a target under one comparison context (scorer, protocol, reference LM, decoding, prompt
  format, and the prompt set of its target alone); its name adds the context keys that vary, e.g.
  `gemma3-270m [scorer.name=profanity_check]`. Settings are only compared within a group.
- a *line* is a group plus the method and the knobs that vary within it, e.g. `(fusion.layer_norm=none)`.

A setting is compared with the target alone of its group on the prompts both ran: the same prompt set
when there is one, else the most prompts shared (the report says how many); sharing none is refused.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

from calibfuse.methods import role_of
from calibfuse.utils.files import sha256_json

log = logging.getLogger(__name__)

# Context keys that describe the run, not the comparison: the prompt set is matched by its prompts.
PROMPTS = "prompts"


@dataclass(frozen=True, order=True)
class Setting:
    """A report row's identity. `key` (sha256 of what decides its cells, seeds aside) is what it is;
    `group`, `line` and `alpha` are how it is shown and sorted."""

    group: str  # the target, plus the comparison context where a report spans several
    line: str  # the group, plus the method and knobs that vary within it
    alpha: float
    key: str


def legacy_identity(cell: dict, grid: dict) -> tuple[str, dict]:
    """A setting key and description for a cell from a grid written before grids recorded them: told
    apart by target, method, strength, run label, scorer and prompt count."""
    alone = bool(cell.get("target_alone", cell["alpha"] == 0.0))
    method = "none" if alone else cell["method"]
    context = {"scorer.name": cell.get("scorer") or grid.get("scorer"), PROMPTS: f"{grid.get('prompt_source')} ({grid.get('prompts')} prompts)"}
    setting = {"method": method, "alpha": cell["alpha"]} | ({"run": cell["setting"]} if cell.get("setting") and not alone else {})
    key = sha256_json({"legacy": True, "target": cell["target"], "setting": setting, "context": context})
    return key, {"setting": setting, "context": context}


def prompt_ids(row: dict) -> set[str]:
    return {r["prompt_id"] for r in row.get("rows") or []}


def match_bases(rows: list[dict]) -> None:
    """Give every setting `base_key` (the target alone it is compared with), `shared_prompts` (how many
    prompts the two share, when their prompt sets differ) and `group_id` (target, comparison context,
    the base's prompt set). Refuses a setting whose only possible bases share none of its prompts."""
    for row in rows:
        context = row["decided_by"]["context"]
        row["compare"] = sha256_json({k: v for k, v in context.items() if k != PROMPTS})
        row["prompt_set"] = context.get(PROMPTS)
    bases = [r for r in rows if r["target_alone"]]
    for row in rows:
        base, shared = (row, None) if row["target_alone"] else find_base(row, bases)
        row["base_key"] = base["key"] if base else None
        row["shared_prompts"] = shared
        anchor = base or row
        row["group_id"] = (row["target"], anchor["compare"], anchor["prompt_set"])


def find_base(row: dict, bases: list[dict]) -> tuple[dict | None, int | None]:
    same = [b for b in bases if b["target"] == row["target"] and b["compare"] == row["compare"]]
    exact = [b for b in same if b["prompt_set"] == row["prompt_set"]]
    if exact or not same:
        return (exact[0] if exact else None), None
    mine = prompt_ids(row)
    counts = [(len(mine & prompt_ids(b)), b) for b in same]
    shared, base = max(counts, key=lambda c: c[0])
    if not shared:
        raise ValueError(
            f"{row['target']} {row['method']} α={row['alpha']:g} ran on prompts {row['prompt_set']!r} and its target alone on "
            f"{', '.join(repr(b['prompt_set']) for b in same)}: they share no prompt (or kept no generations), so nothing can be compared; "
            "report runs on the same prompts, or run the target alone on these prompts too"
        )
    log.warning(
        "%s %s α=%g is compared with its target alone on the %d prompts both ran (prompt sets differ)",
        *(row["target"], row["method"], row["alpha"], shared),
    )
    return base, shared


def varying(descriptions: list[dict]) -> list[str]:
    """The keys whose values differ across `descriptions` (a key some lack counts as varying), in first-seen order."""
    keys = list(dict.fromkeys(k for d in descriptions for k in d))
    return [k for k in keys if len({repr(d.get(k)) for d in descriptions}) > 1]


def shown(description: dict, keys: list[str]) -> list[str]:
    return [f"{k}={description[k]}" for k in keys if k in description]


def label_settings(rows: list[dict]) -> dict[Setting, dict]:
    """Each setting's group and line by what varies across the report's runs; rows keyed by `Setting`."""
    match_bases(rows)
    contexts: dict[tuple, dict] = {}
    for row in rows:
        contexts.setdefault(row["group_id"], row["decided_by"]["context"] if row["target_alone"] else {})
    for row in rows:  # a group without a target alone is described by its settings' context
        if not contexts[row["group_id"]]:
            contexts[row["group_id"]] = row["decided_by"]["context"]
    group_name = {}
    for target in {g[0] for g in contexts}:
        ids = [g for g in contexts if g[0] == target]
        keys = varying([contexts[g] for g in ids])
        for g in ids:
            parts = shown(contexts[g], keys)
            group_name[g] = target + (f" [{', '.join(parts)}]" if parts else "")
    methods = {r["method"] for r in rows if not r["target_alone"]}
    by_group: dict[tuple, list[dict]] = {}
    for row in rows:
        row["group"] = group_name[row["group_id"]]
        by_group.setdefault(row["group_id"], []).append(row)
    for members in by_group.values():
        for method in {r["method"] for r in members}:
            mine = [r for r in members if r["method"] == method and not r["target_alone"]]
            knobs = {id(r): {k: v for k, v in r["decided_by"]["setting"].items() if k not in ("method", "alpha")} for r in mine}
            # a knob varies when two settings at one strength differ in it (a knob that follows α is α's)
            keys = list(dict.fromkeys(k for a in {r["alpha"] for r in mine} for k in varying([knobs[id(r)] for r in mine if r["alpha"] == a])))
            for r in mine:
                user = r["user_label"]
                readable = [k for k in keys if not is_hash(knobs[id(r)].get(k))]
                r["setting"] = ", ".join(shown(knobs[id(r)], readable) + ([user] if user else []) or shown(knobs[id(r)], keys))
        seen: dict[tuple, list[dict]] = {}
        for r in members:
            seen.setdefault((r["method"], r["alpha"], r["setting"]), []).append(r)
        for same in seen.values():  # still alike by every shown key: told apart by their keys
            if len(same) > 1:
                for r in same:
                    r["setting"] = ", ".join(p for p in (r["setting"], f"setting {r['key'][:8]}") if p)
    settings = {}
    for row in rows:
        parts = ([row["method"]] if len(methods) > 1 and not row["target_alone"] else []) + ([row["setting"]] if row["setting"] else [])
        line = row["group"] + (f" ({', '.join(parts)})" if parts else "")
        settings[Setting(row["group"], line, row["alpha"], row["key"])] = row
    return dict(sorted(settings.items()))


def is_hash(value) -> bool:
    return isinstance(value, str) and len(value) == 12 and all(c in "0123456789abcdef" for c in value)


def over_seeds(values: list[float]) -> tuple[float, float, float]:
    """Mean of per-seed values and its 95 % t-interval over seeds (interval ends are never averaged),
    clipped at 0: every metric a grid reports is non-negative."""
    from scipy import stats

    n = len(values)
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    t = float(stats.t.ppf(0.975, n - 1))
    return mean, max(mean - t * sd / math.sqrt(n), 0.0), mean + t * sd / math.sqrt(n)


def by_setting(cells: list[dict], metrics: list[str]) -> dict[Setting, dict]:
    """Setting -> its metrics: cells grouped by setting key (calibfuse.reporting.settings), each setting
    labelled by what varies. One seed: the cell's point and bootstrap interval over prompts. Several
    seeds (distinct ones: a repeated seed is one cell): the mean over seeds and a t-interval over seeds."""
    for cell in cells:
        if not cell.get("setting_key"):  # cells built by hand (tests, notebooks): told apart as old grids are
            cell["setting_key"], cell["decided_by"] = legacy_identity(cell, {})
    groups: dict[str, dict] = {}
    for cell in cells:
        groups.setdefault(cell["setting_key"], {}).setdefault(cell["seed"], cell)
    rows = []
    for key, by_seed in groups.items():
        group = list(by_seed.values())
        labels = {c.get("setting", "") for c in group}
        row = {
            "key": key,
            "seeds": len(group),
            "target": group[0]["target"],
            "method": group[0]["method"],
            "alpha": group[0]["alpha"],
            "role": role_of(group[0]),  # what the method says it is: method | baseline | diagnostic
            "decided_by": group[0]["decided_by"],
            "user_label": labels.pop() if len(labels) == 1 else "",  # a run label shared by other settings names none of them
            "setting": "",
            "target_alone": all(target_alone(c) for c in group),
            "degenerate": any(c.get("degenerate") for c in group),
            "empty_rule": group[0].get("empty_rule", "score"),  # its grid's protocol: how its per-prompt toxicity is read
            "threshold": group[0].get("threshold", 0.5),
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
        rows.append(row)
    return label_settings(rows)


def target_alone(cell: dict) -> bool:
    """A cell of the target as it is (`none`, fusion at alpha 0); grids before the column existed: alpha 0."""
    if "target_alone" in cell:
        return bool(cell["target_alone"])
    return cell["alpha"] == 0.0
