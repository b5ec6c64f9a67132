"""The toxblock scorer: the torch forward pass against a per-timestep numpy re-computation on a tiny
Keras-layout h5 written here, the Keras text preprocessing on hand-made examples, the restricted
unpickler, and (slow) the real model against the scores tox-block documents."""

import ast
import importlib.metadata
import io
import json
import pickle
import re
import sys
import types
from collections import OrderedDict, defaultdict

import numpy as np
import pytest
import torch

from calibfuse.scoring import toxblock as toxblock
from calibfuse.scoring.toxblock import LABELS, RestrictedUnpickler, TokenizerSettings, ToxBlockModel, ToxBlockScorer
from calibfuse.scoring.toxicity import build_scorer

FILTERS = '!"#$%&()*+,-./:;<=>?@[\\]^_`{|}~\t\n'  # Keras' default, the one tox-block's tokenizer holds
VOCABULARY, EMBEDDING, UNITS, DENSE, MAX_LENGTH = 12, 4, 3, 5, 8

# --- a tiny model in Keras 2's h5 layout ----------------------------------------------------------


def keras_model_config(recurrent_activation="hard_sigmoid"):
    def layer(class_name, name, **config):
        return {"name": name, "class_name": class_name, "config": {"name": name, **config}}

    lstm = {
        "class_name": "LSTM",
        "config": {
            "name": "lstm",
            "units": UNITS,
            "activation": "tanh",
            "use_bias": True,
            "recurrent_activation": recurrent_activation,
            "return_sequences": True,
            "go_backwards": False,
            "dropout": 0.1,
        },
    }
    layers = [
        layer("InputLayer", "input_1", batch_input_shape=[None, MAX_LENGTH]),
        layer("Embedding", "embedding", input_dim=VOCABULARY, output_dim=EMBEDDING, mask_zero=False),
        layer("Bidirectional", "bidirectional", layer=lstm, merge_mode="concat"),
        layer("GlobalMaxPooling1D", "global_max_pooling1d"),
        layer("Dense", "dense", units=DENSE, activation="relu", use_bias=True),
        layer("Dropout", "dropout", rate=0.1),
        layer("Dense", "dense_1", units=len(LABELS), activation="sigmoid", use_bias=True),
    ]
    return {"class_name": "Model", "config": {"name": "model", "layers": layers}}


def random_weights(seed=0):
    """Large enough that the LSTM gates reach hard_sigmoid's clipped range, where it differs from a sigmoid most."""
    rng = np.random.default_rng(seed)

    def normal(*shape, scale=1.0):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    lstm = lambda: [normal(EMBEDDING, 4 * UNITS, scale=2.0), normal(UNITS, 4 * UNITS, scale=2.0), normal(4 * UNITS)]  # noqa: E731
    return {
        "embedding": [normal(VOCABULARY, EMBEDDING)],
        "forward_lstm": lstm(),
        "backward_lstm": lstm(),
        "dense": [normal(2 * UNITS, DENSE), normal(DENSE)],
        "dense_1": [normal(DENSE, len(LABELS)), normal(len(LABELS))],
    }


def write_keras_h5(path, weights, config=None):
    import h5py

    names = {
        "embedding": ["embedding/embeddings:0"],
        "dense": ["dense/kernel:0", "dense/bias:0"],
        "dense_1": ["dense_1/kernel:0", "dense_1/bias:0"],
        "bidirectional": [
            f"bidirectional/{direction}_lstm/{weight}:0" for direction in ("forward", "backward") for weight in ("kernel", "recurrent_kernel", "bias")
        ],
    }
    values = {
        "embedding": weights["embedding"],
        "dense": weights["dense"],
        "dense_1": weights["dense_1"],
        "bidirectional": weights["forward_lstm"] + weights["backward_lstm"],
    }
    with h5py.File(path, "w") as f:
        f.attrs["model_config"] = json.dumps(config or keras_model_config())
        group = f.create_group("model_weights")
        for layer in ("input_1", "embedding", "bidirectional", "global_max_pooling1d", "dense", "dropout", "dense_1"):
            layer_group = group.create_group(layer)
            layer_group.attrs["weight_names"] = [n.encode() for n in names.get(layer, [])]
            for name, value in zip(names.get(layer, []), values.get(layer, []), strict=True):
                layer_group.create_dataset(name, data=value)  # e.g. model_weights/dense/dense/kernel:0, as Keras writes it
    return path


