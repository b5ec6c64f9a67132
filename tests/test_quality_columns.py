"""The quality columns (calibfuse.evaluation.quality, calibfuse.reporting.quality) on a tiny grid: neutral
perplexity per cell from stage 1's held-out split, stored per cell and filled in for reused cells without
generating, dist-n, and their paired changes against the target alone in grid.csv, quality.md and summary.json."""

import json
import math

import pytest
from conftest import compose_config
from omegaconf import OmegaConf, open_dict

from calibfuse.data.datamodule import held_out_texts
from calibfuse.evaluate import evaluate
from calibfuse.evaluation.quality import paired_quality
from calibfuse.reporting.report import build_report


@pytest.fixture
def grid_cfg(tiny_model_dirs, tmp_path):
    def make(*overrides: str, run: str = "run"):
        cfg = compose_config(
            "evaluate",
            [
                "target_names=[tiny]",
                "methods=[none,word_filter]",
                "prompts.limit=6",
                f"cell_store={tmp_path / 'cells'}",
                "protocol.generation.max_new_tokens=6",
                f"reference_lm.model.name_or_path={tiny_model_dirs['llama']}",
                "reference_lm.model.dtype=float32",
                "logger=csv",
                "bootstrap_resamples=100",
                "neutral.texts=5",
                "neutral.max_tokens=8",
                *overrides,
            ],
            tmp_path / run,
        )
        with open_dict(cfg):
            cfg.targets.tiny = {"_target_": "calibfuse.models.loading.ModelSpec", "name_or_path": str(tiny_model_dirs["llama"]), "dtype": "float32"}
        return cfg

    return make


def test_held_out_texts_are_stage_1s_validation_rows(tiny_model_dirs, tmp_path):
    """The texts are the first rows of the split PromptCompletionDataModule holds out (never trained on)."""
    from calibfuse.data.datamodule import PromptCompletionDataModule
    from calibfuse.models.lm import IGNORE_INDEX
    from calibfuse.models.loading import ModelSpec, load_tokenizer

    tokenizer = load_tokenizer(ModelSpec(str(tiny_model_dirs["llama"])))
    data = OmegaConf.to_container(compose_config("evaluate", [], tmp_path).neutral.data, resolve=True)
    module = PromptCompletionDataModule(tokenizer, path=data["path"], val_fraction=data["val_fraction"], max_length=384, seed=data["seed"])
    module.setup()
    texts = held_out_texts(data, 8)
    assert len(texts) == 8
    for (_, completion), example in zip(texts, module.val_examples, strict=False):
        labels = [t for t in example["labels"] if t != IGNORE_INDEX]
        assert tokenizer.decode(labels, skip_special_tokens=True).strip() == completion


