"""Baselines on tiny models: DExperts' logits by hand, the word filter's lexicon (its rule: test_word_filter.py),
prompting keeps the original prompt, every method side by side in one grid, and the bad input."""

import json

import pytest
import torch
from conftest import assert_drawn, compose_config, greedy_by_transformers, make_tiny_model
from omegaconf import open_dict

from calibfuse.evaluate import evaluate
from calibfuse.fusion.decoding import GenerationSettings
from calibfuse.fusion.generator import FusedGenerator
from calibfuse.methods.dexperts import DExpertsProcessor
from calibfuse.methods.word_filter import read_lexicon
from calibfuse.models.loading import ModelSpec, load_model, load_tokenizer

PROMPTS = [
    "How do I boil",
    "Tell me about the",
    "The weather today is",
    "My favourite food is",
    "Please explain why",
    "The best way to learn",
    "Yesterday I went",
    "A good friend is",
]


@pytest.fixture(scope="module")
def experts(tiny_tokenizer_dir, tmp_path_factory):
    """Expert and anti-expert: tiny Llamas with the target's tokenizer, other weights."""
    return [make_tiny_model("llama", tiny_tokenizer_dir, tmp_path_factory.mktemp(name), seed=seed) for name, seed in (("expert", 11), ("anti_expert", 12))]


def plain_generator(model_dir):
    spec = ModelSpec(str(model_dir), dtype="float32")
    model, tokenizer = load_model(spec), load_tokenizer(spec)
    return FusedGenerator(model, tokenizer, model, tokenizer, None)


def test_dexperts_logits_are_the_formula_by_hand(tiny_model_dirs, experts):
    generator = plain_generator(tiny_model_dirs["llama"])
    expert, anti = (load_model(ModelSpec(str(d), dtype="float32")) for d in experts)
    tokenizer = generator.target_tokenizer
    settings = GenerationSettings(max_new_tokens=4)
    plain = generator.trace(PROMPTS[:2], 0.0, settings)
    at_zero = generator.trace(PROMPTS[:2], 0.0, settings, processors=[DExpertsProcessor(expert, anti, alpha=0.0)])
    assert all(torch.equal(a["logits"], b["logits"]) for a, b in zip(plain, at_zero, strict=True))  # alpha 0: the target, exactly

    steered = generator.trace([PROMPTS[0]], 0.0, settings, processors=[DExpertsProcessor(expert, anti, alpha=1.5)])
    rows = generator.target_lm.generate([PROMPTS[0]], settings, processors=[DExpertsProcessor(expert, anti, alpha=1.5)])
    ids = tokenizer(PROMPTS[0], return_tensors="pt")["input_ids"]
    for step, record in enumerate(steered):  # recompute every step from scratch on the text so far
        so_far = torch.cat([ids, torch.tensor([rows[0].token_ids[:step]], dtype=torch.long)], dim=1)
        with torch.no_grad():
            z_t, z_e, z_a = (m(so_far).logits[0, -1].float() for m in (generator.target, expert, anti))
        assert torch.allclose(record["logits"][0], z_t + 1.5 * (z_e - z_a), atol=1e-4)


def test_null_calibration_is_the_target_at_temperature_one_over_one_minus_alpha(tiny_model_dirs):
    """Fusion's formula with LN(h_c A) = 0: through a linear head, the target's logits times (1 - alpha)."""
    from calibfuse.fusion.decoding import decode, row_generators
    from calibfuse.methods.null_calibration import NullCalibration

    generator = plain_generator(tiny_model_dirs["llama"])
    settings, ids = GenerationSettings(max_new_tokens=3, do_sample=False), generator._prompt_ids(PROMPTS[:2])
    traces = {}
    for alpha in (0.0, 0.4):
        traces[alpha] = []
        transform = NullCalibration([0.0, 0.4]).hidden_transform(alpha)
        common = dict(eos_ids=generator.eos_ids, hidden_transform=transform, trace=traces[alpha])
        decode(generator.target, generator.target_tokenizer, ids, settings, row_generators([1, 2], generator.device), **common)
    assert NullCalibration([0.0]).hidden_transform(0.0) is None  # alpha 0: the target alone, the shared cell
    for plain, shrunk in zip(traces[0.0], traces[0.4], strict=True):  # greedy: the same tokens, so the same inputs
        assert torch.allclose(shrunk["logits"], 0.6 * plain["logits"], atol=1e-5)


def test_default_lexicon_comes_from_the_scorer_model():
    words = read_lexicon(size=50)
    assert 30 <= len(words) <= 50 and all(w == w.lower() and " " not in w for w in words)


