"""ToxBlock: an offline toxicity scorer trained on Jigsaw's 2018 toxic comments, the data of Detoxify
`original` (the paper's scorer). A bidirectional LSTM over GloVe-initialised word embeddings, shipped
as a Keras HDF5 file in the PyPI package tox-block 0.1.2 (MIT); re-implemented here in torch so that
neither TensorFlow nor Keras is needed.

    scorer = ToxBlockScorer()                        # pip install --no-deps tox-block==0.1.2 h5py
    scorer.score(["have a nice day", "you idiot"])   # P(toxic) per text
    scorer.score_attributes(texts)                   # all six Jigsaw labels

The package is located, never imported (its modules import TensorFlow). Its tokenizer is a pickle of
tox_block's TokenSequencer holding a Keras Tokenizer: it is read by a restricted unpickler that builds
plain containers only and replaces those two classes by stand-ins that record their state, so no
code from the pickle runs and Keras need not be installed.
"""

from __future__ import annotations

import builtins
import collections
import importlib.metadata
import json
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

LABELS = ("toxic", "severe_toxic", "obscene", "threat", "insult", "identity_hate")  # the Jigsaw 2018 labels, in output order
INSTALL = "pip install --no-deps tox-block==0.1.2 h5py"
MODEL_FILE, TOKENIZER_FILE = "tox_block/trained_models/lstm_model_0.1.2.h5", "tox_block/trained_models/encoder_0.1.2.pkl"


def package_files() -> tuple[Path, Path]:
    """The h5 model and the pickled tokenizer inside the installed tox-block distribution."""
    try:
        dist = importlib.metadata.distribution("tox-block")
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(f"scorer 'toxblock' needs the PyPI package tox-block 0.1.2; install it with `{INSTALL}`") from None
    if dist.version != "0.1.2":
        raise FileNotFoundError(f"scorer 'toxblock' needs tox-block 0.1.2, found {dist.version}; install it with `{INSTALL}`")
    paths = tuple(Path(dist.locate_file(name)) for name in (MODEL_FILE, TOKENIZER_FILE))
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"tox-block 0.1.2 is installed but {path} is missing; reinstall it with `{INSTALL}`")
    return paths


# --- the tokenizer pickle, read without running its code ------------------------------------------


class RecordedObject:
    """Stands in for a class the pickle names: keeps the state the pickle sets, has no behaviour."""

    source = ""

    def __setstate__(self, state):
        self.state = state


# The plain data types a tokenizer's state needs. Not all of builtins: eval, getattr, __import__ are callables too.
SAFE_GLOBALS = {("builtins", name): getattr(builtins, name) for name in ("int", "float", "str", "bytes", "bool", "dict", "list", "tuple", "set", "frozenset")}
SAFE_GLOBALS |= {("collections", name): getattr(collections, name) for name in ("OrderedDict", "defaultdict", "Counter", "deque")}
STAND_INS = {
    (module, name): type(name, (RecordedObject,), {"source": f"{module}.{name}"})
    for module, name in [("tox_block.data_processing.preprocessors", "TokenSequencer"), ("keras_preprocessing.text", "Tokenizer")]
}


class RestrictedUnpickler(pickle.Unpickler):
    """Resolves only SAFE_GLOBALS and STAND_INS; any other class or function named in the pickle is refused."""

    def find_class(self, module, name):
        if (module, name) in SAFE_GLOBALS:
            return SAFE_GLOBALS[module, name]
        if (module, name) in STAND_INS:
            return STAND_INS[module, name]
        raise pickle.UnpicklingError(
            f"refusing to unpickle {module}.{name}: only builtins data types, collections classes "
            f"and the recorded stand-ins for {sorted(cls.source for cls in STAND_INS.values())} are allowed"
        )


