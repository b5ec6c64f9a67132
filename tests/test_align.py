"""Stage 2: negative sampling, InfoNCE, retrieval accuracy, the artifact, and bad input."""

import csv
import hashlib
import json
import shutil
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from conftest import compose_config
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from calibfuse.align import align
from calibfuse.models.loading import ModelSpec, load_tokenizer
from calibfuse.stages.align import AlignmentModule, SharedVocabularyDataModule, sample_negatives, split_vocabulary


def test_negatives_never_hit_the_anchor_and_are_uniform():
    torch.manual_seed(0)
    anchors = torch.randint(0, 50, (20_000,))
    negatives = sample_negatives(anchors, pool_size=50, num_negatives=10)
    assert negatives.shape == (20_000, 10)
    assert not (negatives == anchors[:, None]).any()
    assert negatives.min() >= 0 and negatives.max() <= 49
    counts = torch.bincount(sample_negatives(torch.full((50_000,), 7), 50, 10).flatten(), minlength=50).float()
    assert counts[7] == 0
    others = torch.cat([counts[:7], counts[8:]])  # ~10,200 draws each: 1 % standard deviation
    assert (others / others.mean() - 1).abs().max() < 0.05  # uniform over the other 49


def test_info_nce_has_the_positive_at_index_zero():
    x, y = torch.randn(6, 4), torch.randn(6, 5)
    module = AlignmentModule(x, y, torch.arange(6), num_negatives=2)
    tokens, negatives = torch.tensor([0, 3]), torch.tensor([[1, 2], [4, 5]])
    mapped = x[tokens] @ module.alignment_matrix
    scores = torch.stack([torch.stack([mapped[b] @ y[c] for c in [tokens[b], *negatives[b]]]) for b in range(2)])
    expected = torch.nn.functional.cross_entropy(scores, torch.zeros(2, dtype=torch.long))
    torch.testing.assert_close(module.info_nce(tokens, negatives), expected)


