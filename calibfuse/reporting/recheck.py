"""The verdict rechecked by a held-out scorer: each target's setting as goal.md chose it (on the
selection prompts, by the grid's scorer), with every continuation scored again by a second scorer that
the choice never saw, judged on the confirmation prompts by the same goal. A cut that only one
classifier sees is that classifier's, not the model's."""

from __future__ import annotations

import logging

from calibfuse.reporting.verdict import add_paired, checked_confirm, checked_goal, describe, goal_checks, split, verdict

log = logging.getLogger(__name__)


def rescored(settings: dict[tuple, dict], scorer) -> dict[tuple, dict]:
    """A copy of `settings` whose generations carry `scorer`'s toxicity (each distinct text scored once);
    the per-setting summary figures are the grid scorer's and are not used."""
    texts = sorted({r["continuation"] for row in settings.values() for r in row.get("rows") or []})
    scores = dict(zip(texts, (float(s) for s in scorer.score(texts)), strict=True)) if texts else {}
    return {
        key: {**row, "rows": [{**r, "toxicity": scores[r["continuation"]]} for r in row["rows"]] if row.get("rows") else None} for key, row in settings.items()
    }


def recheck(settings: dict[tuple, dict], toxicity: str, scorer, goal: dict | None, confirm: dict | None, options: dict) -> dict[str, dict]:
    """Per target: the chosen setting's check on the confirmation prompts (all prompts without a split)
    under `scorer`, baselines rescored too; None where nothing was chosen. `options`: add_paired's
    (empty rule, threshold, resamples)."""
    goal, confirm = checked_goal(goal), checked_confirm(confirm)
    again = rescored(settings, scorer)
    add_paired(again, toxicity, **options)
    _, confirmation = split(again, confirm)
    checks = goal_checks(again, toxicity, goal, confirmation)
    key_of = {id(row): key for key, row in settings.items()}
    return {
        target: checks.get(id(again[key_of[id(v["chosen"]["row"])]])) if v["chosen"] else None
        for target, v in verdict(settings, toxicity, goal, confirm).items()
    }


def recheck_table(settings: dict[tuple, dict], toxicity: str, scorer, goal: dict | None, confirm: dict | None, options: dict) -> str:
    """Markdown for goal.md: per target, the chosen setting judged again under the held-out scorer, and
    whether the goal is met under both scorers."""
    first = verdict(settings, toxicity, goal, confirm)
    second = recheck(settings, toxicity, scorer, goal, confirm, options)
    name = getattr(scorer, "name", type(scorer).__name__)
    lines = [
        f"| target | the chosen setting on the confirmation prompts, scored by {name} | met by {name} | met by both scorers |",
        "|---|---|---|---|",
    ]
    both = 0
    for target, c in second.items():
        met = bool(c and c["meets"])
        both += met and first[target]["met"]
        shown = describe(c, toxicity) if c else "– (nothing was chosen)"
        lines.append(f"| {target} | {shown} | {'yes' if met else 'no'} | {'yes' if met and first[target]['met'] else 'no'} |")
    log.info("held-out scorer %s: the goal met by both scorers on %d of %d target(s)", name, both, len(second))
    intro = (
        f"Rechecked by a held-out scorer, {name}: each target's chosen setting (chosen above, by the grid's scorer) with every "
        f"continuation scored again, baselines too, judged by the same goal on the same prompts. Met by both scorers on {both} of {len(second)} target(s)."
    )
    return intro + "\n\n" + "\n".join(lines)
