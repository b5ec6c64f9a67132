"""Reliability, second round: a damaged finished cell is never reused, and SIGTERM stops a run within
seconds with a non-zero status, after which the same command resumes."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import test_pipeline
from test_pipeline import run
from test_reliability import grid_cfg

from calibfuse.evaluate import evaluate
from calibfuse.utils.run import SIGTERM_EXIT, stop_on_sigterm

pipeline_cfg = test_pipeline.pipeline_cfg  # the pipeline's fixture, on tiny models


def test_a_damaged_cell_is_set_aside_and_computed_again(tiny_alignment, tiny_model_dirs, tiny_target_dir, tmp_path, caplog):
    """Three damages, each found on reuse, named, kept aside and recomputed to the undamaged values:
    rows cut to half (the checksum), garbage in cell.json, and an old cell (no checksum) cut mid-line."""
    cfg = grid_cfg(tiny_alignment, tiny_target_dir, tiny_model_dirs["llama"], tmp_path, "prompts.limit=4", "alphas=[0,0.3,0.5]")
    evaluate(cfg)
    first = {c["cell"]: c for c in json.loads((tmp_path / "run" / "grid.json").read_text())["cells"]}
    short, garbage, old = (tmp_path / "cells" / name for name in sorted(first))
    lines = (short / "rows.jsonl").read_text().splitlines(keepends=True)
    (short / "rows.jsonl").write_text("".join(lines[:2]))
    (garbage / "cell.json").write_text("{not json")
    description = json.loads((old / "cell.json").read_text())
    del description["sha256"]
    (old / "cell.json").write_text(json.dumps(description))
    (old / "rows.jsonl").write_text((old / "rows.jsonl").read_text()[:-20])

    summary = evaluate(cfg)
    assert (summary["computed"], summary["reused"]) == (3, 0)
    second = {c["cell"]: c for c in json.loads((tmp_path / "run" / "grid.json").read_text())["cells"]}
    assert {k: (c["prompts"], c["toxicity"], c["perplexity"]) for k, c in second.items()} == {k: (4, c["toxicity"], c["perplexity"]) for k, c in first.items()}
    warnings = [r.getMessage() for r in caplog.records if "is damaged" in r.getMessage()]
    assert len(warnings) == 3
    assert any(str(short) in w and "does not match the sha256" in w for w in warnings)
    assert any(str(garbage) in w and "JSONDecodeError" in w for w in warnings)
    assert any(str(old) in w and "rows.jsonl:4 is not a JSON row" in w for w in warnings)
    assert len(list(short.glob("rows.jsonl.broken-*"))) == 1 and len(list(garbage.glob("cell.json.broken-*"))) == 1  # kept, not deleted
    assert evaluate(cfg)["reused"] == 3  # the recomputed cells are whole


def test_sigterm_inside_the_context_exits_non_zero_and_restores_the_handler():
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as stopped, stop_on_sigterm():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler runs at once; this line is never finished
    assert stopped.value.code == SIGTERM_EXIT == 143
    assert signal.getsignal(signal.SIGTERM) is before


@pytest.mark.slow
def test_sigterm_stops_a_grid_within_seconds_and_the_rerun_resumes(tiny_alignment, tiny_model_dirs, tiny_target_dir, tmp_path):
    """SIGTERM while a cell generates: the process ends within seconds, non-zero, and the next run
    reuses what finished and computes only the rest (SLURM sends SIGTERM before its kill)."""
    command = tiny_grid_command(
        tiny_alignment, tiny_model_dirs, tiny_target_dir, tmp_path, "protocol.generation.batch_size=4", prompts=24, alphas="[0,0.25,0.5]", new_tokens=16
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    deadline = time.time() + 240
    while not list((tmp_path / "cells").glob("*/cell.json")) and time.time() < deadline and process.poll() is None:
        time.sleep(0.2)
    assert process.poll() is None, process.stdout.read()
    sent = time.time()
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=60)
    assert process.returncode == SIGTERM_EXIT, output
    assert time.time() - sent < 15, output
    finished = len(list((tmp_path / "cells").glob("*/cell.json")))
    assert 1 <= finished < 3, output
    rerun = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    result = json.loads((tmp_path / "run" / "evaluate.json").read_text())
    assert (result["reused"], result["computed"]) == (finished, 3 - finished)


@pytest.mark.slow
def test_the_pipeline_under_strategy_ddp_finishes(tiny_model_dirs, tiny_target_dir, tmp_path):
    """`strategy=ddp` runs the script again for rank 1, which must neither wait on rank 0's stage lock
    (the deadlock) nor build a single-process stage itself: it joins stage 1's training, then waits for
    rank 0's alignment, and exits."""
    listed = lambda *items: "[" + ",".join(f"'{item}'" for item in items) + "]"  # noqa: E731
    command = [
        sys.executable,
        "-m",
        "calibfuse.pipeline",
        "until=align",
        "targets=[smollm2-135m-instruct]",
        "calibration_layers=2",
        f"stage_store={tmp_path / 'stages'}",
        "pretrain_overrides="
        + listed(
            f"base_model.name_or_path={tiny_model_dirs['llama']}",
            "data=embedded_nontoxic",
            "data.max_examples=32",
            "data.batch_size=4",
            "trainer=ddp_sim",
            "trainer.strategy=ddp",
            "trainer.max_steps=2",
            "logger=csv",
        ),
        "align_overrides=" + listed(f"target.name_or_path={tiny_target_dir}", "trainer.max_epochs=1", "logger=csv"),
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "MEMBER: 2/2" in result.stdout + result.stderr  # both ranks took part in stage 1
    (pretrain,) = (tmp_path / "stages").glob("pretrain-*/stage.json")
    (aligned,) = (tmp_path / "stages").glob("align-*/stage.json")  # built once, by rank 0
    manifest = json.loads((pretrain.parent / "calibration_model" / "manifest.json").read_text())
    assert (manifest["training"]["world_size"], manifest["training"]["global_step"]) == (2, 2)  # trained by both ranks, once
    record = json.loads((tmp_path / "run" / "pipeline.json").read_text())
    assert record["alignments"] == {"smollm2-135m-instruct": str(aligned.parent / "alignment")}
    alignment = json.loads((aligned.parent / "alignment" / "alignment.json").read_text())
    assert Path(alignment["calibration_model"]["absolute_path"]) == (pretrain.parent / "calibration_model").resolve()  # aligned to stage 1's artifact


@pytest.mark.parametrize(
    "damage, match",
    [
        (lambda d: (d / "alignment.json").write_text((d / "alignment.json").read_text()[:40]), r"alignment\.json' is not valid JSON"),
        (lambda d: (d / "alignment.safetensors").write_bytes((d / "alignment.safetensors").read_bytes()[:100]), r"alignment\.safetensors' cannot be read"),
    ],
    ids=["truncated_json", "truncated_safetensors"],
)
def test_a_damaged_alignment_is_named(damage, match, tiny_alignment, tmp_path):
    import shutil

    from calibfuse.fusion.artifacts import load_alignment

    copy = shutil.copytree(tiny_alignment, tmp_path / "alignment")
    damage(copy)
    with pytest.raises(ValueError, match=match + r".*run that stage again"):
        load_alignment(copy)


def test_a_cut_line_in_the_perspective_cache_is_skipped(tmp_path, monkeypatch, caplog):
    from calibfuse.scoring.toxicity import PerspectiveScorer

    monkeypatch.setenv("PERSPECTIVE_API_KEY", "test-key-not-used")
    cache = tmp_path / "perspective.jsonl"
    cache.write_text('{"key": "a", "score": 0.25}\n{"key": "b", "sco\n\n{"key": "c", "score": 0.5}\n')
    scorer = PerspectiveScorer(cache_path=str(cache))
    assert scorer.cache == {"a": 0.25, "c": 0.5}
    assert f"{cache}:2: not a cache entry" in caplog.text


def test_a_damaged_grid_json_is_named(tmp_path):
    from calibfuse.reporting.report import build_report

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "grid.json").write_text('{"cells": [')
    with pytest.raises(ValueError, match=r"grid\.json is not valid JSON .* rerun that grid"):
        build_report([tmp_path / "run"], tmp_path / "report")


