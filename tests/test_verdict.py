"""The verdict's statistics, against expectations derived apart from the code: paired intervals by a
from-scratch numpy bootstrap and by exact construction, the confirmation split, and the goal's rules
on hand-built settings (the thresholds, the base, baselines, degeneration, confirmation)."""

import hashlib
import math

import numpy as np
import pytest
from conftest import S

from calibfuse.evaluation.paired import confirmation_split, paired_change, per_prompt
from calibfuse.reporting.verdict import goal_checks, goal_table, verdict


def rows_of(toxicities, losses, prefix="p", continuation="some words here"):
    return [
        {"prompt_id": f"{prefix}{i}", "prompt": f"prompt text {prefix}{i}", "sample": 0, "continuation": continuation, "toxicity": t, "loss": loss}
        for i, (t, loss) in enumerate(zip(toxicities, losses, strict=True))
    ]


def test_paired_interval_matches_a_from_scratch_bootstrap():
    """Prompts differ far more than the settings: the paired interval is narrow where the unpaired ones overlap."""
    rng = np.random.default_rng(7)
    n = 150
    base_tox = rng.beta(0.6, 1.6, n)  # prompts from nearly clean to very toxic
    other_tox = np.clip(base_tox * 0.8 + rng.normal(0, 0.03, n), 0, 1)
    base_loss, other_loss = rng.normal(2.0, 0.5, n), None
    other_loss = base_loss + rng.normal(0.05, 0.1, n)
    result = paired_change(per_prompt(rows_of(base_tox, base_loss)), per_prompt(rows_of(other_tox, other_loss)), resamples=4000)
    assert result["paired_prompts"] == n
    assert result["toxicity_change"] == pytest.approx(other_tox.mean() / base_tox.mean() - 1)
    assert result["perplexity_ratio"] == pytest.approx(math.exp(other_loss.mean() - base_loss.mean()))
    # the same percentile bootstrap written out: resample prompt indices, both settings on each resample
    draws = np.random.default_rng(0).integers(0, n, size=(20000, n))
    change = other_tox[draws].mean(1) / base_tox[draws].mean(1) - 1
    ratio = np.exp(other_loss[draws].mean(1) - base_loss[draws].mean(1))
    assert result["toxicity_change_lo"] == pytest.approx(np.percentile(change, 2.5), abs=0.006)
    assert result["toxicity_change_hi"] == pytest.approx(np.percentile(change, 97.5), abs=0.006)
    assert result["perplexity_ratio_lo"] == pytest.approx(np.percentile(ratio, 2.5), abs=0.006)
    assert result["perplexity_ratio_hi"] == pytest.approx(np.percentile(ratio, 97.5), abs=0.006)
    # unpaired 95 % intervals of the two means (normal approximation) overlap, yet the paired change is far from 0
    half = [1.96 * x.std(ddof=1) / math.sqrt(n) for x in (base_tox, other_tox)]
    assert other_tox.mean() + half[1] > base_tox.mean() - half[0]
    assert result["toxicity_change_hi"] < -0.1


def test_paired_change_pairs_by_prompt_and_nests_samples():
    """Rows of two seeds nest within their prompt; prompts only one setting has are left out; an exact
    multiplier gives a zero-width interval at it."""
    base = rows_of([0.2, 0.4, 0.6], [1.0, 2.0, 3.0]) + [dict(r, sample=1, toxicity=r["toxicity"] + 0.2) for r in rows_of([0.2, 0.4, 0.6], [1.0, 2.0, 3.0])]
    other = [dict(r, toxicity=r["toxicity"] / 2, loss=r["loss"] + math.log(1.1)) for r in base] + rows_of([0.9], [1.0], prefix="extra")
    result = paired_change(per_prompt(base), per_prompt(other), resamples=200)
    assert result["paired_prompts"] == 3
    assert (result["toxicity_change"], result["toxicity_change_lo"], result["toxicity_change_hi"]) == pytest.approx((-0.5, -0.5, -0.5))
    assert (result["perplexity_ratio"], result["perplexity_ratio_lo"], result["perplexity_ratio_hi"]) == pytest.approx((1.1, 1.1, 1.1))
    assert paired_change(per_prompt(base), per_prompt(other), prompts={"p0", "p1"})["paired_prompts"] == 2
    # empty continuations are left out of toxicity under the paper protocol's rule
    empty = rows_of([0.0, 0.4, 0.6], [None, 2.0, 3.0])
    empty[0]["continuation"] = "  "
    assert paired_change(per_prompt(base), per_prompt(empty, empty="exclude"))["paired_prompts"] == 2


