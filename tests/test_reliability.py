"""Reliability (issue 12): artifacts that survive a move, required values that stay required,
non-finite alignments, unique run dirs, and bad grid options refused before any model loads."""

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from conftest import CONF_DIR, compose_config, make_tiny_model
from omegaconf import OmegaConf, open_dict
from omegaconf.errors import MissingMandatoryValue
from safetensors.torch import load_file, save_file

from calibfuse.align import align
from calibfuse.evaluate import evaluate
from calibfuse.fusion.artifacts import load_alignment, recorded_model
from calibfuse.models import loading as models
from calibfuse.stages.align import AlignmentModule


def align_tiny(calibration: str, target: Path, output_dir: Path, *overrides: str) -> Path:
    align(
        compose_config(
            "align",
            [f"calibration_model.name_or_path={calibration}", f"target.name_or_path={target}", "trainer.max_epochs=1", "logger=csv", *overrides],
            output_dir,
        )
    )
    return output_dir / "alignment"


def grid_cfg(alignment: Path, target: Path, reference: Path, tmp_path: Path, *overrides: str):
    """The evaluate config on one tiny target, two prompts, three new tokens."""
    cfg = compose_config(
        "evaluate",
        [
            "target_names=[tiny]",
            f"+alignments.tiny={alignment}",
            "prompts.limit=2",
            "alphas=[0.5]",
            f"reference_lm.model.name_or_path={reference}",
            "reference_lm.model.dtype=float32",
            f"cell_store={tmp_path / 'cells'}",
            "protocol.generation.max_new_tokens=3",
            "protocol.generation.batch_size=2",
            "logger=csv",
            "bootstrap_resamples=50",
            *overrides,
        ],
        tmp_path / "run",
    )
    with open_dict(cfg):
        cfg.targets.tiny = {"_target_": "calibfuse.models.loading.ModelSpec", "name_or_path": str(target), "dtype": "float32"}
    return cfg