@dataclass
class TokenizerSettings:
    """What Keras' Tokenizer.texts_to_sequences and pad_sequences need, read from the pickle."""

    word_index: dict[str, int]  # already cut to indices < num_words (Keras drops the others)
    filters: str
    lower: bool
    split: str
    oov_index: int | None
    max_length: int

    @classmethod
    def from_pickle(cls, path: str | Path) -> TokenizerSettings:
        with open(path, "rb") as f:
            sequencer = RestrictedUnpickler(f).load()
        if not isinstance(sequencer, STAND_INS["tox_block.data_processing.preprocessors", "TokenSequencer"]):
            raise ValueError(f"{path} holds a {type(sequencer).__name__}; expected tox_block's TokenSequencer")
        tokenizer = sequencer.state["tokenizer"]
        if not isinstance(tokenizer, STAND_INS["keras_preprocessing.text", "Tokenizer"]):
            raise ValueError(f"{path}: the TokenSequencer holds a {type(tokenizer).__name__}; expected a Keras Tokenizer")
        state = tokenizer.state
        if state["char_level"] or not isinstance(state["split"], str):
            raise ValueError(f"{path}: char_level={state['char_level']}, split={state['split']!r}; expected word-level splitting on a string")
        num_words = state["num_words"]
        word_index = {w: i for w, i in state["word_index"].items() if not num_words or i < num_words}
        oov = state["oov_token"]
        return cls(
            word_index,
            state["filters"],
            bool(state["lower"]),
            state["split"],
            state["word_index"].get(oov) if oov is not None else None,
            int(sequencer.state["max_sequence_length"]),
        )

    def __post_init__(self):
        self.translation = str.maketrans({c: self.split for c in self.filters})  # Keras replaces every filter character by `split`

    def words(self, text: str) -> list[str]:
        """keras_preprocessing.text.text_to_word_sequence."""
        if self.lower:
            text = text.lower()
        return [w for w in text.translate(self.translation).split(self.split) if w]

    def encode(self, texts: list[str]) -> np.ndarray:
        """Token ids, pre-padded with 0 and pre-truncated (the last `max_length` words kept), as pad_sequences' defaults."""
        ids = np.zeros((len(texts), self.max_length), dtype=np.int64)
        get, oov = self.word_index.get, self.oov_index
        for row, text in enumerate(texts):
            sequence = [i for i in (get(w, oov) for w in self.words(text)) if i is not None][-self.max_length :]
            if sequence:
                ids[row, self.max_length - len(sequence) :] = sequence
        return ids


# --- the model: Keras' h5 weights, forward pass in torch ------------------------------------------

EXPECTED_LAYERS = ["InputLayer", "Embedding", "Bidirectional", "GlobalMaxPooling1D", "Dense", "Dropout", "Dense"]


def _checked_layers(model_config: dict) -> tuple[dict[str, str], int]:
    """Check the architecture is the one ToxBlockModel computes; return the layer names by role and the input length."""
    layers = model_config["config"]["layers"]
    classes = [layer["class_name"] for layer in layers]
    if [c for c in classes if c != "Dropout"] != [c for c in EXPECTED_LAYERS if c != "Dropout"]:
        raise ValueError(f"h5 model has layers {classes}; expected {EXPECTED_LAYERS} (Dropout optional)")
    layers = [layer for layer in layers if layer["class_name"] != "Dropout"]  # identity at inference
    embedding, bidirectional, dense, output = (layers[i]["config"] for i in (1, 2, 4, 5))
    lstm = bidirectional["layer"]["config"]
    checks = {
        "embedding mask_zero": (embedding["mask_zero"], False),
        "merge_mode": (bidirectional["merge_mode"], "concat"),
        "LSTM activation": (lstm["activation"], "tanh"),
        "LSTM recurrent_activation": (lstm["recurrent_activation"], "hard_sigmoid"),
        "LSTM use_bias": (lstm["use_bias"], True),
        "LSTM return_sequences": (lstm["return_sequences"], True),
        "LSTM go_backwards": (lstm["go_backwards"], False),
        "dense activation": (dense["activation"], "relu"),
        "output activation": (output["activation"], "sigmoid"),
    }
    for what, (found, expected) in checks.items():
        if found != expected:
            raise ValueError(f"h5 model: {what} is {found!r}; expected {expected!r}")
    names = dict(zip(("embedding", "bidirectional", "dense", "output"), (c["name"] for c in (embedding, bidirectional, dense, output)), strict=True))
    return names, int(layers[0]["config"]["batch_input_shape"][1])


def _read_weights(model_weights, layer_name: str) -> list[np.ndarray]:
    """A layer's weights in Keras' order (kernel, recurrent kernel, bias per LSTM; kernel, bias per Dense)."""
    group = model_weights[layer_name]
    return [np.asarray(group[name.decode() if isinstance(name, bytes) else name], dtype=np.float32) for name in group.attrs["weight_names"]]