def test_confirmation_split_is_disjoint_seeded_and_by_text():
    prompts = {f"id{i}": f"text {i}" for i in range(1000)} | {"dup": "text 5"}
    selection, confirmation = confirmation_split(prompts, 0.5, seed=3)
    assert not selection & confirmation and selection | confirmation == set(prompts)
    assert 430 < len(confirmation) < 570
    # the rule by hand, so that a published split never moves: sha256 of "<seed>\0<text>", its first 8 bytes below fraction x 2^64
    assert confirmation == {i for i, t in prompts.items() if int.from_bytes(hashlib.sha256(f"3\0{t}".encode()).digest()[:8], "big") < 2**63}
    assert ("dup" in confirmation) == ("id5" in confirmation)  # the same text falls on one side
    assert confirmation_split(prompts, 0.5, seed=3) == (selection, confirmation)
    assert confirmation_split(prompts, 0.5, seed=4)[1] != confirmation
    assert 150 < len(confirmation_split(prompts, 0.2, seed=3)[1]) < 260


def setting(target, method, rows, alone=False, degenerate=False, tox=None, half=2.0, ppl=5.0):
    tox = 100 * sum(r["toxicity"] for r in rows) / len(rows) if rows else tox
    return {
        "target": target,
        "method": method,
        "setting": "",
        "target_alone": alone,
        "degenerate": degenerate,
        "rows": rows,
        "per_prompt": per_prompt(rows) if rows else None,
        "resamples": 500,
        "toxicity": tox,
        "toxicity_lo": tox - half,
        "toxicity_hi": tox + half,
        "perplexity": ppl,
        "perplexity_lo": ppl - 0.5,
        "perplexity_hi": ppl + 0.5,
        "kl": 0.2,
        "top1_agreement": 0.8,
    }


def scaled(rows, tox_factor, ppl_factor, which=None):
    """Rows with toxicity x tox_factor and perplexity x ppl_factor (on the prompts `which`, all if None)."""
    return [
        dict(r, toxicity=r["toxicity"] * tox_factor, loss=r["loss"] + math.log(ppl_factor)) if which is None or r["prompt_id"] in which else dict(r)
        for r in rows
    ]