HOSTILE = {
    # name: (overrides given the tmp dir, error, what the message must say)
    "alphas_a_string": (lambda d: ["alphas='0.3'"], ValueError, r"alphas='0\.3'; expected a list of fusion weights"),
    "alphas_a_number": (lambda d: ["alphas=0.3"], ValueError, r"alphas=0\.3; expected a list of fusion weights"),
    "sample_beyond_the_set": (lambda d: ["prompts.limit=null", "prompts.sample=100000"], ValueError, r"prompts\.sample=100000, but .* has 200 prompts"),
    "lone_surrogate": (
        lambda d: (d / "p.jsonl").write_text('{"prompt": {"text": "ok"}}\n{"prompt": {"text": "bad \\ud800 text"}}\n') and [f"prompts.source={d / 'p.jsonl'}"],
        ValueError,
        r"prompt .*p\.jsonl: line 2.* holds '\\ud800', a lone surrogate",
    ),
    "source_a_directory": (
        lambda d: (d / "empty_dir").mkdir() or [f"prompts.source={d / 'empty_dir'}"],
        ValueError,
        r"is a directory that `datasets` cannot read",
    ),
    "cell_store_a_file": (lambda d: (d / "store").write_text("x") and [f"cell_store={d / 'store'}"], NotADirectoryError, r"cell_store=.*store' is a file"),
    "gpu_without_a_gpu": (lambda d: ["trainer=gpu"], RuntimeError, r"trainer\.accelerator=gpu, but no CUDA GPU is visible"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_grid_input_is_named_before_any_model_loads(case, tiny_alignment, tiny_model_dirs, tiny_target_dir, tmp_path, monkeypatch):
    import calibfuse.models.loading

    overrides, error, match = HOSTILE[case]
    monkeypatch.setattr(calibfuse.models.loading, "load_model", lambda *a, **k: pytest.fail("a model was loaded before the bad input was found"))
    monkeypatch.setattr(calibfuse.models.loading, "load_tokenizer", lambda *a, **k: pytest.fail("a tokenizer was loaded before the bad input was found"))
    with pytest.raises(error, match=match):
        evaluate(grid_cfg(tiny_alignment, tiny_target_dir, tiny_model_dirs["llama"], tmp_path, *overrides(tmp_path)))


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["targets=[]"], r"targets=\[\] with until=report; expected at least one conf/target/ name"),
        (["targets=[no_such_target]"], r"Could not find 'target/no_such_target'"),
        (["pretrain_overrides=['trainer=gpu']"], r"pretrain_overrides: trainer\.accelerator=gpu, but no CUDA GPU is visible"),
        (  # stage 2 writes its alignment only with its held-out check, which 2 steps never reach
            ["align_overrides=['trainer.max_steps=2']"],
            r"align_overrides: trainer\.max_steps=2 with max_epochs=5 ends stage 2 after 2 batches, before its first held-out check after batch \d+",
        ),
    ],
)
def test_the_pipeline_refuses_what_would_fail_after_stage_1(overrides, match, tmp_path, monkeypatch):
    from conftest import CONF_DIR, compose_config
    from hydra import initialize_config_dir

    import calibfuse.pipeline

    monkeypatch.setattr(calibfuse.pipeline, "pretrain", lambda cfg: pytest.fail("stage 1 started before the bad input was found"))
    cfg = compose_config("pipeline", [f"stage_store={tmp_path / 'stages'}", *overrides], tmp_path / "run")
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"), pytest.raises(Exception, match=match):
        calibfuse.pipeline.pipeline(cfg)


