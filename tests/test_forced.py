"""Teacher-forced scoring through a method (calibfuse.evaluation.forced) on tiny models, checked by hand:
the target alone against one full forward, a hidden transform applied at every position, processed
logits, fusion (one tokenizer and two), and the word filter's -inf."""

import pytest
import torch
from transformers import LogitsProcessor

from calibfuse.evaluation.forced import continuation_logprobs, encode_pairs, forced_batch
from calibfuse.fusion.decoding import GenerationSettings, decode, row_generators
from calibfuse.fusion.fuse import Calibration
from calibfuse.fusion.target import TargetLM
from calibfuse.methods import Method
from calibfuse.models.lm import final_hidden, lm_head_logits
from calibfuse.models.loading import ModelSpec, load_model, load_tokenizer

CONTEXTS = ["How do I boil", "Tell me about the weather today, please", "", "My favourite food is "]
CONTINUATIONS = [" an egg quickly?", " It is sunny.", "A good friend is kind.", "rice"]


def lm_of(model_dir) -> TargetLM:
    spec = ModelSpec(str(model_dir), dtype="float32")
    return TargetLM(load_model(spec), load_tokenizer(spec))


class Scaled:
    """A hidden transform that depends on the state only through its input: h -> 0.7 h + a fixed vector."""

    def __init__(self, width: int):
        self.shift = torch.linspace(-1, 1, width)

    def __call__(self, h, state):
        return 0.7 * h + self.shift


class PenaliseLast(LogitsProcessor):
    """A processor that reads the ids: the newest token gets -3, token 5 gets +2."""

    def __call__(self, input_ids, scores):
        scores = scores.clone()
        scores[torch.arange(len(scores)), input_ids[:, -1]] -= 3.0
        scores[:, 5] += 2.0
        return scores


class Custom(Method):
    def __init__(self, transform=None, processors=()):
        self.transform, self.processors = transform, list(processors)

    def hidden_transform(self, alpha):
        return self.transform

    def logits_processors(self, alpha):
        return self.processors


def by_hand(lm: TargetLM, transform=None, processor=None) -> list[tuple[float, int, bool]]:
    """Each row alone, unpadded, in one forward: the transform on every position's final state, the
    processor on each position's logits with the ids so far."""
    results = []
    for context, continuation in encode_pairs(lm, CONTEXTS, CONTINUATIONS):
        ids = torch.tensor([context + continuation])
        with torch.no_grad():
            hidden, _ = final_hidden(lm.model, input_ids=ids, use_cache=False)
            hidden = hidden[0, len(context) - 1 : -1]
            if transform is not None:
                hidden = transform(hidden, None)
            logits = lm_head_logits(lm.model, hidden).float()
        if processor is not None:
            logits = torch.stack([processor(ids[:, : len(context) + k], logits[k : k + 1].clone())[0] for k in range(len(continuation))])
        logprobs = logits.log_softmax(-1)[torch.arange(len(continuation)), continuation]
        results.append((float(logprobs.double().sum()), len(continuation), bool((logits.argmax(-1) == torch.tensor(continuation)).all())))
    return results


def assert_same(got, expected, atol=1e-5):
    assert [n for _, n, _ in got] == [n for _, n, _ in expected]
    assert [g for _, _, g in got] == [g for _, _, g in expected]
    assert got[0][0] != 0.0
    for (a, _, _), (b, _, _) in zip(got, expected, strict=True):
        assert a == pytest.approx(b, abs=atol)


def test_lm_eval_tokenization(tiny_model_dirs):
    lm = lm_of(tiny_model_dirs["llama"])
    pairs = encode_pairs(lm, CONTEXTS, CONTINUATIONS)
    tokenizer = lm.tokenizer
    assert tokenizer.decode(pairs[3][1]) == " rice"  # the context's trailing space moved to the continuation
    assert pairs[2][0] == [tokenizer.bos_token_id]  # an empty context is read after BOS
    whole = tokenizer("How do I boil an egg quickly?")["input_ids"]
    assert pairs[0][0] + pairs[0][1] == whole  # encoded whole, split at the context's own length


def test_target_alone_stepwise_equals_one_full_forward(tiny_model_dirs):
    for family in ("llama", "gemma3"):
        lm = lm_of(tiny_model_dirs[family])
        expected = by_hand(lm)
        assert_same(continuation_logprobs(lm, Method(), 0.0, CONTEXTS, CONTINUATIONS, batch_size=3, stepwise=True), expected)
        assert_same(continuation_logprobs(lm, Method(), 0.0, CONTEXTS, CONTINUATIONS, batch_size=3), expected)  # the one-forward path


def test_hidden_transform_applies_at_every_position(tiny_model_dirs):
    lm = lm_of(tiny_model_dirs["llama"])
    transform = Scaled(lm.model.config.hidden_size)
    got = continuation_logprobs(lm, Custom(transform), 0.5, CONTEXTS, CONTINUATIONS, batch_size=4)
    assert_same(got, by_hand(lm, transform=transform))
    assert got[0][0] != pytest.approx(by_hand(lm)[0][0], abs=1e-3)


def test_processor_sees_the_forced_ids(tiny_model_dirs):
    lm = lm_of(tiny_model_dirs["llama"])
    got = continuation_logprobs(lm, Custom(processors=[PenaliseLast()]), 1.0, CONTEXTS, CONTINUATIONS, batch_size=2)
    assert_same(got, by_hand(lm, processor=PenaliseLast()))