@pytest.fixture(scope="module")
def tiny_h5(tmp_path_factory):
    weights = random_weights()
    return write_keras_h5(tmp_path_factory.mktemp("toxblock") / "model.h5", weights), weights


def hard_sigmoid(x):
    return np.clip(0.2 * x + 0.5, 0.0, 1.0)


def reference_forward(weights, ids):
    """Keras' BiLSTM classifier, one text and one timestep at a time, in float64; also the gate values
    hard_sigmoid clipped to 0 or 1."""
    w = {k: [np.asarray(a, dtype=np.float64) for a in v] for k, v in weights.items()}
    outputs, clipped = [], set()
    for row in ids:
        x = w["embedding"][0][row]  # (time, embedding)
        directions = []
        for name, sequence in (("forward_lstm", x), ("backward_lstm", x[::-1])):
            kernel, recurrent, bias = w[name]
            h, c, hs = np.zeros(UNITS), np.zeros(UNITS), []
            for x_t in sequence:
                z = x_t @ kernel + h @ recurrent + bias
                i, f, o = hard_sigmoid(z[:UNITS]), hard_sigmoid(z[UNITS : 2 * UNITS]), hard_sigmoid(z[3 * UNITS :])
                clipped.update(g for g in np.concatenate([i, f, o]).tolist() if g in (0.0, 1.0))
                c = f * c + i * np.tanh(z[2 * UNITS : 3 * UNITS])
                h = o * np.tanh(c)
                hs.append(h)
            directions.append(np.array(hs if name == "forward_lstm" else hs[::-1]))
        features = np.concatenate(directions, axis=1).max(axis=0)
        hidden = np.maximum(features @ w["dense"][0] + w["dense"][1], 0.0)
        outputs.append(1 / (1 + np.exp(-(hidden @ w["dense_1"][0] + w["dense_1"][1]))))
    return np.array(outputs), clipped


def test_forward_pass_equals_a_per_timestep_recomputation(tiny_h5):
    path, weights = tiny_h5
    model = ToxBlockModel.from_h5(path)
    rng = np.random.default_rng(1)
    ids = np.zeros((6, MAX_LENGTH), dtype=np.int64)
    for row, length in enumerate([MAX_LENGTH, 5, 1, 0, 3, 7]):  # no padding, some, one token, an empty text
        ids[row, MAX_LENGTH - length :] = rng.integers(1, VOCABULARY, length)
    expected, clipped = reference_forward(weights, ids)
    assert clipped == {0.0, 1.0}  # both clipped ranges of hard_sigmoid are exercised
    np.testing.assert_allclose(model(torch.from_numpy(ids)).numpy(), expected, atol=1e-5)
    # Batches made only of empty texts, or of one unpadded text, take the edge paths of the padding start.
    np.testing.assert_allclose(model(torch.from_numpy(ids[3:4])).numpy(), expected[3:4], atol=1e-5)
    np.testing.assert_allclose(model(torch.from_numpy(ids[:1])).numpy(), expected[:1], atol=1e-5)


def test_unsupported_architecture_is_named(tmp_path):
    config = keras_model_config(recurrent_activation="sigmoid")
    with pytest.raises(ValueError, match=r"LSTM recurrent_activation is 'sigmoid'; expected 'hard_sigmoid'"):
        ToxBlockModel.from_h5(write_keras_h5(tmp_path / "m.h5", random_weights(), config))
    config = keras_model_config()
    del config["config"]["layers"][3]  # no GlobalMaxPooling1D
    with pytest.raises(ValueError, match=r"h5 model has layers \['InputLayer', 'Embedding', 'Bidirectional', 'Dense'"):
        ToxBlockModel.from_h5(write_keras_h5(tmp_path / "m2.h5", random_weights(), config))


# --- preprocessing: Keras' Tokenizer.texts_to_sequences and pad_sequences ----------------------------

WORDS = {"hello": 1, "world": 2, "don't": 3, "you": 4, "idiot": 5, "a": 6, "b": 7, "c": 8, "d": 9, "e": 10, "f": 11}