def test_grid_and_report_get_neutral_perplexity_and_dist_n_paired(grid_cfg, tiny_model_dirs, tmp_path):
    from calibfuse.evaluation.forced import continuation_logprobs
    from calibfuse.evaluation.quality import Neutral
    from calibfuse.fusion.target import TargetLM
    from calibfuse.methods import Method
    from calibfuse.models.loading import ModelSpec, load_model, load_tokenizer

    cfg = grid_cfg()
    summary = evaluate(cfg)
    assert summary["computed"] == 2
    cells = json.loads((tmp_path / "run" / "grid.json").read_text())["cells"]
    base, other = cells
    assert base["target_alone"] and other["method"] == "word_filter"
    # the target alone's neutral perplexity, by hand
    spec = ModelSpec(str(tiny_model_dirs["llama"]), dtype="float32")
    lm = TargetLM(load_model(spec), load_tokenizer(spec))
    neutral = Neutral.of(cfg.neutral, held_out_texts)
    scored = continuation_logprobs(lm, Method(), 0.0, [p for p, _ in neutral.texts], neutral.cut(lm.tokenizer))
    assert [lp for lp, _ in base["neutral"]["per_text"]] == pytest.approx([lp for lp, _, _ in scored], abs=1e-4)
    expected = math.exp(-sum(lp for lp, _, _ in scored) / sum(n for _, n, _ in scored))
    assert base["neutral_ppl"] == pytest.approx(expected, rel=1e-5) and base["neutral_texts"] == 5
    assert base["neutral_ppl_lo"] <= base["neutral_ppl"] <= base["neutral_ppl_hi"]
    assert other["neutral_banned"] + other["neutral_texts"] == 5 and other["neutral_ppl"] >= 0
    for column in ("neutral_ppl_ratio", "dist_1_change", "dist_2_change", "dist_3_change"):
        assert column in other and column + "_lo" in other
    header = (tmp_path / "run" / "grid.csv").read_text().splitlines()[0].split(",")
    assert {"neutral_ppl", "neutral_ppl_ratio", "dist_1", "dist_2_change"} <= set(header) and "neutral" not in header

    # a reused cell without its neutral scores gets them, without generating again
    stored = sorted((tmp_path / "cells").glob("*/neutral-*.json"))
    assert len(stored) == 2
    for path in stored:
        path.unlink()
    again = evaluate(grid_cfg(run="again"))
    assert again["computed"] == 0 and again["reused"] == 2 and len(list((tmp_path / "cells").glob("*/neutral-*.json"))) == 2
    assert json.loads((tmp_path / "again" / "grid.json").read_text())["cells"][0]["neutral"]["per_text"] == base["neutral"]["per_text"]
    # another max_tokens is another measurement, stored beside the first
    evaluate(grid_cfg("neutral.max_tokens=4", run="short"))
    assert len(list((tmp_path / "cells").glob("*/neutral-*.json"))) == 4

    report = build_report([tmp_path / "run"], tmp_path / "report", resamples=100)
    quality = (tmp_path / "report" / "quality.md").read_text()
    assert "neutral perplexity" in quality and "word_filter" in quality and "Δ dist-2 (paired)" in quality
    rows = json.loads((tmp_path / "report" / "summary.json").read_text())
    filtered = next(r for r in rows if r["method"] == "word_filter")
    assert filtered["neutral_ppl"] == pytest.approx(other["neutral_ppl"]) and "dist_1_change_lo" in filtered
    assert report["quality"].endswith("quality.md")


def test_neutral_off_leaves_the_grid_as_before(grid_cfg, tmp_path):
    evaluate(grid_cfg("neutral.texts=0", "methods=[none]"))
    (cell,) = json.loads((tmp_path / "run" / "grid.json").read_text())["cells"]
    assert "neutral_ppl" not in cell and not list((tmp_path / "cells").glob("*/neutral-*.json"))


def test_paired_quality_by_hand():
    base = {"neutral": {"key": "k", "per_text": [[-10.0, 5], [-20.0, 5], [-6.0, 3]]}, "rows": None}
    other = {"neutral": {"key": "k", "per_text": [[-12.0, 5], [None, 5], [-9.0, 3]]}, "rows": None}
    result = paired_quality(base, other, resamples=200)
    # the banned text (None) is left out of both sides: exp(21/8 - 16/8)
    assert result["neutral_ppl_ratio"] == pytest.approx(math.exp((21 - 16) / 8))
    assert result["neutral_ppl_ratio_lo"] <= result["neutral_ppl_ratio"] <= result["neutral_ppl_ratio_hi"]
    assert math.isnan(result["dist_1_change"])
    rows = [{"prompt_id": p, "continuation": t} for p, t in (("a", "x y z"), ("b", "x x x x"), ("c", "u v"))]
    repeated = [{"prompt_id": p, "continuation": t} for p, t in (("a", "x x z"), ("b", "x x x x"), ("c", "u u"))]
    result = paired_quality({"rows": rows}, {"rows": repeated}, resamples=200)
    # dist-1 per prompt: 1, 0.25, 1 -> 2/3, 0.25, 0.5
    assert result["dist_1_change"] == pytest.approx((2 / 3 + 0.25 + 0.5) / (1 + 0.25 + 1) - 1)
    other_texts = {"neutral": {"key": "other", "per_text": [[-1.0, 1]]}}
    assert math.isnan(paired_quality(base, other_texts)["neutral_ppl_ratio"])  # other texts: nothing to pair