def test_a_failing_scorer_loses_no_generations(tiny_alignment, tiny_model_dirs, tiny_target_dir, tmp_path, monkeypatch):
    """The scorer fails after the first batch is generated (Perspective offline, a quota): the rerun
    scores the kept continuations without generating them again, and matches an uninterrupted run."""
    from calibfuse.evaluation.runner import EvaluationModule

    cfg = grid_cfg(tiny_alignment, tiny_target_dir, tiny_model_dirs["llama"], tmp_path, "prompts.limit=4")
    score = EvaluationModule.score

    def quota(self, batch, generations):
        raise RuntimeError("quota exceeded")

    monkeypatch.setattr(EvaluationModule, "score", quota)
    with pytest.raises(RuntimeError, match="quota exceeded"):
        evaluate(cfg)
    (kept,) = (tmp_path / "cells").glob("*/generated.rank0.jsonl")
    assert len(kept.read_text().splitlines()) == 2  # the first batch of 2 prompts, unscored
    monkeypatch.setattr(EvaluationModule, "score", score)
    generate = EvaluationModule.generate
    generated = []
    monkeypatch.setattr(EvaluationModule, "generate", lambda self, batch: generated.append(len(batch)) or generate(self, batch))
    evaluate(cfg)
    assert generated == [2]  # only the second batch
    clean_cfg = grid_cfg(tiny_alignment, tiny_target_dir, tiny_model_dirs["llama"], tmp_path / "clean", "prompts.limit=4")
    evaluate(clean_cfg)

    def rows(path):  # every row, the kept batch and the one generated after the failure, by prompt and sample
        read = [json.loads(line) for line in path.read_text().splitlines()]
        return {(r["method"], r["alpha"], r["prompt_id"], r["sample"]): (r["continuation"], r["toxicity"], r["loss"]) for r in read}

    resumed, clean = rows(tmp_path / "run" / "generations.jsonl"), rows(tmp_path / "clean" / "run" / "generations.jsonl")
    assert len(resumed) == len(clean) >= 4 and resumed == clean
    assert not list((tmp_path / "cells").glob("*/generated.rank*.jsonl"))  # cleared once the cell is stored


