"""What loading a model needs to know about its files: a local folder that can load (config and
readable weights), a hub id that cannot be fetched, and a quiet one-time GGUF de-quantisation."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from pathlib import Path

from calibfuse.models.embedded import EMBEDDED_MODELS


def check_model_dir(directory: Path) -> None:
    """A save_pretrained folder that can load: its config.json, and weight files whose headers read
    (a truncated or corrupted file is named here, not deep inside transformers)."""
    from safetensors import safe_open

    if not (directory / "config.json").is_file():
        raise FileNotFoundError(f"model directory {str(directory)!r} has no config.json; expected a save_pretrained folder (config.json and weights)")
    weights = sorted(directory.glob("*.safetensors"))
    if not weights and not any(directory.glob("*.bin")):
        raise FileNotFoundError(f"model directory {str(directory)!r} has no weight files; expected model.safetensors (or shards) beside config.json")
    for path in weights:
        try:
            with safe_open(str(path), framework="pt") as f:
                f.keys()
        except Exception as error:  # noqa: BLE001 - whatever safetensors says, the file is unusable
            raise ValueError(f"weight file {str(path)!r} cannot be read ({error}); it is truncated or corrupted: copy or save it again") from None


@contextlib.contextmanager
def named_hub_errors(source: str):
    """A hub id that cannot be fetched: say which model, and whether the hub is offline or unreachable."""
    try:
        yield
    except OSError as error:
        if Path(source).exists():
            raise
        offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
        why = "the hub is offline here (HF_HUB_OFFLINE=1) and it is not in the local cache" if offline else f"it could not be fetched from the hub ({error})"
        raise OSError(
            f"model {source!r} is not a local path, and {why}; expected a local model dir, an embedded name ({sorted(EMBEDDED_MODELS)}) or a reachable hub id"
        ) from None


class _DropGgufDtypeNote(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "weights packed is fastest in float32" not in str(record.msg)


@contextlib.contextmanager
def quiet_gguf_load():
    """A GGUF is de-quantised once and saved: its tqdm bar (not behind transformers' disable_progress_bar)
    and its note that packed weights run fastest in float32 say nothing to a user here."""
    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    bar = getattr(gguf_utils, "tqdm", None)
    if bar is not None:
        gguf_utils.tqdm = functools.partial(bar, disable=True)
    note, quantizer_log = _DropGgufDtypeNote(), logging.getLogger("transformers.quantizers.quantizer_gguf")
    quantizer_log.addFilter(note)
    try:
        yield
    finally:
        quantizer_log.removeFilter(note)
        if bar is not None:
            gguf_utils.tqdm = bar
