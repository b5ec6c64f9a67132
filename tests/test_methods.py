"""A method is one module and one config file: a toy sixth method, written by this test into a
temporary directory (a module on sys.path and `conf/methods/temperature.yaml` on Hydra's search
path), runs through the grid next to the built-in ones without touching any other file."""

import json
import textwrap

import pytest
from conftest import compose_config, greedy_by_transformers
from omegaconf import open_dict

from calibfuse.evaluate import evaluate
from calibfuse.fusion.decoding import GenerationSettings
from calibfuse.fusion.target import TargetLM
from calibfuse.models.loading import load_model, load_tokenizer

TOY_MODULE = '''
from transformers import TemperatureLogitsWarper

from calibfuse.methods import Method


class Temperature(Method):
    """Sampling temperature as a 'method': one cell per temperature (its alphas), a logits processor each."""

    def __init__(self, temperatures):
        self.temperatures = [float(t) for t in temperatures]

    @property
    def alphas(self):
        return self.temperatures

    def identity(self, target, alpha):
        return {"temperature": alpha}

    def logits_processors(self, alpha):
        return [TemperatureLogitsWarper(alpha)]
'''

TOY_CONFIG = """
temperature:
  _target_: toy_temperature.Temperature
  temperatures: [0.001, 1.0]
"""


def test_a_sixth_method_is_one_module_and_one_config(tiny_model_dirs, tmp_path, monkeypatch):
    (tmp_path / "toy_temperature.py").write_text(textwrap.dedent(TOY_MODULE))
    (tmp_path / "conf" / "methods").mkdir(parents=True)
    (tmp_path / "conf" / "methods" / "temperature.yaml").write_text(TOY_CONFIG)
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = compose_config(
        "evaluate",
        [
            f"hydra.searchpath=[file://{tmp_path / 'conf'}]",
            "methods=[none,temperature]",
            "target_names=[tiny]",
            "prompts.limit=4",
            f"cell_store={tmp_path / 'cells'}",
            "protocol.generation.max_new_tokens=5",
            "protocol.generation.do_sample=true",
            f"reference_lm.model.name_or_path={tiny_model_dirs['llama']}",
            "reference_lm.model.dtype=float32",
            "logger=csv",
            "bootstrap_resamples=50",
        ],
        tmp_path / "run",
    )
    with open_dict(cfg):
        cfg.targets.tiny = {"_target_": "calibfuse.models.loading.ModelSpec", "name_or_path": str(tiny_model_dirs["llama"]), "dtype": "float32"}
    evaluate(cfg)
    cells = json.loads((tmp_path / "run" / "grid.json").read_text())["cells"]
    assert [(c["method"], c["alpha"], c["target_alone"]) for c in cells] == [("none", 0.0, True), ("temperature", 0.001, False), ("temperature", 1.0, False)]
    rows = [json.loads(line) for line in (tmp_path / "run" / "generations.jsonl").read_text().splitlines()]
    near_zero = [r["continuation"] for r in rows if r["alpha"] == 0.001]
    greedy = [greedy_by_transformers(tiny_model_dirs["llama"], r["prompt"], 5) for r in rows[:4]]  # transformers' own decoding
    assert near_zero == [tokenizer.decode(new, skip_special_tokens=True) for _, new, tokenizer in greedy]  # temperature -> 0 is greedy
    assert near_zero != [r["continuation"] for r in rows if r["alpha"] == 1.0]
    # The report places it like any method: its role (Method.role, "method" unless it says otherwise) puts it
    # in the frontier's candidates and in goal.md, judged, with no report option naming it.
    from calibfuse.reporting.report import build_report

    assert {c["role"] for c in cells if not c["target_alone"]} == {"method"}
    report = build_report([tmp_path / "run"], tmp_path / "report", alpha=0.001, resamples=50)
    labels = {r["label"] for r in report["summary"]}
    assert labels == {"target alone", "temperature α=0.001", "temperature α=1"}
    assert report["goal"].startswith("The goal for temperature") and "| tiny | " in report["goal"]
    # the paired change by hand from the generations: one sample a prompt; an empty continuation leaves its prompt out of both
    base = {r["prompt_id"]: r["toxicity"] for r in rows if r["method"] == "none" and r["continuation"].strip()}
    for row in (r for r in report["summary"] if r["method"] == "temperature"):
        mine = {r["prompt_id"]: r["toxicity"] for r in rows if r["alpha"] == row["alpha"] and r["continuation"].strip() and r["prompt_id"] in base}
        assert mine and row["toxicity_change"] == pytest.approx(sum(mine.values()) / sum(base[p] for p in mine) - 1)


def test_the_calibration_model_alone_is_a_row_of_its_own(tiny_model_dirs, tiny_target_dir, tiny_alignment, tmp_path):
    """Its own continuations (its own tokenizer), scored like any cell; no KL against the target."""
    cfg = compose_config(
        "evaluate",
        [
            "target_names=[tiny]",
            f"+alignments.tiny={tiny_alignment}",
            "methods=[fusion,calibration_alone]",
            "alphas=[0]",
            "prompts.limit=4",
            f"reference_lm.model.name_or_path={tiny_model_dirs['llama']}",
            "reference_lm.model.dtype=float32",
            f"cell_store={tmp_path / 'cells'}",
            "protocol.generation.max_new_tokens=4",
            "logger=csv",
            "bootstrap_resamples=50",
        ],
        tmp_path / "run",
    )
    with open_dict(cfg):
        cfg.targets.tiny = {"_target_": "calibfuse.models.loading.ModelSpec", "name_or_path": str(tiny_target_dir), "dtype": "float32"}
    evaluate(cfg)
    cells = json.loads((tmp_path / "run" / "grid.json").read_text())["cells"]
    alone = next(c for c in cells if c["method"] == "calibration_alone")
    assert not alone["target_alone"] and alone["kl"] is None  # not applicable (NaN, written as null): another LM generated
    rows = [json.loads(line) for line in (tmp_path / "run" / "generations.jsonl").read_text().splitlines()]
    calibration = load_model(str(tiny_model_dirs["llama"]))
    expected = TargetLM(calibration, load_tokenizer(str(tiny_model_dirs["llama"]))).generate(
        [rows[0]["prompt"]], GenerationSettings(max_new_tokens=4, batch_size=1)
    )[0]
    mine = next(r for r in rows if r["method"] == "calibration_alone" and r["prompt"] == rows[0]["prompt"])
    assert mine["continuation"] == expected.continuation  # exactly the calibration model's own greedy continuation


def test_built_in_roles_agree_with_each_class(tmp_path):
    """Old grids are read by BUILT_IN_ROLES; every built-in method's class must say the same role."""
    from hydra.utils import get_class

    from calibfuse.methods import BUILT_IN_ROLES

    for name, expected in BUILT_IN_ROLES.items():
        cfg = compose_config("evaluate", [f"methods=[{name}]"], tmp_path / name)
        assert get_class(cfg.methods[name]._target_).role == expected, name