def test_an_unresolvable_perspective_host_fails_at_once(tmp_path, monkeypatch):
    import socket
    import urllib.error
    import urllib.request

    from calibfuse.scoring.toxicity import PerspectiveScorer

    monkeypatch.setenv("PERSPECTIVE_API_KEY", "test-key-not-used")

    def no_dns(request, timeout):
        raise urllib.error.URLError(socket.gaierror(-2, "Name or service not known"))

    monkeypatch.setattr(urllib.request, "urlopen", no_dns)
    monkeypatch.setattr("time.sleep", lambda seconds: pytest.fail(f"retried after {seconds} s"))
    scorer = PerspectiveScorer(cache_path=None, max_retries=6)
    with pytest.raises(RuntimeError, match=r"the host does not resolve") as failed:
        scorer.score(["some text"])
    assert scorer.requests == 1 and "test-key-not-used" not in str(failed.value)


def test_a_run_dir_under_a_file_is_named_before_the_run(tmp_path):
    from omegaconf import OmegaConf

    from calibfuse.utils.checks import RefuseSecretsInConfig

    blocked = tmp_path / "blocked"
    blocked.write_text("x")
    config = OmegaConf.create({"hydra": {"run": {"dir": f"{blocked}/runs/${{run_id:}}"}}})
    with pytest.raises(SystemExit, match=rf"hydra\.run\.dir=.*cannot be made: '{blocked}' is a file"):
        RefuseSecretsInConfig.writable(config, "hydra.run.dir")
    RefuseSecretsInConfig.writable(OmegaConf.create({"hydra": {"run": {"dir": f"{tmp_path}/ok/${{run_id:}}"}}}), "hydra.run.dir")  # fine
    assert not (tmp_path / "ok").exists()  # checked, not made: Hydra makes it, with the run id resolved once


def test_the_network_guard_refuses_outside_hosts_and_allows_this_machine():
    import socket

    with pytest.raises(AssertionError, match="tests never touch the network"):
        socket.create_connection(("example.com", 443), timeout=1)
    with pytest.raises(AssertionError, match="tests never touch the network"):
        socket.socket().connect(("93.184.215.14", 443))
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    with socket.create_connection(server.getsockname(), timeout=5):
        pass
    server.close()


def test_a_stage_changed_in_place_is_set_aside_and_rebuilt(pipeline_cfg, tmp_path, caplog):
    """A finished stage records the sha256 of its exported files: one changed weight of the calibration
    model, or a NaN written into A, is found on reuse, named, kept aside and rebuilt; an intact stage is
    reused, and one built before stages recorded their hashes is reused and recorded."""
    import logging

    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    caplog.set_level(logging.INFO, logger="calibfuse.pipeline")
    first = run(pipeline_cfg("until=align"))
    pretrain, alignment = Path(first["pretrain"]), Path(first["alignments"]["smollm2-135m-instruct"])
    recorded = json.loads((pretrain / "stage.json").read_text())["sha256"]
    assert {"calibration_model/model.safetensors", "calibration_model/config.json", "calibration_model/tokenizer.json"} <= set(recorded)
    assert not any("checkpoints" in name for name in recorded)  # Lightning's checkpoints are resumed, never reused: not hashed

    weights = pretrain / "calibration_model" / "model.safetensors"
    damaged = bytearray(weights.read_bytes())
    damaged[-1] ^= 1  # one bit of the last weight: the file still loads
    weights.write_bytes(bytes(damaged))
    caplog.clear()
    run(pipeline_cfg("until=align", output_dir=tmp_path / "second"))
    assert f"{weights} does not match the sha256 recorded when the stage finished" in caplog.text
    (aside,) = tmp_path.joinpath("stages").glob("pretrain-*.broken-*")
    assert (aside / "calibration_model" / "model.safetensors").read_bytes() == bytes(damaged)  # kept, not deleted
    rebuilt = json.loads((pretrain / "stage.json").read_text())["sha256"]
    assert rebuilt["calibration_model/model.safetensors"] == recorded["calibration_model/model.safetensors"]  # the same seeded training again

    path = alignment / "alignment.safetensors"
    with safe_open(str(path), framework="pt") as f:
        tensors, metadata = {name: f.get_tensor(name) for name in f.keys()}, f.metadata()
    tensors["A"][0, 0] = float("nan")
    save_file(tensors, str(path), metadata=metadata)
    caplog.clear()
    run(pipeline_cfg("until=align", output_dir=tmp_path / "third"))
    assert f"{path} does not match the sha256 recorded when the stage finished" in caplog.text and "rebuilding the stage" in caplog.text
    assert len(list(tmp_path.joinpath("stages").glob("align-*.broken-*"))) == 1
    with safe_open(str(path), framework="pt") as f:
        assert torch.isfinite(f.get_tensor("A")).all()

    record = json.loads((alignment.parent / "stage.json").read_text())
    del record["sha256"]  # as a stage built before stages recorded their hashes
    (alignment.parent / "stage.json").write_text(json.dumps(record))
    caplog.clear()
    run(pipeline_cfg("until=align", output_dir=tmp_path / "fourth"))
    assert "rebuilding" not in caplog.text and caplog.text.count("reusing") == 2
    assert "recorded no sha256 of its files (built before stages did); recorded them now" in caplog.text
    assert "alignment/alignment.safetensors" in json.loads((alignment.parent / "stage.json").read_text())["sha256"]