def test_keras_text_preprocessing():
    tokenizer = TokenizerSettings(WORDS, FILTERS, lower=True, split=" ", oov_index=None, max_length=5)
    assert tokenizer.words("Hello, WORLD!") == ["hello", "world"]
    assert tokenizer.words("Don't\tyou...idiot\n") == ["don't", "you", "idiot"]  # the apostrophe is kept; tab, newline, dots split
    assert tokenizer.words("  (a)  ") == ["a"] and tokenizer.words("") == [] and tokenizer.words("?!") == []
    np.testing.assert_array_equal(
        tokenizer.encode(["hello world", "", "you unknown idiot", "a b c d e f hello"]),
        [
            [0, 0, 0, 1, 2],  # pre-padding with 0
            [0, 0, 0, 0, 0],  # an empty text: all padding
            [0, 0, 0, 4, 5],  # an unknown word is dropped
            [8, 9, 10, 11, 1],
        ],
    )  # pre-truncation: the last 5 words are kept
    with_oov = TokenizerSettings(WORDS, FILTERS, lower=True, split=" ", oov_index=1, max_length=3)
    np.testing.assert_array_equal(with_oov.encode(["you unknown"]), [[0, 4, 1]])
    keep_case = TokenizerSettings(WORDS, FILTERS, lower=False, split=" ", oov_index=None, max_length=2)
    np.testing.assert_array_equal(keep_case.encode(["Hello world"]), [[0, 2]])


# --- the tokenizer pickle ------------------------------------------------------------------------


def pickle_like_tox_block(monkeypatch, num_words=4, max_length=6):
    """A pickle naming tox_block's TokenSequencer and Keras' Tokenizer as tox-block's does; the modules
    exist only while pickling, so loading it proves neither is imported."""
    modules = {}
    for module, name in [("tox_block.data_processing.preprocessors", "TokenSequencer"), ("keras_preprocessing.text", "Tokenizer")]:
        modules[name] = types.ModuleType(module)
        setattr(modules[name], name, type(name, (), {"__module__": module}))
    tokenizer = modules["Tokenizer"].Tokenizer()
    tokenizer.__dict__ = {
        "word_counts": OrderedDict((w, 10 - i) for w, i in WORDS.items()),
        "word_docs": defaultdict(int, {"a": 1}),
        "filters": FILTERS,
        "split": " ",
        "lower": True,
        "num_words": num_words,
        "document_count": 3,
        "char_level": False,
        "oov_token": None,
        "index_docs": defaultdict(int, {1: 1}),
        "word_index": dict(WORDS),
        "index_word": {i: w for w, i in WORDS.items()},
    }
    sequencer = modules["TokenSequencer"].TokenSequencer()
    sequencer.__dict__ = {"max_features": num_words, "max_sequence_length": max_length, "tokenizer": tokenizer}
    with monkeypatch.context() as patch:
        for module in ["tox_block", "tox_block.data_processing", "keras_preprocessing"]:  # pickle imports the parents too
            patch.setitem(sys.modules, module, types.ModuleType(module))
        for module in modules.values():
            patch.setitem(sys.modules, module.__name__, module)
        return pickle.dumps(sequencer, protocol=3)


def test_tokenizer_settings_read_without_keras(monkeypatch, tmp_path):
    path = tmp_path / "encoder.pkl"
    path.write_bytes(pickle_like_tox_block(monkeypatch, num_words=4))
    assert "keras_preprocessing.text" not in sys.modules
    tokenizer = TokenizerSettings.from_pickle(path)
    assert tokenizer.word_index == {"hello": 1, "world": 2, "don't": 3}  # Keras keeps ids < num_words
    assert (tokenizer.filters, tokenizer.lower, tokenizer.split, tokenizer.oov_index, tokenizer.max_length) == (FILTERS, True, " ", None, 6)
    np.testing.assert_array_equal(tokenizer.encode(["Hello you, world"]), [[0, 0, 0, 0, 1, 2]])


@pytest.mark.parametrize("module, name, argument", [("os", "system", "touch {sentinel}"), ("builtins", "eval", "open({sentinel!r}, 'w')")])
def test_restricted_unpickler_refuses_code(tmp_path, module, name, argument):
    sentinel = tmp_path / "sentinel"
    payload = f"c{module}\n{name}\n(V{argument.format(sentinel=str(sentinel))}\ntR.".encode()
    path = tmp_path / "encoder.pkl"
    path.write_bytes(payload)
    with pytest.raises(pickle.UnpicklingError, match=rf"refusing to unpickle {module}\.{name}"):
        TokenizerSettings.from_pickle(path)
    assert not sentinel.exists()
    with pytest.raises(pickle.UnpicklingError, match=rf"refusing to unpickle {module}\.{name}"):
        RestrictedUnpickler(io.BytesIO(payload)).load()
    assert not sentinel.exists()