def test_goal_verdict_by_hand():
    """Exact multipliers per prompt, so every expected change is known: -30 % at +8 % meets; -25 % at +10 %
    exactly meets (the thresholds are inclusive); -24 % does not; the word filter beats a setting it is
    as good as on both axes; a degenerate cut never counts; a cut on the selection prompts only is not
    confirmed."""
    rng = np.random.default_rng(0)
    base = rows_of(rng.beta(0.6, 1.6, 60), rng.normal(2.0, 0.4, 60))
    selection, confirmation = confirmation_split({r["prompt_id"]: r["prompt"] for r in base}, 0.5, 0)
    settings = {
        S("a", 0.0): setting("a", "fusion", base, alone=True),
        S("a", 0.2): setting("a", "fusion", scaled(base, 0.70, 1.08)),
        S("a", 0.4): setting("a", "fusion", scaled(base, 0.60, 1.20)),  # cuts more, over the perplexity budget
        S("a", 0.6): setting("a", "fusion", scaled(base, 0.10, 1.00), degenerate=True),
        S("b", 0.0): setting("b", "fusion", base, alone=True),
        S("b", 0.2): setting("b", "fusion", scaled(base, 0.75, 1.10)),  # exactly at both thresholds
        S("b", 0.3): setting("b", "fusion", scaled(base, 0.76, 1.00)),  # a 24 % cut: not enough
        S("c", 0.0): setting("c", "fusion", base, alone=True),
        S("c", 0.2): setting("c", "fusion", scaled(base, 0.70, 1.08)),
        S("c (word_filter)", 0.0): setting("c", "word_filter", scaled(base, 0.50, 1.02)),
        S("d", 0.0): setting("d", "fusion", base, alone=True),
        S("d", 0.3): setting("d", "fusion", scaled(base, 0.40, 1.05, which=selection)),  # a cut on the selection prompts only
    }
    checks = {(c["row"]["target"], c["alpha"]): c for c in goal_checks(settings, "toxicity").values()}
    assert checks[("a", 0.2)]["toxicity_change"] == pytest.approx(-0.30) and checks[("a", 0.2)]["perplexity_ratio"] == pytest.approx(1.08)
    assert checks[("a", 0.2)]["meets"] and checks[("a", 0.2)]["significant"] and checks[("a", 0.2)]["paired_prompts"] == 60
    assert not checks[("a", 0.4)]["meets"] and not checks[("a", 0.6)]["meets"]
    assert checks[("b", 0.2)]["meets"] and not checks[("b", 0.3)]["meets"]
    assert checks[("c", 0.2)]["beaten_by"] == ["word_filter"] and not checks[("c", 0.2)]["meets"]
    assert ("c", 0.0) not in checks  # bases and baselines are not judged

    results = verdict(settings, "toxicity")
    assert {t: v["met"] for t, v in results.items()} == {"a": True, "b": True, "c": False, "d": False}
    assert results["d"]["chosen"]["alpha"] == 0.3 and results["d"]["chosen"]["toxicity_change"] == pytest.approx(-0.6)
    assert results["d"]["confirmed"]["toxicity_change"] == pytest.approx(0.0) and results["d"]["confirmed"]["paired_prompts"] == len(confirmation)
    assert results["a"]["detectable"] == pytest.approx(0.0, abs=1e-9)  # exact multipliers leave no spread
    assert verdict(settings, "toxicity", confirm=None)["d"]["met"]  # without the split, the selection's luck would count

    table = goal_table(settings, "toxicity")
    assert "Met on 2 of 4 target(s)" in table and "Test: paired bootstrap over prompts (95 %)" in table
    assert "| a | yes | fusion α=0.2: -30% [-30%, -30%] toxicity, +8% [+8%, +8%] perplexity (significant, " in table
    assert "| c | no | – (none within the perplexity budget, not degenerate, not beaten) |" in table  # its only candidate is beaten
    assert "met on" not in goal_table(settings, "toxicity", {"min_toxicity_drop": 0.5}) and "Met on 0 of 4" in goal_table(
        settings, "toxicity", {"min_toxicity_drop": 0.5}
    )
    one_each = {k: v for k, v in settings.items() if k not in {S("a", 0.4), S("a", 0.6), S("b", 0.3)}}  # fixed before the run
    held_out = verdict(one_each, "toxicity", confirm="held_out")
    assert {t: v["confirmed"]["paired_prompts"] for t, v in held_out.items() if v["confirmed"]} == {"a": 60, "b": 60, "c": 60, "d": 60}  # every prompt confirms
    assert held_out["c"]["chosen"]["beaten_by"] == ["word_filter"] and not held_out["c"]["met"]  # fixed, so judged, though beaten
    assert "every prompt here confirms it (confirm=held_out)" in goal_table(one_each, "toxicity", confirm="held_out")
    with pytest.raises(ValueError, match=r"confirm=held_out judges one setting per target, .* a has 3 \(fusion α=0.2; fusion α=0.4; fusion α=0.6\)"):
        verdict(settings, "toxicity", confirm="held_out")
    with pytest.raises(ValueError, match=r"confirm='held-out'; expected \{fraction, seed\}, 'held_out'"):
        verdict(settings, "toxicity", confirm="held-out")
    with pytest.raises(ValueError, match=r"goal keys \['max_ppl'\] are unknown"):
        goal_table(settings, "toxicity", {"max_ppl": 0.1})
    with pytest.raises(ValueError, match="min_toxicity_drop=25, .* expected a relative drop in"):
        goal_table(settings, "toxicity", {"min_toxicity_drop": 25})
    with pytest.raises(ValueError, match=r"confirm=.*fraction.*expected keys"):
        goal_table(settings, "toxicity", confirm={"fraction": 1.5})


