"""Fusion beside its peers on one tiny grid, as a fresh clone runs it: `methods=[fusion,lm_steer,profs,
word_filter]` (and the target alone) writes, for every method's cell, a paired change against the
target alone and the neutral-text perplexity and dist-n columns; the report's quality table has them."""

import csv
import json
import subprocess
import sys
from pathlib import Path

from conftest import compose_config
from omegaconf import open_dict
from test_lm_steer import steer_overrides, toxic_file

from calibfuse.evaluate import evaluate
from calibfuse.reporting.report import build_report

ROOT = Path(__file__).resolve().parents[1]


def test_fusion_and_its_peers_on_one_grid(tiny_model_dirs, tiny_target_dir, tiny_alignment, tmp_path):
    toxic = toxic_file(tmp_path)
    steer_run = tmp_path / "steer_run"
    overrides = steer_overrides(tiny_target_dir, toxic, "train_rows=8", f"hydra.run.dir={steer_run}")
    subprocess.run([sys.executable, "-m", "calibfuse.steer", *overrides], cwd=ROOT, check=True, capture_output=True, timeout=300)
    cfg = compose_config(
        "evaluate",
        [
            "methods=[none,fusion,lm_steer,profs,word_filter]",
            "target_names=[tiny]",
            f"+alignments.tiny={tiny_alignment}",
            f"+methods.lm_steer.steers.tiny={steer_run / 'steer'}",
            "alphas=[0,0.5]",
            "methods.lm_steer.alphas=[2]",
            "methods.profs.alphas=[1]",
            "methods.profs.layers=[1,2]",
            "methods.profs.rank=2",
            "methods.profs.sentences=24",
            f"methods.profs.toxic.path={toxic}",
            "methods.profs.nontoxic.path=embedded:nontoxic",
            f"methods.profs.cache_dir={tmp_path / 'cache'}",
            "prompts.limit=6",
            "neutral.texts=4",
            f"reference_lm.model.name_or_path={tiny_model_dirs['llama']}",
            "reference_lm.model.dtype=float32",
            f"cell_store={tmp_path / 'cells'}",
            "protocol.generation.max_new_tokens=4",
            "logger=csv",
            "bootstrap_resamples=100",
        ],
        tmp_path / "run",
    )
    with open_dict(cfg):
        cfg.targets.tiny = {"_target_": "calibfuse.models.loading.ModelSpec", "name_or_path": str(tiny_target_dir), "dtype": "float32"}
    evaluate(cfg)

    with (tmp_path / "run" / "grid.csv").open() as f:
        rows = [r for r in csv.DictReader(f) if r["target_alone"] != "True"]
    assert sorted((r["method"], float(r["alpha"])) for r in rows) == [("fusion", 0.5), ("lm_steer", 2.0), ("profs", 1.0), ("word_filter", 0.0)]
    for row in rows:  # every method: a paired change with its interval, and the quality columns
        for column in ("toxicity_change", "perplexity_ratio", "neutral_ppl_ratio"):
            assert row[column] not in ("", "nan") and row[f"{column}_lo"] not in ("", "nan"), (row["method"], column)
        assert row["dist_2_change"] not in ("", "nan")  # its interval is nan where 4 tokens repeat nothing: no variation to resample
        assert float(row["neutral_ppl"]) > 0 and 0 <= float(row["dist_2"]) <= 1

    build_report([str(tmp_path / "run")], str(tmp_path / "report"), 0.5, resamples=100)
    quality = (tmp_path / "report" / "quality.md").read_text()
    for method in ("fusion", "lm_steer", "profs", "word_filter"):
        assert method in quality
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())
    assert {"fusion", "lm_steer", "profs", "word_filter"} <= {s["method"] for s in summary}