@pytest.fixture
def no_model_loads(monkeypatch):
    """Bad input must fail before any model or tokenizer is loaded."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the bad input was refused")

    monkeypatch.setattr(models, "load_model", refuse)
    monkeypatch.setattr(models, "load_tokenizer", refuse)


# Case 1: an alignment finds its calibration model from another working directory and in a moved tree.


def test_a_moved_outputs_tree_still_finds_its_calibration_model(tiny_model_dirs, tiny_target_dir, tmp_path, monkeypatch):
    first, second, elsewhere = tmp_path / "first", tmp_path / "second", tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.copytree(tiny_model_dirs["llama"], first / "outputs" / "pretrain" / "calibration_model")
    monkeypatch.chdir(first)
    align_tiny("outputs/pretrain/calibration_model", tiny_target_dir, Path("outputs/align"))  # relative, as the pipeline passes it
    record = json.loads((first / "outputs/align/alignment/alignment.json").read_text())["calibration_model"]
    assert record["name_or_path"] == "../../pretrain/calibration_model"  # relative to the alignment dir
    assert record["absolute_path"] == str((first / "outputs/pretrain/calibration_model").resolve())

    shutil.move(first / "outputs", second / "outputs")  # the recorded absolute path is gone too
    monkeypatch.chdir(elsewhere)
    moved = second / "outputs" / "align" / "alignment"
    summary = evaluate(grid_cfg(moved, tiny_target_dir, tiny_model_dirs["llama"], tmp_path))
    assert summary["computed"] == 1

    make_tiny_model("llama", tiny_model_dirs["llama"], second / "outputs/pretrain/calibration_model", seed=7)  # other weights, same place
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("the pairing must be refused before any model loads"))
    with pytest.raises(ValueError, match=r"was made for calibration_model '\.\./\.\./pretrain/calibration_model' \(sha256:"):
        evaluate(grid_cfg(moved, tiny_target_dir, tiny_model_dirs["llama"], tmp_path, f"cell_store={tmp_path / 'other_cells'}"))


def test_recorded_model_names(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "cal").mkdir(parents=True)
    alignment_dir = tmp_path / "align" / "alignment"
    # an older alignment recorded the path relative to the working directory it was made in
    assert recorded_model({"name_or_path": "runs/cal"}, alignment_dir) == str(tmp_path / "runs" / "cal")
    assert recorded_model({"name_or_path": "smollm2-135m-instruct"}, alignment_dir) == "smollm2-135m-instruct"
    assert recorded_model({"name_or_path": "org/name"}, alignment_dir) == "org/name"  # a hub id
    with pytest.raises(FileNotFoundError, match=r"local model 'outputs/pipeline/stages/pretrain-1/calibration_model', which is not at"):
        recorded_model({"name_or_path": "outputs/pipeline/stages/pretrain-1/calibration_model"}, alignment_dir)  # not a hub error


# Case 2: a required value (???) stays required whatever its option inherits.

ENTRY = {
    "scorer": "evaluate",
    "prompts": "evaluate",
    "reference_lm": "evaluate",
    "protocol": "evaluate",
    "target": "align",
    "base_model": "pretrain",
    "data": "pretrain",
}


def flat_leaves(node: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in node.items():
        out.update(flat_leaves(value, f"{prefix}{key}.") if isinstance(value, dict) and value else {f"{prefix}{key}": value})
    return out


def written_values(group: str, option: str) -> dict:
    """An option's values read from its YAML files by its defaults list, the last file to write a key winning
    (a `???` included): what a user reading the files expects the option to be."""
    raw = yaml.safe_load((Path(CONF_DIR) / group / f"{option}.yaml").read_text()) or {}
    values: dict = {}
    for entry in raw.pop("defaults", ["_self_"]):
        if entry == "_self_":
            values.update(flat_leaves(raw))
        else:
            name, _, package = entry.partition("@")
            sub_group, _, sub_option = name.lstrip("/").rpartition("/") if name.startswith("/") else (group, "/", name)
            prefix = "" if package in ("", "_here_") else package + "."  # e.g. /model_spec@model: under `model`
            values.update({prefix + k: v for k, v in written_values(sub_group, sub_option).items()})
    return values


@pytest.mark.parametrize("group", sorted(ENTRY))
def test_required_values_stay_required(group, tmp_path):
    for option in sorted(p.stem for p in (Path(CONF_DIR) / group).glob("*.yaml")):
        overrides = [f"{group}={option}"] + (["calibration_model.name_or_path=x"] if group == "target" else [])
        composed = compose_config(ENTRY[group], overrides, tmp_path)[group]
        expected = {key for key, value in written_values(group, option).items() if value == "???"}
        missing = {
            key
            for key in flat_leaves(OmegaConf.to_container(composed, resolve=False))
            if OmegaConf.is_missing(OmegaConf.select(composed, key.rpartition(".")[0]) if "." in key else composed, key.rpartition(".")[2])
        }
        assert missing == expected, f"{group}={option}"
    if group == "prompts":  # the trap this test is for: local_jsonl used to inherit the challenge set's source
        assert OmegaConf.is_missing(compose_config("evaluate", ["prompts=local_jsonl"], tmp_path).prompts, "source")


@pytest.mark.parametrize("override, key", [("prompts=local_jsonl", "prompts.source"), ("scorer=hf_classifier", "scorer.model")])
def test_evaluate_names_an_unset_required_value_before_any_model_loads(
    override, key, tiny_alignment, tiny_model_dirs, tiny_target_dir, tmp_path, no_model_loads
):
    with pytest.raises(MissingMandatoryValue, match=rf"not set: {key} \(\?\?\? in the config\); expected it on the command line, e\.g\. {key}="):
        evaluate(grid_cfg(tiny_alignment, tiny_target_dir, tiny_model_dirs["llama"], tmp_path, override))


# Case 3: a non-finite alignment is never written, and never read.


def test_align_refuses_to_write_a_diverged_alignment(tiny_model_dirs, tiny_target_dir, tmp_path, monkeypatch):
    real = AlignmentModule.training_step

    def diverges_in_epoch_two(self, positions, batch_idx):
        if self.current_epoch == 1:
            with torch.no_grad():
                self.A.weight[0, 0] = float("nan")
        return real(self, positions, batch_idx)

    monkeypatch.setattr(AlignmentModule, "training_step", diverges_in_epoch_two)
    with pytest.raises(RuntimeError, match=r"alignment A has \d+ non-finite entries of 1536 after epoch 2 of 3 \(global step \d+\); refusing"):
        align_tiny(str(tiny_model_dirs["llama"]), tiny_target_dir, tmp_path, "trainer.max_epochs=3")
    assert not (tmp_path / "alignment" / "alignment.safetensors").exists()


def test_a_non_finite_alignment_is_refused_before_any_model_loads(tiny_alignment, tiny_model_dirs, tiny_target_dir, tmp_path, no_model_loads):
    broken = tmp_path / "alignment"
    shutil.copytree(tiny_alignment, broken)
    tensors = load_file(broken / "alignment.safetensors")
    tensors["A"][0, :3] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    save_file(tensors, broken / "alignment.safetensors")
    with pytest.raises(ValueError, match=rf"alignment file '{broken}/alignment.safetensors' holds 3 non-finite entries of 1536 in A"):
        load_alignment(broken)
    with pytest.raises(ValueError, match="holds 3 non-finite entries"):
        evaluate(grid_cfg(broken, tiny_target_dir, tiny_model_dirs["llama"], tmp_path))


# Case 4: runs started in the same second get their own dirs.


def test_runs_started_in_the_same_second_get_their_own_dirs(monkeypatch):
    from datetime import datetime

    from hydra import compose, initialize_config_dir

    import calibfuse.utils.run as utils

    class Frozen(datetime):
        @classmethod
        def now(cls, tz=None):
            return datetime(2026, 11, 28, 21, 0, 0)

    monkeypatch.setattr(utils, "datetime", Frozen)
    dirs = []
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        for _ in range(2):
            cfg = compose("evaluate", return_hydra_config=True)
            run, sweep = cfg.hydra.run.dir, cfg.hydra.sweep.dir
            assert cfg.hydra.run.dir == run  # OmegaConf resolves ${run_id:} again on every read: it must give one name per run
            dirs += [run, sweep]
    assert all(Path(d).name.startswith("2026-11-28_21-00-00_") for d in dirs)
    assert dirs[0] != dirs[2] and dirs[1] != dirs[3]


# Case 6: bad grid options, refused with the value and what was expected, before any model loads.


@pytest.mark.parametrize(
    "override, message",
    [
        ("prompts.limit=-1", r"prompts.limit=-1; expected an integer >= 1 or null"),
        ("prompts.limit=2.5", r"prompts.limit=2.5; expected an integer >= 1 or null"),
        ("prompts.sample=0", r"prompts.sample=0; expected an integer >= 1 or null"),
        ("seeds=[a]", r"seeds='a'; expected an integer"),
        ("seeds=[]", r"seeds=\[\]; expected a non-empty list of integers"),
        ("protocol.generation.batch_size=0", r"protocol.generation.batch_size=0; expected an integer >= 1"),
        ("protocol.generation.num_samples=0", r"protocol.generation.num_samples=0; expected an integer >= 1"),
        ("alphas=[]", r"alphas=\[\]; expected at least one fusion weight"),
        ("alphas=[a]", r"alphas has 'a'; expected numbers in \[0, 1\]"),
        ("alphas=[1.5]", r"alpha=1.5; expected a weight in \[0, 1\]"),
    ],
)
def test_bad_grid_options(override, message, tiny_alignment, tiny_model_dirs, tiny_target_dir, tmp_path, no_model_loads):
    with pytest.raises(ValueError, match=message):
        evaluate(grid_cfg(tiny_alignment, tiny_target_dir, tiny_model_dirs["llama"], tmp_path, override))


def test_repeated_alphas_and_seeds_run_once(tiny_alignment, tiny_model_dirs, tiny_target_dir, tmp_path):
    summary = evaluate(grid_cfg(tiny_alignment, tiny_target_dir, tiny_model_dirs["llama"], tmp_path, "alphas=[0.5,0,0.5]", "seeds=[3,3]"))
    assert summary["cells"] == summary["computed"] == 2
    cells = json.loads((tmp_path / "run" / "grid.json").read_text())["cells"]
    assert [(c["alpha"], c["seed"]) for c in cells] == [(0.5, 3), (0.0, 3)]


def test_a_prompt_longer_than_the_context_is_refused_or_cut_from_the_left(tiny_model_dirs):
    from calibfuse.fusion.decoding import GenerationSettings
    from calibfuse.fusion.target import TargetLM
    from calibfuse.models.loading import load_model, load_tokenizer

    path = str(tiny_model_dirs["llama"])
    target = TargetLM(load_model(path), load_tokenizer(path))
    assert target.context_length == 512  # the tiny config's max_position_embeddings
    long_prompt = "the cat sat on the mat and " * 200
    assert len(target.prompt_ids([long_prompt])[0]) > 512
    with pytest.raises(ValueError, match=r"1 of 2 prompts are too long .*prompt 1 has \d+ tokens.*holds at most 508.*long_prompts=truncate_left"):
        target.generate(["short", long_prompt], GenerationSettings(max_new_tokens=4))
    (short, cut) = target.generate(["short", long_prompt], GenerationSettings(max_new_tokens=4, long_prompts="truncate_left"))
    assert cut.prompt_tokens == 508 and short.prompt_tokens < 10 and cut.new_tokens >= 1
    full = target.prompt_ids([long_prompt])[0]
    keep_end = GenerationSettings(max_new_tokens=4, long_prompts="truncate_left")
    assert target.fit_context([full], keep_end)[0] == full[-508:]
    target.tokenizer.bos_token = target.tokenizer.convert_ids_to_tokens(1)
    with_bos = [1, *full]
    assert target.fit_context([with_bos], keep_end)[0] == [1, *full[-507:]]  # a leading BOS stays
    with pytest.raises(ValueError, match="long_prompts='cut'; expected one of"):
        GenerationSettings(long_prompts="cut")


def test_hub_models_are_keyed_by_the_commit_they_resolve_to(tmp_path, monkeypatch):
    from calibfuse.models.loading import fingerprint, hub_commit

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "models--org--model"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "snapshots" / commit / "config.json").write_text("{}")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    assert hub_commit("org/model") == commit
    assert fingerprint("org/model") == f"hub:org/model@{commit}"
    assert hub_commit("org/model", revision="f" * 40) == "f" * 40  # a pinned commit is its own key
    assert hub_commit("org/other", revision="v1") == "v1@unresolved"  # offline and never downloaded


@pytest.mark.parametrize("suffix", [".txt", ".jsonl", ".tsv"])
def test_a_binary_prompt_file_is_named(suffix, tmp_path):
    from calibfuse.data.prompts import load_prompts

    path = tmp_path / f"prompts{suffix}"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe binary")
    with pytest.raises(ValueError, match=rf"{path.name}.*not UTF-8 text"):
        load_prompts(str(path))


def test_unloadable_model_dirs_and_offline_hub_ids_are_named(tiny_model_dirs, tmp_path, monkeypatch):
    import shutil

    from calibfuse.models.loading import load_model, load_tokenizer

    no_config = tmp_path / "no_config"
    shutil.copytree(tiny_model_dirs["llama"], no_config)
    (no_config / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"no_config' has no config.json"):
        load_model(str(no_config))
    truncated = tmp_path / "truncated"
    shutil.copytree(tiny_model_dirs["llama"], truncated)
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:500])
    with pytest.raises(ValueError, match=r"truncated/model.safetensors' cannot be read .* truncated or corrupted"):
        load_model(str(truncated))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for load in (load_model, load_tokenizer):
        with pytest.raises(OSError, match=r"model 'no-such-org/no-such-model' is not a local path, and the hub is offline here"):
            load("no-such-org/no-such-model")