def test_goal_falls_back_to_unpaired_intervals_without_generations():
    """Grids from before generations were kept: the means and unpaired intervals decide, and goal.md says so."""
    settings = {
        S("a", 0.0): setting("a", "fusion", None, alone=True, tox=20.0),
        S("a", 0.2): setting("a", "fusion", None, tox=14.0, ppl=5.4),  # -30 % at +8 %, 16 < 18: apart
        S("a", 0.4): setting("a", "fusion", None, tox=14.0, ppl=5.4, half=5.0),  # the same means, intervals overlap
        S("b", 0.5): setting("b", "fusion", None, tox=10.0, ppl=8.0),  # no target alone: not judged
    }
    checks = {(c["row"]["target"], c["alpha"]): c for c in goal_checks(settings, "toxicity").values()}
    assert set(checks) == {("a", 0.2), ("a", 0.4)}
    assert checks[("a", 0.2)]["meets"] and not checks[("a", 0.4)]["significant"]
    assert checks[("a", 0.2)]["drop"] == pytest.approx(0.3) and checks[("a", 0.2)]["rise"] == pytest.approx(0.08)
    table = goal_table(settings, "toxicity")
    assert "Test: unpaired intervals (the grid kept no generations) (95 %); chosen and judged on the same prompts" in table
    assert "| a | yes | fusion α=0.2: -30% toxicity, +8% perplexity (significant; KL 0.20, agreement 0.80) |" in table


def test_summary_rows_mark_the_confirmed_setting():
    from calibfuse.reporting.pareto import summary_rows

    base = rows_of(np.linspace(0.05, 0.9, 40), np.linspace(1.5, 2.5, 40))
    settings = {
        S("a", 0.0): setting("a", "fusion", base, alone=True),
        S("a", 0.2): setting("a", "fusion", scaled(base, 0.7, 1.05)),
        S("a", 0.4): setting("a", "fusion", scaled(base, 0.9, 1.01)),
    }
    for key in (S("a", 0.2), S("a", 0.4)):
        settings[key].update(paired_change(settings[S("a", 0.0)]["per_prompt"], settings[key]["per_prompt"], resamples=100))
    rows = {r["alpha"]: r for r in summary_rows(settings, "toxicity")}
    assert (rows[0.2]["chosen"], rows[0.2]["meets_goal"]) == (True, True) and not rows[0.4]["chosen"] and not rows[0.0]["meets_goal"]
    assert rows[0.2]["toxicity_change"] == pytest.approx(-0.3) and rows[0.0]["toxicity_change"] is None
    assert [r["meets_goal"] for r in summary_rows(settings, "toxicity", {"min_toxicity_drop": 0.4}).__iter__()] == [False] * 3


def test_report_labels_points_by_what_varies():
    from calibfuse.reporting.runs import label_by_what_varies, overrides_of

    assert overrides_of("method_names=[fusion,word_filter],calibration_layers=1") == ["method_names=[fusion,word_filter]", "calibration_layers=1"]
    cells = [{"setting": "method_names=[fusion],calibration_layers=" + n} for n in ("1", "3")] + [{"setting": "method_names=[fusion],calibration_layers=3"}]
    assert [c["setting"] for c in label_by_what_varies(cells)] == ["calibration_layers=1", "calibration_layers=3", "calibration_layers=3"]
    alone = [{"setting": "method_names=[fusion]"}, {"setting": "method_names=[fusion]"}]  # a multirun over alphas only
    assert [c["setting"] for c in label_by_what_varies(alone)] == ["", ""]
    chosen = [{"setting": "layers_3"}, {"setting": "calibration_layers=6"}]  # a label a user gave is kept
    assert [c["setting"] for c in label_by_what_varies(chosen)] == ["layers_3", "calibration_layers=6"]


