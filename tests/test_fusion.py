"""Stage 3: the fused generator against hand computations, plain transformers, and itself uncached."""

import shutil

import pytest
import torch
import torch.nn.functional as F
from conftest import check_states_by_offsets

from calibfuse.fusion.calibration import build_calibration_model
from calibfuse.fusion.config import FusionConfig
from calibfuse.fusion.decoding import GenerationSettings, choose
from calibfuse.fusion.generator import FusedGenerator
from calibfuse.fusion.target import TargetLM
from calibfuse.models.lm import lm_head_logits
from calibfuse.models.loading import ModelSpec, load_model, load_tokenizer

PROMPTS = ["How do I boil an egg", "Write a kind", "The weather today is rather"]


def load(path, dtype="float32"):
    spec = ModelSpec(str(path), dtype=dtype)
    return load_model(spec), load_tokenizer(spec)


@pytest.fixture(scope="module")
def calibration(tiny_model_dirs):
    model, tokenizer = load(tiny_model_dirs["llama"])
    return build_calibration_model(model, 2), tokenizer


@pytest.fixture(scope="module", params=["same_tokenizer", "other_tokenizer"])
def generator(request, calibration, tiny_model_dirs, tiny_target_dir):
    """Same tokenizer: a tiny Mistral target (width 32). Other tokenizer: a tiny Gemma-3 (width 48, metaspace BPE)."""
    target, target_tokenizer = load(tiny_model_dirs["mistral"] if request.param == "same_tokenizer" else tiny_target_dir)
    torch.manual_seed(0)
    A = torch.randn(32, target.config.hidden_size) / 4
    generator = FusedGenerator(target, target_tokenizer, calibration[0], calibration[1], A)
    assert generator.shared_tokenizer == (request.param == "same_tokenizer")
    return generator


def by_hand(generator, prompt_ids, alpha):
    """Fused next-token logits for one unpadded sequence, computed from scratch with the formula."""
    target, calibration = generator.target, generator.calibration
    h_t = target.base_model(torch.tensor([prompt_ids])).last_hidden_state[0, -1]
    if generator.shared_tokenizer:
        calibration_ids = prompt_ids
    else:  # the calibration model reads the consumed text through its own tokenizer
        text = generator.target_tokenizer.decode(prompt_ids, skip_special_tokens=True)
        calibration_ids = generator.calibration_tokenizer(text)["input_ids"]
    h_c = calibration.base_model(torch.tensor([calibration_ids])).last_hidden_state[0, -1]
    mapped = F.layer_norm(h_c @ generator.A, (generator.A.shape[1],), eps=1e-5)
    # the head (with its family's post-processing) is the model's own: on h_t alone it gives transformers' logits
    torch.testing.assert_close(lm_head_logits(target, h_t), target(torch.tensor([prompt_ids])).logits[0, -1])
    return lm_head_logits(target, alpha * mapped + (1 - alpha) * h_t)


@torch.no_grad()
@pytest.mark.parametrize("alpha", [0.3, 1.0])
def test_fused_logits_equal_the_formula_at_every_step(generator, alpha):
    settings = GenerationSettings(max_new_tokens=6)
    steps = generator.trace(PROMPTS, alpha, settings)
    outputs = generator.generate(PROMPTS, alpha, settings)
    prompts_ids = [generator.target_tokenizer(p)["input_ids"] for p in PROMPTS]  # the target's tokenizer, as transformers applies it
    for row, (prompt_ids, out) in enumerate(zip(prompts_ids, outputs, strict=True)):
        for k, step in enumerate(steps[: out.new_tokens]):
            expected = by_hand(generator, prompt_ids + out.token_ids[:k], alpha)
            torch.testing.assert_close(step["logits"][row], expected, atol=2e-4, rtol=2e-4)