def _fold_activations(kernel: torch.Tensor, recurrent_kernel: torch.Tensor, bias: torch.Tensor, units: int):
    """Keras' LSTM: z = x W + h U + b, gate columns i, f, c~, o; i, f, o pass through hard_sigmoid(z) =
    clip(0.2 z + 0.5, 0, 1) (Keras 2's, not torch's sigmoid), c~ through tanh(z) = 2 sigmoid(2 z) - 1
    (torch's CPU tanh is ~6x slower than its sigmoid). Reorder the columns to i, f, o, c~ and fold
    0.2 z + 0.5 and 2 z into W, U and b: a step then needs one clamp for the three gates."""
    order = torch.cat([torch.arange(0, 2 * units), torch.arange(3 * units, 4 * units), torch.arange(2 * units, 3 * units)])
    scale = torch.cat([torch.full((3 * units,), 0.2), torch.full((units,), 2.0)])
    shift = torch.cat([torch.full((3 * units,), 0.5), torch.zeros(units)])
    return kernel[:, order] * scale, recurrent_kernel[:, order] * scale, bias[order] * scale + shift


def _tanh_of_double(x: torch.Tensor) -> torch.Tensor:
    """tanh(x / 2) = 2 sigmoid(x) - 1, in place on x; absolute error ~1e-7 in float32."""
    return x.sigmoid_().mul_(2.0).sub_(1.0)