def test_the_table_shows_the_alpha_asked_for(tmp_path):
    """build_report's `alpha` picks the table's fused column, whichever alphas come after it."""
    import json

    from calibfuse.reporting.report import build_report

    def cell(alpha, tox, ppl):
        values = {"toxicity": tox, "toxicity_lo": tox - 1, "toxicity_hi": tox + 1, "perplexity": ppl, "perplexity_lo": ppl - 0.1, "perplexity_hi": ppl + 0.1}
        return {"target": "t", "method": "fusion", "alpha": alpha, "seed": 1, "target_alone": alpha == 0, "empty_rate": 0.0, **values}

    grid = {"metrics": ["toxicity", "perplexity"], "cells": [cell(0.0, 20.0, 5.0), cell(0.3, 15.0, 5.5), cell(0.5, 9.0, 8.0)]}
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "grid.json").write_text(json.dumps(grid))
    table = build_report([tmp_path / "run"], tmp_path / "report", alpha=0.3)["markdown"]
    assert "| t | fusion α=0.3 | 20.00 [19.00, 21.00] | 15.00 [14.00, 16.00] | 5.00 [4.90, 5.10] | 5.50 [5.40, 5.60] |" in table


class ScoresByText:
    """A second scorer known by construction: a table from text to score; counts the texts it sees."""

    name = "by_text"

    def __init__(self, table):
        self.table, self.seen = table, []

    def score(self, texts):
        self.seen += texts
        return [self.table[t] for t in texts]


def test_recheck_by_a_held_out_scorer_by_hand():
    """The grid's scorer sees a 30 % cut on both targets. The held-out scorer sees none on `a` (its
    continuations score as the target alone's) and exactly 50 % on `b`: the goal holds under both
    scorers on `b` only."""
    from calibfuse.reporting.recheck import recheck, recheck_table

    rng = np.random.default_rng(1)
    n = 40
    grid_tox, held_out = rng.beta(0.6, 1.6, n), rng.uniform(0.1, 0.9, n)
    base = [dict(r, continuation=f"plain {i}") for i, r in enumerate(rows_of(grid_tox, rng.normal(2.0, 0.4, n)))]
    fused = {t: [dict(r, continuation=f"{t} {i}") for i, r in enumerate(scaled(base, 0.70, 1.08))] for t in ("a", "b")}
    table = {f"plain {i}": held_out[i] for i in range(n)} | {f"a {i}": held_out[i] for i in range(n)} | {f"b {i}": held_out[i] / 2 for i in range(n)}
    settings = {S(t, 0.0): setting(t, "fusion", base, alone=True) for t in ("a", "b")} | {S(t, 0.2): setting(t, "fusion", fused[t]) for t in ("a", "b")}
    scorer = ScoresByText(table)
    options = {"empty": "score", "threshold": 0.5, "resamples": 500}
    checks = recheck(settings, "toxicity", scorer, None, None, options)
    assert sorted(scorer.seen) == sorted(table)  # each distinct continuation scored once
    assert checks["a"]["toxicity_change"] == pytest.approx(0.0, abs=1e-12) and not checks["a"]["meets"]
    assert checks["b"]["toxicity_change"] == pytest.approx(-0.5) and checks["b"]["perplexity_ratio"] == pytest.approx(1.08) and checks["b"]["meets"]
    assert settings[S("a", 0.2)]["rows"][0]["toxicity"] == pytest.approx(0.7 * grid_tox[0])  # the grid's scores are left as they were
    text = recheck_table(settings, "toxicity", ScoresByText(table), None, {"fraction": 0.5, "seed": 0}, options)
    _, confirmation = confirmation_split({r["prompt_id"]: r["prompt"] for r in base}, 0.5, 0)
    assert "Rechecked by a held-out scorer, by_text" in text and "Met by both scorers on 1 of 2 target(s)." in text
    assert f"| a | fusion α=0.2: +0% [+0%, +0%] toxicity, +8% [+8%, +8%] perplexity (not significant, {len(confirmation)} prompts" in text
    assert "| b | fusion α=0.2: -50% [-50%, -50%] toxicity" in text and text.count("| yes | yes |") == 1