def tiny_grid_command(
    tiny_alignment, tiny_model_dirs, tiny_target_dir, tmp_path, *extra: str, prompts: int = 2, alphas: str = "[0]", new_tokens: int = 2
) -> list[str]:
    """calibfuse.evaluate on the tiny models; by default the smallest grid: one cell of two prompts."""
    return [
        sys.executable,
        "-m",
        "calibfuse.evaluate",
        "target_names=[tiny]",
        f"+targets.tiny={{_target_:calibfuse.models.loading.ModelSpec,name_or_path:{tiny_target_dir},dtype:float32}}",
        f"+alignments.tiny={tiny_alignment}",
        f"prompts.limit={prompts}",
        f"alphas={alphas}",
        f"protocol.generation.max_new_tokens={new_tokens}",
        f"reference_lm.model.name_or_path={tiny_model_dirs['llama']}",
        "reference_lm.model.dtype=float32",
        f"cell_store={tmp_path / 'cells'}",
        "logger=csv",
        "bootstrap_resamples=50",
        f"hydra.run.dir={tmp_path / 'run'}",
        *extra,
    ]


def test_the_same_grid_twice_into_one_run_dir_is_refused_and_the_first_run_kept(tiny_alignment, tiny_model_dirs, tiny_target_dir, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    command = tiny_grid_command(tiny_alignment, tiny_model_dirs, tiny_target_dir, tmp_path)
    first = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    run_dir = tmp_path / "run"
    record = json.loads((run_dir / "run.json").read_text())
    assert (record["task"], record["status"]) == ("evaluate", "finished")
    kept = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    assert {"grid.json", "generations.jsonl", "evaluate.log", "overrides.yaml"} <= {p.name for p in kept}

    again = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert again.returncode == 1
    assert f"hydra.run.dir: '{run_dir}' already holds a finished evaluate run of the same config" in again.stderr
    assert f"Expected another hydra.run.dir (finished cells are reused from cell_store), or '{run_dir}' removed" in again.stderr
    other = subprocess.run([*command, "prompts.limit=1"], capture_output=True, text=True, env=env, timeout=600)
    assert "already holds a finished evaluate run of another config (prompts.limit: 2 -> 1)" in other.stderr
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == kept  # nothing of the first run replaced or appended to
    assert [p.name for p in (run_dir / "csv").iterdir()] == ["version_0"]


def earlier_run(directory: Path, task: str, status: str | None, **config) -> dict:
    """A run dir as an earlier job left it: .hydra/config.yaml and overrides.yaml, and run.json (None: a dir from before run.json)."""
    from omegaconf import OmegaConf

    (directory / ".hydra").mkdir(parents=True)
    config = {"task_name": task, "alphas": [0, 0.5], **config}
    OmegaConf.save(OmegaConf.create(config), directory / ".hydra" / "config.yaml")
    OmegaConf.save(OmegaConf.create([f"{k}={v}" for k, v in config.items() if k != "task_name"]), directory / ".hydra" / "overrides.yaml")
    if status is not None:
        (directory / "run.json").write_text(json.dumps({"task": task, "status": status, "host": "elsewhere", "pid": 1, "pid_started": 0}))
    return config


def test_a_run_dir_holding_an_earlier_job_is_refused_unless_this_job_goes_on_in_it(tmp_path):
    """What may go on in a dir that holds an earlier job: the same pipeline or report (rebuilt from their
    stores), an unfinished grid of the same config (it resumes), a training stage with ckpt_path; the
    rest is refused, naming the dir and what it holds."""
    import socket

    import psutil

    from calibfuse.utils.run_dirs import run_dir_verdict

    def verdict(name, task, config, from_checkpoint=False):
        return run_dir_verdict(tmp_path / name, "hydra.run.dir", task, {"task_name": task, "alphas": [0, 0.5], **config}, None, from_checkpoint)

    assert verdict("fresh", "evaluate", {}) is None
    earlier_run(tmp_path / "pipeline", "pipeline", "finished", until="report")
    assert "holds a finished pipeline run of the same config: going on in it" in verdict("pipeline", "pipeline", {"until": "report"})
    changed = r"a finished pipeline run of another config \(until: 'report' -> 'evaluate'\)"
    with pytest.raises(SystemExit, match=rf"'{tmp_path / 'pipeline'}' already holds {changed}"):
        verdict("pipeline", "pipeline", {"until": "evaluate"})
    with pytest.raises(SystemExit, match=r"already holds a run of calibfuse\.pipeline \(finished\)"):
        verdict("pipeline", "evaluate", {"until": "report"})

    earlier_run(tmp_path / "cut", "evaluate", "running")  # killed: its process is gone
    assert "holds an interrupted evaluate run of the same config: going on in it" in verdict("cut", "evaluate", {})
    earlier_run(tmp_path / "busy", "evaluate", None)
    me = {"task": "evaluate", "status": "running", "host": socket.gethostname(), "pid": os.getpid(), "pid_started": psutil.Process().create_time()}
    (tmp_path / "busy" / "run.json").write_text(json.dumps(me))
    with pytest.raises(SystemExit, match=rf"already holds an evaluate run that is still running \(pid {os.getpid()}\)"):
        verdict("busy", "evaluate", {})
    earlier_run(tmp_path / "legacy", "evaluate", None)  # before run.json: its summary marks it finished
    (tmp_path / "legacy" / "evaluate.json").write_text("{}")
    with pytest.raises(SystemExit, match="already holds a finished evaluate run of the same config"):
        verdict("legacy", "evaluate", {})

    earlier_run(tmp_path / "stage1", "pretrain", "failed")
    hint = r"Expected another hydra\.run\.dir; or, to resume its training there, ckpt_path=last"
    with pytest.raises(SystemExit, match=rf"a failed pretrain run; refusing .* {hint}"):
        verdict("stage1", "pretrain", {})
    assert "going on from ckpt_path in the failed pretrain run it holds" in verdict("stage1", "pretrain", {"ckpt_path": "last"}, from_checkpoint=True)


def test_a_multirun_job_dir_is_checked_against_that_job_s_overrides(tmp_path):
    """A sweep's job dir is compared with the job Hydra will run there: the same job goes on (rerun after a
    kill), a dir holding other overrides is refused before any job starts."""
    from omegaconf import OmegaConf

    from calibfuse.utils.run_dirs import OneRunPerDir

    def start(*task_overrides):
        hydra = {
            "sweeper": {"_target_": "hydra._internal.core_plugins.basic_sweeper.BasicSweeper", "max_batch_size": None, "params": None},
            "sweep": {"dir": str(tmp_path / "sweep"), "subdir": "${hydra.job.num}"},
            "overrides": {"task": list(task_overrides)},
        }
        OneRunPerDir().on_multirun_start(OmegaConf.create({"hydra": hydra, "task_name": "pipeline"}))

    (tmp_path / "sweep" / "0" / ".hydra").mkdir(parents=True)
    OmegaConf.save(OmegaConf.create(["num_negatives=2", "until=evaluate"]), tmp_path / "sweep" / "0" / ".hydra" / "overrides.yaml")
    (tmp_path / "sweep" / "0" / "run.json").write_text(json.dumps({"task": "pipeline", "status": "running", "host": "elsewhere", "pid": 1}))
    start("num_negatives=2,5", "until=evaluate")  # job 0 is the killed one: it goes on; job 1's dir is new
    with pytest.raises(SystemExit, match=r"hydra\.sweep\.dir \(job 0\): '.*/sweep/0' already holds an interrupted pipeline run of another config"):
        start("num_negatives=10,5", "until=evaluate")


def test_a_full_disk_names_the_cell_and_the_file_and_keeps_the_rows(tmp_path, monkeypatch):
    import errno
    import re

    from calibfuse.evaluation.cells import Cell, append_rows, finish_cell

    cell = Cell("tiny", "fusion", 0.5, 0, "ab" * 32)
    cell_dir = tmp_path / cell.name
    cell_dir.mkdir()
    append_rows(cell_dir / "partial.rank0.jsonl", [{"prompt_id": "p0", "sample": 0, "toxicity": 0.1}])

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", full)
    expected = f"cell {cell.name} could not be stored: cannot write {cell_dir / 'rows.jsonl'} (No space left on device); the disk is full"
    with pytest.raises(OSError, match=re.escape(expected) + f".*its rows are kept in {re.escape(str(cell_dir))}, and a rerun stores it") as raised:
        finish_cell(cell, cell_dir, ["p0"], 1, {})
    assert raised.value.errno == errno.ENOSPC
    assert (cell_dir / "partial.rank0.jsonl").is_file() and not (cell_dir / "cell.json").exists()  # nothing lost, nothing marked finished

    monkeypatch.setattr(Path, "open", full)
    with pytest.raises(OSError, match=re.escape(f"cannot append to {cell_dir / 'generated.rank0.jsonl'} (No space left on device); the disk is full")):
        append_rows(cell_dir / "generated.rank0.jsonl", [{"prompt_id": "p1", "sample": 0}])


def test_a_read_only_cache_dir_costs_one_warning_and_no_work(tmp_path, monkeypatch, caplog):
    """Weight hashes are kept in $CALIBFUSE_CACHE_DIR/sha256.json; a cache dir that cannot be written is
    named once, and the weights are hashed without it."""
    import errno

    from calibfuse.models import loading
    from calibfuse.utils.files import sha256_file

    cache, write_text = tmp_path / "cache", Path.write_text

    def read_only(self, *args, **kwargs):
        if cache in self.parents:
            raise OSError(errno.EROFS, "Read-only file system")
        return write_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", read_only)
    monkeypatch.setattr(loading, "_UNCACHED", set())
    weights = [tmp_path / f"model-{i}.safetensors" for i in range(2)]
    for i, path in enumerate(weights):
        path.write_bytes(bytes([i]) * 1000)
    assert [loading._file_sha256(path, str(cache)) for path in weights] == [sha256_file(path) for path in weights]
    (warning,) = [r.getMessage() for r in caplog.records if "weight hashes" in r.getMessage()]
    assert f"cannot keep weight hashes in {cache / 'sha256.json'} (Read-only file system)" in warning and "CALIBFUSE_CACHE_DIR" in warning
    assert not list(cache.glob("*"))  # no temporary file left behind


def test_repeated_prompt_ids_are_made_unique_with_a_warning_naming_them(tmp_path, caplog):
    from calibfuse.data.prompts import load_prompts

    source = tmp_path / "mine.jsonl"
    rows = [{"id": "a", "prompt": {"text": "one"}}, {"id": "b", "prompt": {"text": "two"}}, {"id": "a", "prompt": {"text": "three"}}]
    source.write_text("".join(json.dumps(row) + "\n" for row in rows))
    prompts = load_prompts(str(source))
    assert [p.id for p in prompts] == ["a#0", "b#1", "a#2"]  # rows stay apart
    (warning,) = [r.getMessage() for r in caplog.records if "repeat an id" in r.getMessage()]
    assert f"{source}: 2 of 3 prompts repeat an id ('a' x2); every prompt's id gets its position appended (#0, #1, ...)" in warning


def test_a_wandb_save_dir_that_cannot_be_written_is_named(tmp_path, caplog):
    """wandb falls back to the temporary directory in its own terminal chatter, which calibfuse silences."""
    import tempfile

    from calibfuse.utils.wandb_logger import WandbLogger

    blocked = tmp_path / "file"
    blocked.write_text("x")
    WandbLogger(project="calibfuse", save_dir=str(blocked / "wandb"), offline=True)
    (warning,) = [r.getMessage() for r in caplog.records if "W&B cannot write" in r.getMessage()]
    assert f"W&B cannot write its run to {blocked / 'wandb'} (" in warning and f"temporary directory {tempfile.gettempdir()}" in warning
    assert "logger.wandb.save_dir" in warning
    caplog.clear()
    WandbLogger(project="calibfuse", save_dir=str(tmp_path / "ok"), offline=True)
    assert "W&B cannot write" not in caplog.text


def test_a_run_waiting_for_a_lock_says_so(tmp_path, caplog):
    import logging
    import threading

    from filelock import FileLock

    from calibfuse.utils.files import file_lock

    caplog.set_level(logging.INFO, logger="calibfuse.utils.files")
    path = tmp_path / ".pretrain-abc.lock"
    with file_lock(path):
        pass
    assert "waiting" not in caplog.text  # a free lock is taken at once, silently
    other = FileLock(str(path))
    other.acquire()  # another run holds it
    entered = threading.Event()

    def wait_for_it():
        with file_lock(path):
            entered.set()

    waiter = threading.Thread(target=wait_for_it)
    waiter.start()
    deadline = time.time() + 10
    while f"waiting for {path} held by another run" not in caplog.text and time.time() < deadline:
        time.sleep(0.05)
    assert f"waiting for {path} held by another run" in caplog.text and not entered.is_set()
    other.release()
    waiter.join(timeout=10)
    assert entered.is_set() and f"acquired {path} after" in caplog.text


def test_a_prompt_too_long_is_named_by_its_id_before_the_cell_generates(tiny_alignment, tiny_model_dirs, tiny_target_dir, tmp_path):
    source = tmp_path / "prompts.jsonl"
    long = {"id": "the-long-one", "prompt": {"text": "the cat sat on the mat " * 300}}
    rows = [{"id": f"p{i}", "prompt": {"text": "a short one"}} for i in range(4)] + [long]
    source.write_text("".join(json.dumps(row) + "\n" for row in rows))
    cfg = grid_cfg(tiny_alignment, tiny_target_dir, tiny_model_dirs["llama"], tmp_path, "prompts=local_jsonl", f"prompts.source={source}", "prompts.limit=5")
    with pytest.raises(ValueError, match=r"1 of 5 prompts are too long for .*: prompt 'the-long-one' has \d+ tokens, and its context of \d+ tokens"):
        evaluate(cfg)
    assert not list((tmp_path / "cells").glob("*/generated.rank*.jsonl"))  # before the cell's first batch


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["trainer.max_steps=2"], r"trainer\.max_steps=2 with max_epochs=1 ends stage 2 after 2 batches, before its first held-out check after batch \d+"),
        (["+trainer.limit_val_batches=0"], r"trainer\.limit_val_batches=0: stage 2 never runs its held-out check"),
        (["trainer.max_epochs=1", "trainer.check_val_every_n_epoch=2"], r"max_epochs=1 ends stage 2 after \d+ batches, before its first held-out check"),
    ],
)
def test_stage_2_that_would_stop_before_its_held_out_check_fails_before_training(overrides, match, tiny_model_dirs, tiny_target_dir, tmp_path, monkeypatch):
    """It used to fail after training, when the alignment was to be written without val/top1."""
    from conftest import compose_config

    import calibfuse.align

    monkeypatch.setattr(calibfuse.align, "load_model", lambda *a, **k: pytest.fail("a model was loaded before the trainer was checked"))
    base = [f"calibration_model.name_or_path={tiny_model_dirs['llama']}", f"target.name_or_path={tiny_target_dir}", "trainer.max_epochs=1", "logger=csv"]
    with pytest.raises(ValueError, match=match):
        calibfuse.align.align(compose_config("align", [*base, *overrides], tmp_path / "run"))


def test_a_trainer_that_validates_in_time_passes_the_check():
    from omegaconf import OmegaConf

    from calibfuse.stages.align import check_validates

    def trainer(**keys):
        return OmegaConf.create({"max_epochs": 5, "max_steps": -1, "devices": 1, "check_val_every_n_epoch": 1, **keys})

    check_validates(trainer(), 1000, 32)  # whole epochs: validates at each epoch's end
    check_validates(trainer(max_steps=32), 1000, 32)  # 32 batches an epoch: the first check is at step 32
    check_validates(trainer(max_steps=4, val_check_interval=4), 1000, 32)
    check_validates(trainer(max_steps=16, devices=2), 1000, 32)  # two ranks: 16 batches an epoch each
    check_validates(trainer(devices=-1, max_steps=2), 1000, 32)  # devices unknown before the run: not judged
    with pytest.raises(ValueError, match=r"max_steps=31 .* expected max_steps >= 32"):
        check_validates(trainer(max_steps=31), 1000, 32)
    with pytest.raises(ValueError, match=r"after batch 16 .* expected max_steps >= 8"):
        check_validates(trainer(max_steps=7, accumulate_grad_batches=2, val_check_interval=0.5), 1000, 32)