@pytest.fixture
def baseline_cfg(tiny_model_dirs, experts, tmp_path):
    def make(*overrides: str):
        cfg = compose_config(
            "evaluate",
            [
                "target_names=[tiny]",
                "prompts.limit=4",
                f"cell_store={tmp_path / 'cells'}",
                "protocol.generation.max_new_tokens=4",
                f"reference_lm.model.name_or_path={tiny_model_dirs['llama']}",
                "reference_lm.model.dtype=float32",
                "logger=csv",
                "bootstrap_resamples=100",
                *overrides,
            ],
            tmp_path / "run",
        )
        with open_dict(cfg):
            if "dexperts" in cfg.methods:
                for role, path in zip(("expert", "anti_expert"), experts, strict=True):
                    cfg.methods.dexperts[role] = cfg.methods.dexperts[role] or {"name_or_path": str(path)}
            cfg.targets.tiny = {"_target_": "calibfuse.models.loading.ModelSpec", "name_or_path": str(tiny_model_dirs["llama"]), "dtype": "float32"}
        return cfg

    return make


def test_every_offline_method_side_by_side_in_one_grid(baseline_cfg, tmp_path, monkeypatch):
    from calibfuse.fusion.target import TargetLM

    read, generate = [], TargetLM.generate
    monkeypatch.setattr(TargetLM, "generate", lambda self, prompts, *a, **k: read.extend(prompts) or generate(self, prompts, *a, **k))
    evaluate(
        baseline_cfg(
            "methods=[none,word_filter,prompting,dexperts,null_calibration]",
            "methods.dexperts.alphas=[1.0]",
            "methods.word_filter.lexicon=embedded:profanity_check",
            "methods.null_calibration.alphas=[0.5]",
        )
    )
    cells = json.loads((tmp_path / "run" / "grid.json").read_text())["cells"]
    expected = [("none", 0.0), ("word_filter", 0.0), ("prompting", 0.0), ("dexperts", 1.0), ("null_calibration", 0.5)]
    assert [(c["method"], c["alpha"]) for c in cells] == expected
    rows = [json.loads(line) for line in (tmp_path / "run" / "generations.jsonl").read_text().splitlines()]
    assert {r["prompt"] for r in rows if r["method"] == "prompting"} == {r["prompt"] for r in rows if r["method"] == "none"}
    # prompting's continuations are the target's greedy ones after instruction + prompt (no chat template here),
    # through transformers' own generate; the rows show the original prompt
    path = baseline_cfg().targets.tiny.name_or_path
    instruction = "Continue the following text in a respectful, polite and non-toxic way.\n\n"
    for row in (r for r in rows if r["method"] == "prompting"):
        assert instruction + row["prompt"] in read  # what the target was given
        _, new, tokenizer = greedy_by_transformers(path, instruction + row["prompt"], 4)
        assert row["continuation"] == tokenizer.decode(new, skip_special_tokens=True)
    assert "| tiny | dexperts | 1 |" in (tmp_path / "run" / "grid.md").read_text()
    kl = {c["method"]: c["kl"] for c in cells}
    assert kl["none"] == 0 and kl["word_filter"] > 0 and kl["prompting"] is None  # n/a: the target alone would read another prompt


@pytest.mark.parametrize(
    "overrides, error, match",
    [
        (["methods=[dexperts]", "methods.dexperts.expert={name_or_path:null}"], ValueError, r"method 'dexperts' needs methods.dexperts.expert.name_or_path"),
        (["methods=[word_filter]", "methods.word_filter.lexicon=/nowhere/words.txt"], FileNotFoundError, "/nowhere/words.txt"),
    ],
)
def test_bad_baseline_settings(baseline_cfg, overrides, error, match):
    with pytest.raises(error, match=match):
        evaluate(baseline_cfg(*overrides))


def test_dexperts_with_another_tokenizer_is_refused(baseline_cfg, tiny_target_dir):
    with pytest.raises(ValueError, match=r"dexperts: the anti_expert's tokenizer \(\d+ tokens\) differs from the target's"):
        evaluate(baseline_cfg("methods=[dexperts]", f"methods.dexperts.anti_expert={{name_or_path:'{tiny_target_dir}'}}"))


def test_report_puts_every_method_in_the_table_and_tradeoff(baseline_cfg, tiny_model_dirs, tmp_path):
    from calibfuse.reporting.report import build_report

    evaluate(
        baseline_cfg(
            "methods=[fusion,word_filter,dexperts]",
            "alphas=[0,0.5]",
            "fusion.alignment=identity",
            f"calibration_model={{name_or_path:'{tiny_model_dirs['llama']}',dtype:float32}}",
        )
    )
    report = build_report([tmp_path / "run"], tmp_path / "report", alpha=0.5)
    rows = [line for line in report["markdown"].splitlines() if line.startswith("| tiny")]
    assert [row.split(" | ")[1] for row in rows] == ["dexperts α=2", "fusion α=0.5", "word_filter"]
    base = rows[0].split(" | ")[2]
    assert all(row.split(" | ")[2] == base for row in rows)  # one baseline: the target alone
    assert_drawn(tmp_path / "report" / "tradeoff.png")


def test_an_unknown_method_is_refused_with_the_list_of_methods(tmp_path):
    from hydra.errors import MissingConfigException

    with pytest.raises(MissingConfigException, match=r"Could not load 'methods/gedi'"):
        compose_config("evaluate", ["methods=[gedi]"], tmp_path)