def test_recheck_judges_the_chosen_setting_against_rescored_baselines():
    """Target c: the grid's scorer chooses α 0.4 (-40 %); the held-out scorer sees -50 % there, but it
    also sees the word filter cut 60 % at less perplexity, so the choice is beaten under it. Target e
    kept no generations: nothing can be rescored, and the grid's figures are not passed off as the
    second scorer's. With confirm=held_out, a fixed setting over the perplexity budget is still judged."""
    from calibfuse.reporting.recheck import recheck, recheck_table

    rng = np.random.default_rng(2)
    n = 40
    base = [dict(r, continuation=f"plain {i}") for i, r in enumerate(rows_of(rng.beta(0.6, 1.6, n), rng.normal(2.0, 0.4, n)))]
    held_out = rng.uniform(0.1, 0.9, n)

    def variant(prefix, tox, ppl, second):
        table.update({f"{prefix} {i}": held_out[i] * second for i in range(n)})
        return [dict(r, continuation=f"{prefix} {i}") for i, r in enumerate(scaled(base, tox, ppl))]

    table = {f"plain {i}": held_out[i] for i in range(n)}
    settings = {
        S("c", 0.0): setting("c", "fusion", base, alone=True),
        S("c", 0.2): setting("c", "fusion", variant("c2", 0.70, 1.08, 1.0)),
        S("c", 0.4): setting("c", "fusion", variant("c4", 0.60, 1.09, 0.5)),
        S("c (word_filter)", 0.0): setting("c", "word_filter", variant("cw", 0.90, 1.01, 0.4)),
        S("e", 0.0): setting("e", "fusion", None, alone=True, tox=20.0),
        S("e", 0.2): setting("e", "fusion", None, tox=14.0, ppl=5.4),
    }
    options = {"empty": "score", "threshold": 0.5, "resamples": 500}
    checks = recheck(settings, "toxicity", ScoresByText(table), None, None, options)
    assert checks["c"]["alpha"] == 0.4 and checks["c"]["toxicity_change"] == pytest.approx(-0.5)
    assert checks["c"]["beaten_by"] == ["word_filter"] and not checks["c"]["meets"]
    assert checks["e"] is None
    text = recheck_table(settings, "toxicity", ScoresByText(table), None, None, options)
    assert "| e | – (the chosen setting kept no generations to rescore) | no | no |" in text

    fixed = {k: v for k, v in settings.items() if k in {S("c", 0.0), S("c", 0.2)}}
    fixed[S("c", 0.2)] = setting("c", "fusion", variant("c2", 0.70, 1.20, 1.0))  # +20 % perplexity: fails, but it is the setting fixed
    assert recheck(fixed, "toxicity", ScoresByText(table), None, "held_out", options)["c"]["perplexity_ratio"] == pytest.approx(1.20)
    assert verdict(fixed, "toxicity", confirm="held_out")["c"]["chosen"]["alpha"] == 0.2


def write_grid(run_dir, scorer, prompts, cells, note=None):
    """A grid.json and generations.jsonl as calibfuse.evaluate writes them, for cells given as
    (method, alpha, per-prompt toxicity, per-prompt loss): one target `t`, one seed."""
    import json

    from calibfuse.evaluation.metrics import cell_metrics
    from calibfuse.utils.files import sha256_json

    context = {"target.weights": "w" * 12, "scorer.name": scorer, "prompts": f"src ({len(prompts)} prompts, {sha256_json(prompts)[:8]})"}
    grid, generations = [], []
    for method, alpha, toxicities, losses in cells:
        alone = method == "none"
        rows = [
            {"target": "t", "method": method, "alpha": alpha, "seed": 7, "prompt_id": p, "prompt": f"prompt {p}", "sample": 0,
             "continuation": f"{method} {alpha} {p}", "toxicity": x, "loss": loss, "new_tokens": 4}
            for p, x, loss in zip(prompts, toxicities, losses, strict=True)
        ]  # fmt: skip
        setting = {"method": method, "alpha": alpha}
        grid.append(
            {"target": "t", "method": method, "alpha": alpha, "seed": 7, "setting": "", "scorer": scorer, "target_alone": alone,
             "setting_key": sha256_json([setting, context]), "decided_by": {"setting": setting, "context": context},
             **cell_metrics(rows, ["toxicity", "perplexity"], resamples=100)}
        )  # fmt: skip
        generations += rows
    run_dir.mkdir(parents=True)
    meta = {"metrics": ["toxicity", "perplexity"], "scorer": scorer, "scorer_note": note, "prompts": len(prompts)}
    (run_dir / "grid.json").write_text(json.dumps(meta | {"cells": grid}))
    (run_dir / "generations.jsonl").write_text("".join(json.dumps(r) + "\n" for r in generations))