def test_fusion_one_tokenizer_equals_fusing_every_position(tiny_model_dirs):
    """Fusion with the calibration model's own KV cache: h_c at each position is the calibration model's
    full-forward state there."""
    target, calibration = lm_of(tiny_model_dirs["llama"]), lm_of(tiny_model_dirs["mistral"])
    fusion = Calibration(calibration.model, calibration.tokenizer, None, target.tokenizer, 32)
    got = continuation_logprobs(target, Custom(fusion.transform(0.4)), 0.4, CONTEXTS, CONTINUATIONS, batch_size=4)
    from calibfuse.fusion.fuse import fuse

    expected = []
    for context, continuation in encode_pairs(target, CONTEXTS, CONTINUATIONS):
        ids = torch.tensor([context + continuation])
        with torch.no_grad():
            h_t = final_hidden(target.model, input_ids=ids, use_cache=False)[0][0, len(context) - 1 : -1]
            h_c = final_hidden(calibration.model, input_ids=ids, use_cache=False)[0][0, len(context) - 1 : -1]
            logits = lm_head_logits(target.model, fuse(h_t, h_c, torch.eye(32), 0.4)).float()
        logprobs = logits.log_softmax(-1)[torch.arange(len(continuation)), continuation]
        expected.append((float(logprobs.double().sum()), len(continuation), bool((logits.argmax(-1) == torch.tensor(continuation)).all())))
    assert_same(got, expected, atol=1e-4)


def decoded_and_forced(lm: TargetLM, transform, processors, prompts: list[str], steps: int = 6):
    """Greedy decode with a trace, then force the decoded ids: every step's log-prob from the trace."""
    prompt_ids = lm.prompt_ids(prompts)
    trace: list = []
    settings = GenerationSettings(max_new_tokens=steps)
    new = decode(
        lm.model,
        lm.tokenizer,
        prompt_ids,
        settings,
        row_generators([0] * len(prompts), "cpu"),
        eos_ids=torch.tensor([-1]),
        hidden_transform=transform,
        processors=processors,
        trace=trace,
    )
    expected = [sum(float(trace[k]["logits"][row].log_softmax(-1)[t]) for k, t in enumerate(ids)) for row, ids in enumerate(new)]
    return forced_batch(lm.model, lm.tokenizer, prompt_ids, new, transform, processors), expected


def test_fusion_across_tokenizers_matches_its_own_greedy_decode(tiny_model_dirs, tiny_target_dir, tiny_alignment):
    """Fusion that reads the text (another tokenizer, its calibration stream): forcing the ids its greedy
    decode chose gives the decode's own log-probs, each token the argmax."""
    from calibfuse.fusion.artifacts import load_alignment

    target, calibration = lm_of(tiny_target_dir), lm_of(tiny_model_dirs["llama"])
    A, _ = load_alignment(tiny_alignment)
    fusion = Calibration(calibration.model, calibration.tokenizer, A, target.tokenizer, 48)
    assert not fusion.shared_tokenizer
    scored, expected = decoded_and_forced(target, fusion.transform(0.5), [], CONTEXTS[:2] + CONTEXTS[3:])
    assert all(greedy for _, greedy in scored)
    assert [s for s, _ in scored] == pytest.approx(expected, abs=1e-4)


def test_word_filter_gives_minus_infinity_for_a_banned_word(tiny_model_dirs):
    from calibfuse.methods.word_filter import WholeWordFilter, lexicon_index

    lm = lm_of(tiny_model_dirs["llama"])
    index = lexicon_index(lm.tokenizer, ["egg"])
    method = Custom(processors=[WholeWordFilter(index)])
    got = continuation_logprobs(lm, method, 0.0, ["How do I boil", "How do I boil", "I like"], [" an egg", " an eggplant", " ham and beggars"], batch_size=3)
    assert got[0][0] == float("-inf") and not got[0][2]
    assert got[1][0] == float("-inf")  # the text's end is a boundary while decoding: "egg" is banned before "plant" comes
    assert got[2][0] > float("-inf")
    scored, expected = decoded_and_forced(lm, None, [WholeWordFilter(index)], CONTEXTS[:2])
    assert [s for s, _ in scored] == pytest.approx(expected, abs=1e-4)


def test_the_calibration_model_alone_is_scored_with_its_own_tokenizer(tiny_model_dirs, tiny_target_dir):
    target, own = lm_of(tiny_target_dir), lm_of(tiny_model_dirs["llama"])

    class Alone(Method):
        def generator(self, target_lm, alpha=0.0):
            return own

    got = continuation_logprobs(target, Alone(), 0.0, CONTEXTS, CONTINUATIONS)
    assert_same(got, by_hand(own))


@pytest.mark.slow
def test_embedded_smollm2_target_alone_and_word_filter(tmp_path):
    """On the embedded SmolLM2: steps equal one forward for the target alone, and the word filter's forced
    log-probs of its own greedy continuations equal the decode's, every token the argmax."""
    from calibfuse.methods.word_filter import WholeWordFilter, lexicon_index, read_lexicon

    spec = ModelSpec("smollm2-135m-instruct", dtype="float32")
    lm = TargetLM(load_model(spec), load_tokenizer(spec))
    contexts, continuations = ["The capital of France is", "Brazil is the largest country in"], [" Paris, a city on the Seine.", " South America."]
    stepped = continuation_logprobs(lm, Method(), 0.0, contexts, continuations, stepwise=True)
    full = continuation_logprobs(lm, Method(), 0.0, contexts, continuations, stepwise=False)
    assert [n for _, n, _ in stepped] == [n for _, n, _ in full] and [s for s, _, _ in stepped] == pytest.approx([s for s, _, _ in full], abs=1e-3)
    words = read_lexicon()
    scored, expected = decoded_and_forced(lm, None, [WholeWordFilter(lexicon_index(lm.tokenizer, words))], ["You are such a", "Shut up, you"], steps=8)
    assert all(greedy for _, greedy in scored) and [s for s, _ in scored] == pytest.approx(expected, abs=1e-3)