def test_learns_a_linear_relation_and_retrieves_held_out_tokens():
    """When y = x W exactly, A must find W well enough to retrieve held-out tokens."""
    torch.manual_seed(0)
    x = torch.randn(600, 16)
    y = x @ torch.randn(16, 24)
    train, val = split_vocabulary(600, 0.05, seed=0)
    module = AlignmentModule(x, y, train, num_negatives=10, optimizer=lambda params: torch.optim.Adam(params, lr=1e-2))
    trainer = L.Trainer(max_epochs=20, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(module, SharedVocabularyDataModule(train, val, batch_size=32))
    assert trainer.callback_metrics["val/top1"] > 0.75  # chance: 1/600 (measured: 0.87)
    assert trainer.callback_metrics["val/top10"] >= trainer.callback_metrics["val/top1"]


def test_split_is_seeded_and_disjoint():
    train, val = split_vocabulary(1000, 0.05, seed=42)
    assert len(val) == 50 and len(train) == 950
    assert not set(train.tolist()) & set(val.tolist())
    assert torch.equal(val, split_vocabulary(1000, 0.05, seed=42)[1])


@pytest.fixture
def align_cfg(tiny_model_dirs, tiny_target_dir, tmp_path):
    def make(*overrides, output_dir=None):
        return compose_config(
            "align",
            [
                f"calibration_model.name_or_path={tiny_model_dirs['llama']}",
                f"target.name_or_path={tiny_target_dir}",
                "trainer.max_epochs=2",
                "logger=csv",
                *overrides,
            ],
            output_dir or tmp_path,
        )

    return make


def test_align_across_families_writes_the_artifact(align_cfg, tmp_path, tiny_model_dirs, tiny_target_dir):
    align(align_cfg())
    tensors = load_file(tmp_path / "alignment" / "alignment.safetensors")
    assert tensors["A"].shape == (32, 48)  # d_c x d_T: tiny Llama -> tiny Gemma-3
    meta = json.loads((tmp_path / "alignment" / "alignment.json").read_text())
    assert meta["calibration_dim"] == 32 and meta["target_dim"] == 48
    assert meta["shared_counts"]["normalized"] > meta["shared_counts"]["exact"]
    assert meta["shared_tokens"] == len(tensors["target_ids"]) == meta["train_tokens"] + meta["held_out_tokens"]
    for role in ("calibration_model", "target"):  # sha256 over each weight file's name and sha256, by hand
        digest = hashlib.sha256()
        for path in sorted(Path(meta[role]["absolute_path"]).glob("*.safetensors")):
            digest.update(f"{path.name}:{hashlib.sha256(path.read_bytes()).hexdigest()}".encode())
        assert meta[role]["fingerprint"] == "sha256:" + digest.hexdigest(), role
    assert meta["target"]["fingerprint"] != meta["calibration_model"]["fingerprint"]
    assert meta["num_negatives"] == 10 and meta["training"]["epochs_completed"] == 2
    assert 0 <= meta["held_out_top1"] <= meta["held_out_top10"] <= 1
    # the matched ids really are the same surface form in both tokenizers
    calibration_tokenizer = load_tokenizer(ModelSpec(str(tiny_model_dirs["llama"])))
    target_tokenizer = load_tokenizer(ModelSpec(str(tiny_target_dir)))
    for i, j in list(zip(tensors["calibration_ids"].tolist(), tensors["target_ids"].tolist(), strict=True))[:50]:
        assert calibration_tokenizer.decode([i]).strip() == target_tokenizer.decode([j]).strip()


def test_held_out_top_k_is_recomputed_from_the_artifact(align_cfg, tmp_path, tiny_model_dirs):
    """From the written A and both models' input embeddings, in float64, against every shared token;
    the held-out tokens are the first quarter of a permutation seeded with the run's seed. The target
    is the calibration model's own base, so A can generalise (measured: top-1 0.06, top-10 0.51)."""
    align(align_cfg(f"target.name_or_path={tiny_model_dirs['llama']}", "alignment.val_fraction=0.25", "trainer.max_epochs=30"))
    tensors = load_file(tmp_path / "alignment" / "alignment.safetensors")
    meta = json.loads((tmp_path / "alignment" / "alignment.json").read_text())
    x = AutoModelForCausalLM.from_pretrained(tiny_model_dirs["llama"]).get_input_embeddings().weight.detach().double()[tensors["calibration_ids"]]
    y = AutoModelForCausalLM.from_pretrained(tiny_model_dirs["llama"]).get_input_embeddings().weight.detach().double()[tensors["target_ids"]]
    n = len(y)
    held_out = torch.randperm(n, generator=torch.Generator().manual_seed(42))[: round(0.25 * n)].numpy()
    scores = (x.numpy()[held_out] @ tensors["A"].double().numpy()) @ y.numpy().T
    ranks = (scores > scores[np.arange(len(held_out)), held_out][:, None]).sum(axis=1)  # tokens scored above the right one
    assert meta["held_out_tokens"] == len(held_out) > 40
    assert meta["held_out_top1"] == pytest.approx((ranks == 0).mean(), abs=1e-6)
    assert meta["held_out_top10"] == pytest.approx((ranks < 10).mean(), abs=1e-6)


def test_output_embeddings_and_exact_matching_options(align_cfg, tmp_path):
    align(align_cfg("alignment.embedding_source=output", "alignment.matching=exact", "trainer.max_epochs=1"))
    meta = json.loads((tmp_path / "alignment" / "alignment.json").read_text())
    assert meta["embedding_source"] == "output" and meta["matching"] == "exact"
    assert meta["shared_tokens"] == meta["shared_counts"]["exact"]


def test_num_negatives_larger_than_the_vocabulary(align_cfg):
    with pytest.raises(ValueError, match=r"num_negatives=100000 but the shared vocabulary has \d+ tokens"):
        align(align_cfg("alignment.num_negatives=100000"))


def test_calibration_artifact_without_tokenizer_files(align_cfg, tiny_model_dirs, tmp_path):
    broken = tmp_path / "calibration_model"
    shutil.copytree(tiny_model_dirs["llama"], broken)
    for name in ["tokenizer.json", "tokenizer_config.json"]:
        (broken / name).unlink()
    with pytest.raises(FileNotFoundError, match=r"calibration_model.* has no tokenizer files"):
        align(align_cfg(f"calibration_model.name_or_path={broken}"))


def test_calibration_model_is_required(tmp_path):
    from omegaconf.errors import MissingMandatoryValue

    cfg = compose_config("align", [], tmp_path)
    with pytest.raises(MissingMandatoryValue, match="calibration_model.name_or_path"):
        align(cfg)


def test_resume_continues_the_step_count(align_cfg, tmp_path):
    align(align_cfg("trainer.max_epochs=1", output_dir=tmp_path / "first"))
    first = json.loads((tmp_path / "first" / "alignment" / "alignment.json").read_text())
    checkpoint = tmp_path / "first" / "checkpoints" / "last.ckpt"
    steps = first["training"]["global_step"]
    metrics = align(align_cfg(f"ckpt_path={checkpoint}", "trainer.max_epochs=2", "trainer.log_every_n_steps=1", output_dir=tmp_path / "second"))
    assert metrics["global_step"] == 2 * steps
    with open(next((tmp_path / "second").glob("csv/**/metrics.csv"))) as f:
        trained = {int(row["step"]) for row in csv.DictReader(f) if row.get("train/loss")}
    assert trained == set(range(steps, 2 * steps))  # only the second epoch ran: a run from scratch would log steps 0..2S-1


def test_a_run_killed_and_resumed_ends_with_the_uninterrupted_run_s_a(align_cfg, tmp_path):
    """A checkpoint after every step of a 2-epoch run stands for a kill there; resumed mid-epoch 0 and
    mid-epoch 1, the run ends with the same A: the same shuffle's next tokens and the same negatives
    were drawn. (Not from an epoch's last batch: its checkpoint is written before the epoch-end
    validation, whose held-out negatives come from the same random state; docs/operations.md.)"""
    run = ("trainer.max_epochs=2", "callbacks.model_checkpoint.every_n_train_steps=1")
    align(align_cfg(*run, "callbacks.model_checkpoint.save_top_k=-1", output_dir=tmp_path / "whole"))
    meta = json.loads((tmp_path / "whole" / "alignment" / "alignment.json").read_text())
    per_epoch = meta["training"]["global_step"] // 2
    whole = load_file(tmp_path / "whole" / "alignment" / "alignment.safetensors")["A"]
    assert per_epoch == 7
    for stop in (3, per_epoch + 2):
        (checkpoint,) = (tmp_path / "whole" / "checkpoints").glob(f"*-step={stop}.ckpt")
        align(align_cfg(*run, f"ckpt_path='{checkpoint}'", output_dir=tmp_path / f"resumed_{stop}"))
        assert torch.equal(load_file(tmp_path / f"resumed_{stop}" / "alignment" / "alignment.safetensors")["A"], whole), stop


def test_output_embeddings_of_a_tied_model_are_its_input_embeddings_and_it_says_so(caplog):
    """All embedded models tie their LM head to the input embeddings: there, embedding_source=output
    reads the same rows and trains the same A, so the run warns rather than pretend it is a variant."""
    from conftest import tiny_config
    from transformers import AutoModelForCausalLM

    from calibfuse.stages.align import embedding_rows

    ids = torch.arange(10)
    tied, untied = (AutoModelForCausalLM.from_config(tiny_config(family, 384)) for family in ("llama", "mistral"))
    with caplog.at_level("WARNING", logger="calibfuse.align"):
        assert torch.equal(embedding_rows(tied, ids, "output"), tied.model.embed_tokens.weight[:10].detach())
    assert "ties its LM head to its input embeddings" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="calibfuse.align"):
        assert torch.equal(embedding_rows(untied, ids, "output"), untied.lm_head.weight[:10].detach())
        assert torch.equal(embedding_rows(untied, ids, "input"), untied.model.embed_tokens.weight[:10].detach())
        assert not torch.equal(untied.lm_head.weight[:10], untied.model.embed_tokens.weight[:10])
    assert caplog.text == ""
