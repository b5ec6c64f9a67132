"""The verdict rechecked by a held-out scorer: each target's setting as goal.md chose it (on the
selection prompts, by the grid's scorer), with every continuation scored again by a second scorer that
the choice never saw, judged by the same goal on the prompts goal.md judged it on. A cut that only one
classifier sees is that classifier's, not the model's."""

from __future__ import annotations

import logging
import math

from calibfuse.reporting.verdict import add_paired, checked_confirm, checked_goal, describe, goal_checks, split, verdict

log = logging.getLogger(__name__)


def rescored(settings: dict[tuple, dict], scorer) -> dict[tuple, dict]:
    """A copy of `settings` whose generations carry `scorer`'s toxicity (each distinct text scored once).
    A setting that kept no generations cannot be rescored: its toxicity figures become NaN, so that the
    grid scorer's numbers never pass for the second scorer's."""
    texts = sorted({r["continuation"] for row in settings.values() for r in row.get("rows") or []})
    scores = dict(zip(texts, (float(s) for s in scorer.score(texts)), strict=True)) if texts else {}
    copies = {}
    for key, row in settings.items():
        if row.get("rows"):
            copies[key] = {**row, "rows": [{**r, "toxicity": scores[r["continuation"]]} for r in row["rows"]]}
        else:
            copies[key] = {**row, **{k: math.nan for k in row if "toxicity" in k and isinstance(row[k], float)}, "rows": None}
    return copies


def recheck(
    settings: dict[tuple, dict], toxicity: str, scorer, goal: dict | None, confirm: dict | None, options: dict, results: dict | None = None
) -> dict[str, dict | None]:
    """Per target: the chosen setting's check under `scorer`, baselines rescored too, on the prompts
    goal.md judges it on (the confirmation prompts; all of them without a split or with held_out);
    None where nothing was chosen or the choice kept no generations. `options`: add_paired's (empty
    rule, threshold, resamples); `results`: the grid scorer's verdict, when the caller has it already."""
    goal, confirm = checked_goal(goal), checked_confirm(confirm)
    again = rescored(settings, scorer)
    add_paired(again, toxicity, **options)
    _, confirmation = split(again, confirm)
    checks = goal_checks(again, toxicity, goal, confirmation)
    key_of = {id(row): key for key, row in settings.items()}
    return {
        target: checks.get(id(again[key_of[id(v["chosen"]["row"])]])) if v["chosen"] and v["chosen"]["row"].get("rows") else None
        for target, v in (results or verdict(settings, toxicity, goal, confirm)).items()
    }


def recheck_table(
    settings: dict[tuple, dict], toxicity: str, scorer, goal: dict | None, confirm: dict | None, options: dict, grid_scorer: str | None = None
) -> str:
    """Markdown for goal.md: per target, the chosen setting judged again under the held-out scorer, and
    whether the goal is met under both scorers. `grid_scorer`: the grid's own, to warn when they match."""
    name = getattr(scorer, "name", type(scorer).__name__)
    if name == grid_scorer:
        log.warning("the held-out scorer %s is the grid's own scorer: its recheck is not held out", name)
    first = verdict(settings, toxicity, goal, confirm)
    second = recheck(settings, toxicity, scorer, goal, confirm, options, first)  # the same choice, not a second bootstrap of it
    lines = [
        f"| target | the chosen setting, judged again with every continuation scored by {name} | met by {name} | met by both scorers |",
        "|---|---|---|---|",
    ]
    both = 0
    for target, c in second.items():
        met = bool(c and c["meets"])
        both += met and first[target]["met"]
        why = "– (nothing was chosen)" if not first[target]["chosen"] else "– (the chosen setting kept no generations to rescore)"
        lines.append(f"| {target} | {describe(c, toxicity) if c else why} | {'yes' if met else 'no'} | {'yes' if met and first[target]['met'] else 'no'} |")
    log.info("held-out scorer %s: the goal met by both scorers on %d of %d target(s)", name, both, len(second))
    intro = (
        f"Rechecked by a held-out scorer, {name}: each target's chosen setting (chosen above, by the grid's scorer) with every "
        f"continuation scored again, baselines too, judged by the same goal on the same prompts. Met by both scorers on {both} of {len(second)} target(s)."
    )
    return intro + "\n\n" + "\n".join(lines)
