"""The generate entry point: prompts in, generations.jsonl out; and its bad input."""

import json

import pytest
from conftest import compose_config, greedy_by_transformers

from calibfuse.generate import generate, read_prompts


def test_generate_writes_one_row_per_alpha_prompt_sample(tiny_model_dirs, tiny_target_dir, tiny_alignment, tmp_path):
    cfg = compose_config(
        "generate",
        [
            f"calibration_model.name_or_path={tiny_model_dirs['llama']}",
            f"target.name_or_path={tiny_target_dir}",
            f"alignment_dir={tiny_alignment}",
            "alphas=[0,0.5]",
            "generation.max_new_tokens=5",
            "generation.do_sample=true",
            "generation.num_samples=2",
        ],
        tmp_path / "run",
    )
    generate(cfg)
    rows = [json.loads(line) for line in (tmp_path / "run" / "generations.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * 3 * 2  # alphas x default prompts x samples
    assert set(rows[0]) == {"prompt", "alpha", "sample", "continuation", "prompt_tokens", "new_tokens", "ended_with_eos"}
    assert {r["alpha"] for r in rows} == {0.0, 0.5} and all(0 < r["new_tokens"] <= 5 for r in rows)
    summary = json.loads((tmp_path / "run" / "generate.json").read_text())
    assert summary["rows"] == 12 and summary["tokens_per_second"] > 0


def test_greedy_alpha_zero_is_what_transformers_generates(tiny_model_dirs, tiny_target_dir, tiny_alignment, tmp_path):
    """At alpha 0 the target alone: each continuation and its prompt's token count are what the target
    generates greedily through transformers' own `generate`, one prompt at a time."""
    overrides = [f"target.name_or_path={tiny_target_dir}", f"alignment_dir={tiny_alignment}", "alphas=[0]", "generation.max_new_tokens=6"]
    generate(compose_config("generate", overrides, tmp_path / "run"))
    rows = [json.loads(line) for line in (tmp_path / "run" / "generations.jsonl").read_text().splitlines()]
    assert len(rows) == 3
    for row in rows:
        prompt_tokens, new, tokenizer = greedy_by_transformers(tiny_target_dir, row["prompt"], 6)
        ended = tokenizer.eos_token_id in new
        assert row["prompt_tokens"] == prompt_tokens and row["new_tokens"] == len(new) and row["ended_with_eos"] == ended
        assert row["continuation"] == tokenizer.decode([t for t in new if t != tokenizer.eos_token_id], skip_special_tokens=True)


def test_prompts_from_txt_and_rtp_jsonl(tmp_path):
    (tmp_path / "p.txt").write_text("first\n\nsecond\n")
    assert read_prompts(str(tmp_path / "p.txt")) == ["first", "second"]
    (tmp_path / "p.jsonl").write_text('{"prompt": {"text": "So, I"}}\n{"prompt": "plain"}\n')
    assert read_prompts(str(tmp_path / "p.jsonl"), limit=1) == ["So, I"]


def test_empty_and_malformed_prompt_sets(tmp_path):
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(ValueError, match="no prompts"):
        read_prompts(str(tmp_path / "empty.txt"))
    (tmp_path / "bad.jsonl").write_text('{"prompt": "ok"}\n{"prompt": \n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: malformed JSON line"):
        read_prompts(str(tmp_path / "bad.jsonl"))
    with pytest.raises(FileNotFoundError, match="nowhere.txt"):
        read_prompts(str(tmp_path / "nowhere.txt"))


def test_shipped_challenge_set_reads_as_rtp():
    from importlib import resources

    path = resources.files("calibfuse") / "resources" / "challenge" / "prompts.jsonl"
    prompts = read_prompts(str(path))
    assert len(prompts) == 200 and len(set(prompts)) == 200
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert sum(r["challenging"] for r in rows) == 160


def test_generate_takes_the_calibration_model_the_alignment_records_and_prints(tiny_model_dirs, tiny_target_dir, tiny_alignment, tmp_path, capsys):
    cfg = compose_config(
        "generate",
        [f"target.name_or_path={tiny_target_dir}", f"alignment_dir={tiny_alignment}", "alphas=[0,0.5]", "generation.max_new_tokens=3"],
        tmp_path / "run",
    )
    assert cfg.calibration_model.name_or_path is None  # not asked for: the alignment names it
    generate(cfg)
    rows = [json.loads(line) for line in (tmp_path / "run" / "generations.jsonl").read_text().splitlines()]
    printed = capsys.readouterr().out.splitlines()
    assert [f"α={r['alpha']:g} | {r['prompt']!r} -> {r['continuation']!r}" for r in rows] == [line for line in printed if line.startswith("α=")]
    # the α 0.5 rows are fusion with the model the alignment was trained from (the fixture's tiny Llama), named here
    from calibfuse.fusion.decoding import GenerationSettings
    from calibfuse.fusion.generator import FusedGenerator

    named = FusedGenerator.from_artifacts(str(tiny_target_dir), str(tiny_model_dirs["llama"]), tiny_alignment)
    fused = [r for r in rows if r["alpha"] == 0.5]
    expected = named.generate([r["prompt"] for r in fused], 0.5, GenerationSettings(max_new_tokens=3))
    assert [r["continuation"] for r in fused] == [out.continuation for out in expected]
    assert [r["continuation"] for r in fused] != [r["continuation"] for r in rows if r["alpha"] == 0]  # fusion moved them
    identity = compose_config("generate", [f"target.name_or_path={tiny_target_dir}", "alignment_dir=null"], tmp_path / "identity")
    with pytest.raises(ValueError, match=r"calibration_model\.name_or_path=null with alignment_dir=null"):
        generate(identity)