def test_a_report_keeps_runs_by_different_scorers_apart(tmp_path):
    """The same target alone scored by two scorers: two groups, each named by its scorer, each fused
    setting compared with its own scorer's target alone; both scorers' notes under the table."""
    from calibfuse.reporting.report import build_report

    prompts = [f"p{i}" for i in range(6)]
    alone, fused = [0.8, 0.6, 0.9, 0.7, 0.5, 0.6], [0.4, 0.3, 0.5, 0.3, 0.2, 0.3]
    losses = [2.0] * 6
    write_grid(tmp_path / "a", "toxblock", prompts, [("none", 0.0, alone, losses), ("fusion", 0.3, fused, losses)], "ToxBlock's note")
    write_grid(tmp_path / "b", "profanity_check", prompts, [("none", 0.0, [x / 10 for x in alone], losses)], "profanity_check's note")
    report = build_report([tmp_path / "a", tmp_path / "b"], tmp_path / "report", alpha=0.3, resamples=100)
    rows = {(r["target"], r["label"]): r for r in report["summary"]}
    assert sorted(rows) == [
        ("t [scorer.name=profanity_check]", "target alone"),
        ("t [scorer.name=toxblock]", "fusion α=0.3"),
        ("t [scorer.name=toxblock]", "target alone"),
    ]
    assert rows[("t [scorer.name=toxblock]", "target alone")]["toxicity"] == pytest.approx(100 * sum(alone) / 6)  # not pooled with the other
    assert rows[("t [scorer.name=toxblock]", "fusion α=0.3")]["toxicity_change"] == pytest.approx(sum(fused) / sum(alone) - 1)
    assert "toxblock: ToxBlock's note; profanity_check: profanity_check's note" in report["markdown"]


def test_a_report_compares_settings_on_shared_prompts_only(tmp_path):
    """A fused run and a target-alone run on overlapping prompt sets are compared on the prompts both
    ran, and the table says how many; on disjoint prompt sets the report refuses, naming both."""
    from calibfuse.reporting.report import build_report

    write_grid(tmp_path / "fused", "toxblock", ["p0", "p1", "p2", "p3"], [("fusion", 0.3, [0.9, 0.9, 0.2, 0.4], [2.0] * 4)])
    write_grid(tmp_path / "alone", "toxblock", ["p2", "p3", "p4", "p5"], [("none", 0.0, [0.4, 0.6, 0.1, 0.1], [2.0] * 4)])
    report = build_report([tmp_path / "fused", tmp_path / "alone"], tmp_path / "report", alpha=0.3, resamples=100)
    (row,) = [r for r in report["summary"] if r["method"] == "fusion"]
    assert row["toxicity_change"] == pytest.approx((0.2 + 0.4) / (0.4 + 0.6) - 1)  # p2 and p3 only
    assert "| t (on the 2 prompts both ran) | fusion α=0.3 | 50.00 [" in report["markdown"] and "| 30.00 [" in report["markdown"]

    write_grid(tmp_path / "toxic", "toxblock", ["q0", "q1"], [("fusion", 0.3, [0.02, 0.03], [2.0] * 2)])
    with pytest.raises(ValueError, match=r"t fusion α=0.3 ran on prompts 'src \(2 prompts, .*\)' and its target alone on 'src \(4 prompts, .*share no prompt"):
        build_report([tmp_path / "toxic", tmp_path / "alone"], tmp_path / "report2", alpha=0.3)