class ToxBlockModel(torch.nn.Module):
    """Embedding -> BiLSTM (return_sequences) -> global max over time -> Dense(relu) -> Dense(sigmoid).
    Dropout, and the LSTM's dropouts, are off at inference. Token 0 is padding (Keras pads before the text)."""

    def __init__(self, embeddings, forward_lstm, backward_lstm, dense, output, max_length: int):
        super().__init__()
        self.units, self.max_length = forward_lstm[1].shape[0], max_length
        embeddings = torch.from_numpy(embeddings)
        for direction, weights in (("forward", forward_lstm), ("backward", backward_lstm)):
            kernel, recurrent_kernel, bias = _fold_activations(*map(torch.from_numpy, weights), self.units)
            # A token's input projection does not depend on the state: compute E W + b once per vocabulary row.
            self.register_buffer(f"{direction}_input", embeddings @ kernel + bias)  # (vocabulary, 4 units)
            self.register_buffer(f"{direction}_recurrent", recurrent_kernel)  # (units, 4 units)
        for name, (kernel, bias) in (("dense", dense), ("output", output)):
            self.register_buffer(f"{name}_kernel", torch.from_numpy(kernel))
            self.register_buffer(f"{name}_bias", torch.from_numpy(bias))
        self.register_buffer("padding_states", self._padding_states())

    @classmethod
    def from_h5(cls, path: str | Path) -> ToxBlockModel:
        import h5py

        with h5py.File(path, "r") as f:
            config = f.attrs["model_config"]
            names, max_length = _checked_layers(json.loads(config.decode() if isinstance(config, bytes) else config))
            (embeddings,), lstm, dense, output = (_read_weights(f["model_weights"], names[role]) for role in ("embedding", "bidirectional", "dense", "output"))
        return cls(embeddings, lstm[:3], lstm[3:], dense, output, max_length)

    def _step(self, z: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One LSTM step from z = x W + h U + b (folded: columns i, f, o, 2 c~), in place on z: the new h and c."""
        gates = z[:, : 3 * self.units].clamp_(0.0, 1.0)  # hard_sigmoid
        i, f, o = gates.split(self.units, dim=1)
        c = torch.addcmul(f * c, i, _tanh_of_double(z[:, 3 * self.units :]))
        return _tanh_of_double(c * 2.0).mul_(o), c

    def _padding_states(self) -> torch.Tensor:
        """(h, c, max of h so far) of the forward LSTM after k padding tokens, k = 0..max_length. Every text
        starts with its padding, so the forward LSTM can start each batch from these instead of from zeros."""
        h = c = torch.zeros(1, self.units)
        pooled = torch.full_like(h, -torch.inf)
        states = [torch.stack([h, c, pooled])]
        for _ in range(self.max_length):
            h, c = self._step(self.forward_input[:1] + h @ self.forward_recurrent, c)
            pooled = torch.maximum(pooled, h)
            states.append(torch.stack([h, c, pooled]))
        return torch.stack(states)  # (max_length + 1, 3, 1, units)

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids (batch, max_length), pre-padded with 0 -> the six label probabilities (batch, 6)."""
        batch, steps = ids.shape
        if steps != self.max_length:
            raise ValueError(f"token ids have {steps} positions; the model was trained on {self.max_length}")
        ids = ids.T.contiguous()  # (time, batch): one contiguous row per step
        text_columns = ids.any(dim=1).nonzero()
        start = int(text_columns[0]) if len(text_columns) else steps  # positions before `start` are padding in every row
        h, c, forward_pooled = (state.expand(batch, -1).contiguous() for state in self.padding_states[start])
        for t in range(start, steps):
            h, c = self._step(self.forward_input.index_select(0, ids[t]).addmm_(h, self.forward_recurrent), c)
            torch.maximum(forward_pooled, h, out=forward_pooled)
        h = c = torch.zeros(batch, self.units, device=ids.device)
        backward_pooled = torch.full_like(h, -torch.inf)
        for t in reversed(range(steps)):  # the backward LSTM reads padding last: it runs all steps
            h, c = self._step(self.backward_input.index_select(0, ids[t]).addmm_(h, self.backward_recurrent), c)
            torch.maximum(backward_pooled, h, out=backward_pooled)
        # GlobalMaxPooling1D over time of [forward, backward] (merge_mode concat); the time order of the outputs does not matter.
        features = torch.cat([forward_pooled, backward_pooled], dim=1)
        hidden = torch.relu(features @ self.dense_kernel + self.dense_bias)
        return torch.sigmoid(hidden @ self.output_kernel + self.output_bias)


# --- the scorer -----------------------------------------------------------------------------------


class ToxBlockScorer:
    """ToxBlock's BiLSTM as a calibfuse toxicity scorer: the probability of one Jigsaw label per text."""

    name = "toxblock"
    note = (
        "toxicity scored by ToxBlock, an offline BiLSTM trained on Jigsaw's 2018 toxic comments (the data of Detoxify "
        "`original`), a proxy for Perspective (on 993 RealToxicityPrompts prompts with Perspective toxicity 0.5-0.99: "
        "ROC-AUC 0.82 against Perspective >= 0.9, Spearman 0.66; alt-profanity-check 0.79 and 0.60): "
        "compare settings, not absolute levels"
    )

    def __init__(self, batch_size: int = 512, device: str = "cpu", label: str = "toxic"):
        if label not in LABELS:
            raise ValueError(f"scorer 'toxblock' has no label {label!r}; its labels are {list(LABELS)}")
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size}; expected >= 1")
        model_path, tokenizer_path = package_files()
        self.tokenizer = TokenizerSettings.from_pickle(tokenizer_path)
        self.model = ToxBlockModel.from_h5(model_path).to(device).eval()
        if self.tokenizer.max_length != self.model.max_length:
            raise ValueError(f"tokenizer pads to {self.tokenizer.max_length} tokens, the model expects {self.model.max_length}")
        largest, rows = max(self.tokenizer.word_index.values(), default=0), len(self.model.forward_input)
        if largest >= rows:
            raise ValueError(f"tokenizer has token ids up to {largest}; the model's embedding has {rows} rows")
        self.batch_size, self.device, self.label = batch_size, device, label

    def score_attributes(self, texts: list[str]) -> dict[str, list[float]]:
        """The six label probabilities of every text (raw sigmoid outputs, not tox-block's optional rescaling)."""
        ids = self.tokenizer.encode(list(texts))
        # Batches of similar length: the forward LSTM of a batch starts at its longest text's first token.
        order = np.argsort(-(ids != 0).sum(axis=1), kind="stable")
        probabilities = np.empty((len(ids), len(LABELS)), dtype=np.float32)
        threads = torch.get_num_threads()
        if torch.device(self.device).type == "cpu":
            # A step's tensors are small (batch x 200): with 2 threads on 2 shared cores, waiting for each
            # other cost more than it gained (10,000 texts: 4-10 s against 1.0-1.3 s on one thread).
            torch.set_num_threads(1)
        try:
            for start in range(0, len(ids), self.batch_size):
                rows = order[start : start + self.batch_size]
                probabilities[rows] = self.model(torch.from_numpy(ids[rows]).to(self.device)).cpu().numpy()
        finally:
            torch.set_num_threads(threads)
        return {label: probabilities[:, j].tolist() for j, label in enumerate(LABELS)}

    def score(self, texts: list[str]) -> list[float]:
        return self.score_attributes(texts)[self.label]