@torch.no_grad()
def test_kl_and_agreement_equal_a_from_scratch_recomputation(generator):
    """The grid's diagnostics per row: the mean over its steps of KL(fused || target alone) and the share of
    steps whose top tokens agree, recomputed in float64 from the formula's logits and the target's own."""
    settings = GenerationSettings(max_new_tokens=5)
    rows = generator.target_lm.generate(PROMPTS, settings, alpha=0.6, hidden_transform=generator.fusion.transform(0.6), diagnostics=True)
    for prompt_ids, row in zip(generator._prompt_ids(PROMPTS), rows, strict=True):
        kls, agree = [], []
        for k in range(row.new_tokens):
            fused, alone = (by_hand(generator, prompt_ids + row.token_ids[:k], a).double() for a in (0.6, 0.0))
            log_p, log_q = fused.log_softmax(-1), alone.log_softmax(-1)
            kls.append(float((log_p.exp() * (log_p - log_q)).sum()))
            agree.append(float(fused.argmax() == alone.argmax()))
        assert row.new_tokens > 0 and row.kl == pytest.approx(sum(kls) / len(kls), rel=1e-3, abs=1e-6)
        assert row.agreement == pytest.approx(sum(agree) / len(agree))
    assert max(r.kl for r in rows) > 1e-3  # alpha 0.6 moves the distribution (measured: 0.005 and 0.007): the check is not of zeros


@torch.no_grad()
def test_cached_and_uncached_give_the_same_logits(generator):
    settings = GenerationSettings(max_new_tokens=8)
    cached = generator.trace(PROMPTS, 0.5, settings, use_cache=True)
    uncached = generator.trace(PROMPTS, 0.5, settings, use_cache=False)
    assert len(cached) == len(uncached) == 8
    for a, b in zip(cached, uncached, strict=True):
        torch.testing.assert_close(a["logits"], b["logits"], atol=2e-4, rtol=2e-4)
        torch.testing.assert_close(a["h_calibration"], b["h_calibration"], atol=2e-4, rtol=2e-4)


@torch.no_grad()
def test_calibration_state_covers_exactly_the_consumed_text(generator):
    """Across tokenizers, the state fusion used at every step equals the calibration model run, through
    Hugging Face alone, on the characters the target has read (its tokenizer's offsets say which)."""
    if generator.shared_tokenizer:
        pytest.skip("same tokenizer: positions map one to one, no re-reading of text")
    settings = GenerationSettings(max_new_tokens=8)
    checked = check_states_by_offsets(generator, PROMPTS, 0.5, settings, tolerance=2e-4)
    assert checked >= settings.max_new_tokens, checked  # at least one whole row (random tiny models often re-tokenize apart)


