"""Model loading: every way of naming a model, and the errors for bad names."""

import pytest
import torch
from transformers import AutoTokenizer

from calibfuse.models.embedded import EMBEDDED_MODELS, _assemble
from calibfuse.models.loading import ModelSpec, load_model, load_tokenizer, resolve


def test_local_directory_loads_with_configured_dtype(tiny_model_dirs):
    spec = ModelSpec(str(tiny_model_dirs["llama"]), dtype="bfloat16")
    model = load_model(spec)
    assert next(model.parameters()).dtype == torch.bfloat16
    assert not model.training
    tokenizer = load_tokenizer(spec)
    assert tokenizer.pad_token == "<pad>" != tokenizer.eos_token and tokenizer.padding_side == "right"  # its own pad token kept


def test_a_tokenizer_without_a_pad_token_pads_with_its_end_of_sequence_token(tiny_model_dirs, tmp_path):
    own = AutoTokenizer.from_pretrained(tiny_model_dirs["llama"])
    own.pad_token = None
    own.save_pretrained(tmp_path)
    tokenizer = load_tokenizer(ModelSpec(str(tmp_path)))
    assert tokenizer.pad_token == "</s>" == tokenizer.eos_token and tokenizer.pad_token_id == 2


def test_trust_remote_code_is_off_by_default():
    assert ModelSpec("org/name").trust_remote_code is False


def test_hub_id_passes_through_untouched():
    assert resolve(ModelSpec("meta-llama/Llama-2-7b-chat-hf", revision="main")) == ("meta-llama/Llama-2-7b-chat-hf", None)


def test_smollm2_resolves_to_the_gguf_inside_its_package():
    directory, gguf_file = resolve(ModelSpec("smollm2-135m-instruct"))
    assert gguf_file == EMBEDDED_MODELS["smollm2-135m-instruct"].gguf_name
    assert (torch.os.path.getsize(f"{directory}/{gguf_file}")) > 50_000_000


def test_gemma_is_assembled_once_into_the_configured_cache(tmp_path):
    path = _assemble("gemma3-270m", str(tmp_path / "cache"))
    assert path.parent == tmp_path / "cache" and path.stat().st_size > 200_000_000
    mtime = path.stat().st_mtime_ns
    assert resolve(ModelSpec("gemma3-270m", cache_dir=str(tmp_path / "cache"))) == (str(path.parent), path.name)
    assert path.stat().st_mtime_ns == mtime  # reused, not rebuilt
    assert not list(path.parent.glob("*.partial"))


def test_unknown_embedded_name_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown embedded model name 'smollm3'.*gemma3-270m.*smollm2-135m-instruct"):
        resolve(ModelSpec("smollm3"))


def test_missing_local_path_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        resolve(ModelSpec(str(tmp_path / "does-not-exist")))
    with pytest.raises(FileNotFoundError, match=r"model\.gguf"):
        resolve(ModelSpec("./model.gguf"))


def test_file_that_is_not_gguf_is_refused(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match=r"not a \.gguf file"):
        resolve(ModelSpec(str(tmp_path / "weights.bin")))


def test_missing_gguf_file_in_directory_is_named(tiny_model_dirs):
    with pytest.raises(FileNotFoundError, match="nope.gguf"):
        resolve(ModelSpec(str(tiny_model_dirs["llama"]), gguf_file="nope.gguf"))


def test_bad_dtype_is_named():
    with pytest.raises(ValueError, match=r"dtype='fp8'.*bfloat16"):
        ModelSpec("org/name", dtype="fp8")


def test_auto_dtype_follows_the_hardware(monkeypatch):
    from calibfuse.models import loading as models

    monkeypatch.setattr(models, "cpu_has_native_bf16", lambda: False)
    assert models.resolve_dtype("auto", "cpu") == torch.float32  # emulated bf16 is ~3x slower
    monkeypatch.setattr(models, "cpu_has_native_bf16", lambda: True)
    assert models.resolve_dtype("auto", "cpu") == torch.bfloat16
    assert models.resolve_dtype("float16", "cpu") == torch.float16