def test_missing_package_names_the_install_command(monkeypatch):
    def not_found(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(toxblock.importlib.metadata, "distribution", not_found)
    with pytest.raises(FileNotFoundError, match=re.escape("pip install --no-deps tox-block==0.1.2 h5py")):
        ToxBlockScorer()


# --- the scorer, on the tiny model ----------------------------------------------------------------


@pytest.fixture
def tiny_scorer(tiny_h5, monkeypatch, tmp_path):
    tokenizer = tmp_path / "encoder.pkl"
    tokenizer.write_bytes(pickle_like_tox_block(monkeypatch, num_words=VOCABULARY, max_length=MAX_LENGTH))
    monkeypatch.setattr(toxblock, "package_files", lambda: (tiny_h5[0], tokenizer))
    return lambda **options: build_scorer("toxblock", **options)


def test_scorer_scores_in_input_order(tiny_scorer, tiny_h5):
    texts = ["a b c d e f hello world you", "", "hello", "idiot you don't", "?!"]
    scorer = tiny_scorer(batch_size=2, label="insult")
    threads = torch.get_num_threads()
    attributes = scorer.score_attributes(texts)
    assert torch.get_num_threads() == threads  # scoring runs on one thread and restores the setting
    assert list(attributes) == list(LABELS) and all(len(v) == len(texts) for v in attributes.values())
    one_by_one = [ToxBlockModel.from_h5(tiny_h5[0])(torch.from_numpy(scorer.tokenizer.encode([t])))[0].tolist() for t in texts]
    np.testing.assert_allclose(np.array([attributes[label] for label in LABELS]).T, one_by_one, atol=1e-6)
    assert scorer.score(texts) == attributes["insult"]
    assert attributes["toxic"][1] == attributes["toxic"][4]  # empty, and punctuation only: both all padding
    assert scorer.score([]) == []
    with pytest.raises(ValueError, match=r"scorer 'toxblock' has no label 'toxicity'; its labels are \['toxic', 'severe_toxic'"):
        tiny_scorer(label="toxicity")


# --- the real model against tox-block's documentation -------------------------------------------


def documented_examples() -> list[dict]:
    """The example predictions in tox-block's README (its PyPI description): Python dict literals."""
    readme = importlib.metadata.distribution("tox-block").read_text("METADATA")
    examples = []
    for block in re.findall(r"```python\n(.*?)```", readme, flags=re.DOTALL):
        try:
            value = ast.literal_eval(block.strip())
        except (ValueError, SyntaxError):
            continue  # a code example, not a result
        examples += [value] if "text" in value else list(value.values())
    return examples


def documented_rescaling() -> dict[str, tuple[float, float]]:
    """tox-block's RESCALE_PROBA (its examples are min-max rescaled with it), read from its config.py without importing it."""
    source = importlib.metadata.distribution("tox-block").locate_file("tox_block/config/config.py").read_text()
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "RESCALE_PROBA":
            return ast.literal_eval(node.value)
    raise AssertionError("tox_block/config/config.py has no RESCALE_PROBA")


@pytest.mark.slow
def test_real_model_reproduces_the_documented_scores():
    examples, rescaling = documented_examples(), documented_rescaling()
    assert len(examples) == 4 and len({e["text"] for e in examples}) == 3
    scorer = build_scorer("toxblock")
    attributes = scorer.score_attributes([e["text"] for e in examples] + [""])
    worst = 0.0
    for row, example in enumerate(examples):
        for label in LABELS:
            low, high = rescaling[label]
            ours = abs((attributes[label][row] - low) / (high - low))  # tox-block's make_predictions(rescale=True)
            print(f"{example['text'][:40]!r:44} {label:14} documented {example[label]:.6f}  ours {ours:.6f}")
            worst = max(worst, abs(ours - example[label]))
    print(f"largest difference: {worst:.2e}")
    assert worst < 1e-5
    assert 0 <= attributes["toxic"][-1] < 0.5  # an empty text scores, as all padding
    assert scorer.score(["I will kill you, you fucking idiot!"])[0] > 0.99