@torch.no_grad()
def test_alpha_zero_reproduces_plain_transformers_generation(generator):
    tokenizer = generator.target_tokenizer
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True, padding_side="left")
    expected = generator.target.generate(**batch, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    outputs = generator.generate(PROMPTS, 0.0, GenerationSettings(max_new_tokens=12))
    for row, out in enumerate(outputs):
        plain = expected[row, batch["input_ids"].shape[1] :].tolist()
        assert out.token_ids == plain[: len(out.token_ids)]
        assert all(t == tokenizer.pad_token_id for t in plain[len(out.token_ids) :])


@torch.no_grad()
def test_fusion_changes_the_output(generator):
    plain = generator.generate(PROMPTS, 0.0, GenerationSettings(max_new_tokens=8))
    fused = generator.generate(PROMPTS, 1.0, GenerationSettings(max_new_tokens=8))
    assert [o.token_ids for o in plain] != [o.token_ids for o in fused]


@torch.no_grad()
def test_last_token_context_is_the_references_behaviour(calibration, tiny_model_dirs):
    target, tokenizer = load(tiny_model_dirs["mistral"])
    A = torch.randn(32, 32) / 4
    reference = FusedGenerator(target, tokenizer, calibration[0], calibration[1], A, FusionConfig(calibration_context="last_token"))
    settings = GenerationSettings(max_new_tokens=5)
    steps = reference.trace(PROMPTS[:1], 0.5, settings)
    out = reference.generate(PROMPTS[:1], 0.5, settings)[0]
    newest = out.token_ids[0]  # step 1: the calibration model sees only this token, at position 0, no cache
    alone = calibration[0].base_model(torch.tensor([[newest]]), position_ids=torch.tensor([[0]])).last_hidden_state[0, -1]
    torch.testing.assert_close(steps[1]["h_calibration"][0], alone, atol=1e-5, rtol=1e-5)
    full = FusedGenerator(target, tokenizer, calibration[0], calibration[1], A).trace(PROMPTS[:1], 0.5, settings)
    assert not torch.allclose(full[1]["h_calibration"], steps[1]["h_calibration"])


@torch.no_grad()
def test_layer_norm_off_and_identity_alignment(calibration, tiny_model_dirs):
    target, tokenizer = load(tiny_model_dirs["mistral"])
    plain = FusedGenerator(target, tokenizer, calibration[0], calibration[1], None, FusionConfig(layer_norm="none"))
    torch.testing.assert_close(plain.A, torch.eye(32))
    h_t, h_c = torch.randn(2, 32), torch.randn(2, 32)
    torch.testing.assert_close(plain.fuse(h_t, h_c, 0.25), 0.25 * h_c + 0.75 * h_t)


@torch.no_grad()
def test_batched_equals_one_at_a_time(generator):
    settings = GenerationSettings(max_new_tokens=6, batch_size=3)
    batched = generator.generate(PROMPTS, 0.5, settings)
    single = generator.generate(PROMPTS, 0.5, GenerationSettings(max_new_tokens=6, batch_size=1))
    assert [o.token_ids for o in batched] == [o.token_ids for o in single]


@torch.no_grad()
def test_sampling_is_seeded_and_gives_several_samples(generator):
    settings = GenerationSettings(max_new_tokens=6, do_sample=True, top_p=0.9, temperature=1.0, num_samples=3, seed=7)
    a = generator.generate(PROMPTS[:2], [0.0, 0.5], settings)
    b = generator.generate(PROMPTS[:2], [0.0, 0.5], settings)
    assert len(a) == 2 * 2 * 3 and [o.token_ids for o in a] == [o.token_ids for o in b]
    assert {(o.alpha, o.sample) for o in a} == {(al, s) for al in (0.0, 0.5) for s in range(3)}
    samples = [o.token_ids for o in a if o.alpha == 0.0 and o.prompt == PROMPTS[0]]
    assert len({tuple(s) for s in samples}) > 1


def test_top_p_keeps_the_nucleus_only():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    settings = GenerationSettings(do_sample=True, top_p=0.7)
    draws = {int(choose(logits, settings, settings.warpers(), torch.Generator().manual_seed(i))) for i in range(200)}
    assert draws == {0, 1}


# Bad input: clear errors naming the values.


@pytest.mark.parametrize("alpha", [-0.1, 1.5])
def test_alpha_out_of_range(generator, alpha):
    with pytest.raises(ValueError, match=rf"alpha={alpha}; expected a weight in \[0, 1\]"):
        generator.generate(PROMPTS, alpha)


def test_empty_prompt_list(generator):
    with pytest.raises(ValueError, match="non-empty list"):
        generator.generate([], 0.5)


def test_alignment_of_the_wrong_shape_names_both_widths(calibration, tiny_target_dir):
    target, tokenizer = load(tiny_target_dir)
    with pytest.raises(ValueError, match=r"shape \(32, 32\) but the calibration model is 32 wide and the target 48 wide"):
        FusedGenerator(target, tokenizer, calibration[0], calibration[1], torch.zeros(32, 32))
    with pytest.raises(ValueError, match=r"identity alignment needs equal widths"):
        FusedGenerator(target, tokenizer, calibration[0], calibration[1], None)


def test_alignment_made_for_other_models_is_refused(tiny_model_dirs, tiny_target_dir, tmp_path):
    from conftest import compose_config

    from calibfuse.align import align

    align(
        compose_config(
            "align",
            [f"calibration_model.name_or_path={tiny_model_dirs['llama']}", f"target.name_or_path={tiny_target_dir}", "trainer.max_epochs=1", "logger=csv"],
            tmp_path,
        )
    )
    alignment = tmp_path / "alignment"
    generator = FusedGenerator.from_artifacts(str(tiny_target_dir), str(tiny_model_dirs["llama"]), alignment)
    assert generator.A.shape == (32, 48)
    other = tmp_path / "other_target"
    shutil.copytree(tiny_target_dir, other)
    state = load_model(ModelSpec(str(other))).state_dict()
    from safetensors.torch import save_file

    save_file({k: v.contiguous() + 1 for k, v in state.items()}, other / "model.safetensors")  # other weights
    with pytest.raises(ValueError, match=r"was made for target .* not for .*other_target"):
        FusedGenerator.from_artifacts(str(other), str(tiny_model_dirs["llama"]), alignment)


def test_missing_alignment_files(tiny_model_dirs, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"alignment\.safetensors.* does not exist"):
        FusedGenerator.from_artifacts(str(tiny_model_dirs["mistral"]), str(tiny_model_dirs["llama"]), tmp_path)


def test_chat_prompt_format_uses_the_targets_template(calibration, tiny_model_dirs):
    target, tokenizer = load(tiny_model_dirs["mistral"])
    with pytest.raises(ValueError, match="no chat template"):
        FusedGenerator(target, tokenizer, calibration[0], calibration[1], None, prompt_format="chat")
    tokenizer.chat_template = "{% for m in messages %}<s>user: {{ m['content'] }}\n{% endfor %}assistant:"
    chat = FusedGenerator(target, tokenizer, calibration[0], calibration[1], None, prompt_format="chat")
    assert tokenizer.decode(chat._prompt_ids(["Hi there"])[0]) == "<s>user: Hi there\nassistant:"
    templated = tokenizer("<s>user: Hi there\nassistant:", add_special_tokens=False)["input_ids"]
    (out,) = chat.generate(["Hi there"], 0.5, GenerationSettings(max_new_tokens=3))
    assert out.prompt_tokens == len(templated) and out.new_tokens == 3  # the templated prompt is what it read


@torch.no_grad()
def test_sampled_draws_do_not_depend_on_batching(generator):
    """Each (prompt, sample) draws with its own seed: a resumed, rebatched or resharded run draws alike."""
    settings = GenerationSettings(max_new_tokens=6, do_sample=True, top_p=0.9, num_samples=2, seed=3)
    together = generator.generate(PROMPTS, 0.5, settings)
    one_by_one = generator.generate(PROMPTS, 0.5, GenerationSettings(**{**settings.__dict__, "batch_size": 1}))
    assert [r.token_ids for r in together] == [r.token_ids for r in one_by_one]
    seeds = [settings.seed + i for i in range(len(PROMPTS))]  # the same seeds, the prompts in reverse order
    reversed_rows = generator.target_lm.generate(PROMPTS[::-1], settings, seeds=seeds[::-1], hidden_transform=generator.fusion.transform(0.5))
    assert sorted((r.prompt, r.sample, tuple(r.token_ids)) for r in reversed_rows) == sorted((r.prompt, r.sample, tuple(r.token_ids)) for r in together)


def test_a_non_finite_alignment_stops_generation_naming_the_step(calibration, tiny_model_dirs):
    target, tokenizer = load(tiny_model_dirs["mistral"])
    A = torch.full((32, 32), float("nan"))
    generator = FusedGenerator(target, tokenizer, calibration[0], calibration[1], A)
    with pytest.raises(FloatingPointError, match=r"not finite \(NaN or inf\) at generation step 0"):
        generator.generate(PROMPTS, 0.3, GenerationSettings(max_new_tokens=3))
    alone = generator.generate(PROMPTS, 0.0, GenerationSettings(max_new_tokens=3))  # alpha 0 never reads A: the target's own tokens
    plain = TargetLM(target, tokenizer).generate(PROMPTS, GenerationSettings(max_new_tokens=3))
    assert [r.token_ids for r in alone] == [r.token_ids for r in plain]


@pytest.mark.parametrize("family", ["cohere", "granite"])
def test_families_that_scale_their_logits_fuse_through_their_own_head(family, tiny_tokenizer_dir):
    """Cohere multiplies its logits (logit_scale), Granite divides them (logits_scaling): alpha 0 still
    reproduces the model's own logits, and a head calibfuse cannot reproduce is refused."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, CohereConfig, GraniteConfig

    from calibfuse.fusion.target import TargetLM
    from calibfuse.models.lm import check_head

    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    small = dict(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    config = CohereConfig(**small, logit_scale=0.25) if family == "cohere" else GraniteConfig(**small, logits_scaling=4.0)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    ids = tokenizer(PROMPTS[0], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = model(ids).logits[0, -1]
    (step,) = FusedGenerator(model, tokenizer, model, tokenizer, None).trace([PROMPTS[0]], 0.0, GenerationSettings(max_new_tokens=1))
    assert torch.allclose(step["logits"][0], expected, atol=1e-5)
    if family == "granite":
        return
    model.config.logit_scale = 1.0  # Cohere's forward keeps its own copy (0.25): now the two heads disagree
    with pytest.raises(ValueError, match="computes its logits differently from its LM head"):
        check_head(model, tokenizer)
    with pytest.raises(ValueError, match="computes its logits differently"):
        TargetLM(model, tokenizer)


@torch.no_grad()
def test_target_rms_scale_variant_by_hand():
    """scale=target_rms: LN(h_c A) is rescaled to h_T's RMS at each position before mixing."""
    from calibfuse.fusion.fuse import fuse

    torch.manual_seed(0)
    h_t, h_c, A = torch.randn(3, 8) * 5, torch.randn(3, 4), torch.randn(4, 8)
    mapped = F.layer_norm(h_c @ A, (8,), eps=1e-5)
    rescaled = mapped * h_t.pow(2).mean(-1, keepdim=True).sqrt() / mapped.pow(2).mean(-1, keepdim=True).add(1e-5).sqrt()
    assert torch.allclose(fuse(h_t, h_c, A, 0.4, FusionConfig(scale="target_rms")), 0.4 * rescaled + 0.6 * h_t, atol=1e-5)
    assert torch.allclose(rescaled.pow(2).mean(-1).sqrt(), h_t.pow(2).mean(-1).sqrt(), rtol=1e-4)
    assert torch.equal(fuse(h_t, h_c, A, 0.4), (0.4 * mapped + 0.6 * h_t))  # the faithful default is unchanged


def test_learned_scale_multiplies_the_normalised_calibration_state_by_its_gain():
    from calibfuse.fusion.fuse import fuse

    torch.manual_seed(0)
    h_t, h_c, A = torch.randn(2, 3, 8), torch.randn(2, 3, 6), torch.randn(6, 8)
    mapped = torch.nn.functional.layer_norm(h_c @ A, (8,), eps=1e-5)
    assert torch.allclose(fuse(h_t, h_c, A, 0.3, FusionConfig(scale="learned"), gain=2.5), 0.3 * 2.5 * mapped + 0.7 * h_t, atol=1e-6)
    assert torch.allclose(fuse(h_t, h_c, A, 0.3, FusionConfig(scale="learned"), gain=1.0), fuse(h_t, h_c, A, 0.3), atol=0)


def test_affine_layer_norm_applies_its_weight_and_bias_per_dimension():
    from calibfuse.fusion.fuse import fuse

    torch.manual_seed(0)
    h_t, h_c, A = torch.randn(2, 3, 8), torch.randn(2, 3, 6), torch.randn(6, 8)
    weight, bias = torch.rand(8) + 0.5, torch.randn(8)
    mapped = torch.nn.functional.layer_norm(h_c @ A, (8,), eps=1e-5)
    fused = fuse(h_t, h_c, A, 0.3, FusionConfig(layer_norm="affine"), norm_affine=(weight, bias))
    assert torch.allclose(fused, 0.3 * (mapped * weight + bias) + 0.7 * h_t, atol=1e-5)
    assert torch.equal(fuse(h_t, h_c, A, 0.3, FusionConfig(layer_norm="affine"), norm_affine=(torch.ones(8), torch.zeros(8))), fuse(h_t, h_c, A, 0.3))