def test_plots_read(tmp_path, monkeypatch):
    """Perplexities of 6.8, 17.3 and 3958 on a log axis; toxicity from 0; error bars clipped at 0; a
    label at a spot already labelled joined to it, not printed over it; no legend entry without a line."""
    import calibfuse.reporting.pareto as pareto

    figures = []
    monkeypatch.setattr(pareto, "save", lambda fig, path: figures.append(fig) or path)

    def row(method, tox, lo, ppl, alone=False):
        return {"target": "t", "method": method, "setting": "", "target_alone": alone, "degenerate": False, "toxicity": tox,
                "toxicity_lo": lo, "toxicity_hi": tox + 1, "perplexity": ppl, "perplexity_lo": ppl * 0.9, "perplexity_hi": ppl * 1.1}  # fmt: skip

    settings = {
        S("t", 0.0): row("none", 20.0, 18.0, 6.8, alone=True),
        S("t", 0.3): row("fusion", 0.5, -2.0, 17.3),
        S("t", 0.9): row("fusion", 0.4, -1.0, 3958.0),
    }
    pareto.plot_frontier(settings, "toxicity", tmp_path)
    (ax,) = figures[0].axes
    assert ax.get_xscale() == "log" and ax.get_ylim()[0] == 0.0
    below = [segment[:, 1].min() for collection in ax.collections for segment in collection.get_segments() if len(segment)]
    assert min(below) >= 0.0  # the interval [-2, 1.5] is drawn from 0
    assert "Pareto frontier" in [t.get_text() for t in ax.get_legend().get_texts()]  # two frontier points: a line
    one = {S("t", 0.0): row("none", 20.0, 18.0, 6.8, alone=True)}
    pareto.plot_frontier(one, "toxicity", tmp_path)
    assert "Pareto frontier" not in [t.get_text() for t in figures[1].axes[0].get_legend().get_texts()]
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    labels = pareto.Labels(ax)
    for text in ("target alone", "target alone", "fusion α=0"):
        labels.add(text, 6.8, 20.0)
    labels.add("fusion α=0.3", 17.3, 0.5)
    assert [a.get_text() for a in ax.texts] == ["target alone; fusion α=0", "fusion α=0.3"]
    plt.close(fig)


def test_a_verdict_on_too_few_prompts_says_so():
    base = rows_of([0.5, 0.6, 0.7], [2.0, 2.1, 2.2])
    settings = {S("a", 0.0): setting("a", "fusion", base, alone=True), S("a", 0.3): setting("a", "fusion", scaled(base, 0.5, 1.0))}
    assert "Too few prompts to judge a (3): under 10 paired prompts" in goal_table(settings, "toxicity", confirm=None)
    many = rows_of(np.linspace(0.1, 0.9, 12), np.linspace(1.5, 2.5, 12))
    settings = {S("a", 0.0): setting("a", "fusion", many, alone=True), S("a", 0.3): setting("a", "fusion", scaled(many, 0.5, 1.0))}
    assert "Too few prompts" not in goal_table(settings, "toxicity", confirm=None)


def test_a_report_over_a_sweep_names_its_unfinished_jobs(tmp_path, caplog):
    from calibfuse.reporting.runs import warn_unfinished_jobs

    (tmp_path / "multirun.yaml").write_text("hydra: {}\n")
    for job, finished, mode in (("0", True, "MULTIRUN"), ("1", False, "MULTIRUN"), ("report", False, "RUN")):  # a report kept in the sweep dir is no job
        (tmp_path / job / ".hydra").mkdir(parents=True)
        (tmp_path / job / ".hydra" / "hydra.yaml").write_text(f"hydra:\n  mode: {mode}\n")
        (tmp_path / job / ".hydra" / "overrides.yaml").write_text(f"- fusion.layer_norm={'none' if finished else 'parameter_free'}\n")
        if finished:
            (tmp_path / job / "evaluate.json").write_text("{}")
    assert warn_unfinished_jobs(tmp_path) == [tmp_path / "1"]
    assert f"multirun job {tmp_path / '1'} did not finish" in caplog.text and "fusion.layer_norm=parameter_free" in caplog.text
