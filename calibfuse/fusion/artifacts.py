"""The alignment artifact, as calibfuse.align writes it and fusion reads it: `alignment.safetensors`
(A, d_c x d_T, and the matched token ids) and `alignment.json` (both models named and fingerprinted).
A local model is named relative to the alignment dir, so the artifact keeps working when the outputs
tree moves or is used from another directory; its fingerprint still decides whether the weights found
are the ones it was made for."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from safetensors.torch import load_file

from calibfuse.models.embedded import EMBEDDED_MODELS
from calibfuse.models.loading import ModelSpec, fingerprint


def recorded_name(name_or_path: str, artifact_dir: Path) -> dict:
    """How an alignment names a model: a local path relative to the alignment dir, so the artifact still
    finds it from another working directory or in a moved outputs tree, with the absolute path as a
    hint; an embedded name or hub id as given."""
    path = Path(name_or_path).expanduser()
    if name_or_path in EMBEDDED_MODELS or not path.exists():
        return {"name_or_path": name_or_path}
    return {
        "name_or_path": os.path.relpath(path.resolve(), Path(artifact_dir).resolve()),
        "path_relative_to": "alignment_dir",
        "absolute_path": str(path.resolve()),
    }


def model_record(spec: ModelSpec, model, tokenizer, artifact_dir: Path) -> dict:
    """What an alignment says about one of its two models; fusion checks `fingerprint`."""
    return {
        **recorded_name(spec.name_or_path, artifact_dir),
        "gguf_file": spec.gguf_file,
        "revision": spec.revision,
        "fingerprint": fingerprint(spec, model),
        "model_class": type(model).__name__,
        "hidden_size": model.config.hidden_size,
        "vocab_size": len(tokenizer),
    }


def read_tensors(weights: Path) -> dict[str, torch.Tensor]:
    """An alignment's tensors, or an error that names the file when it is cut short or not safetensors."""
    try:
        return load_file(weights)
    except Exception as error:  # noqa: BLE001 - safetensors raises its own error type for a damaged file
        raise ValueError(
            f"alignment file {str(weights)!r} cannot be read ({type(error).__name__}: {error}); expected the safetensors file "
            "a calibfuse.align or calibfuse.fusion_head run writes: run that stage again (the pipeline rebuilds a damaged stage)"
        ) from None


def read_alignment_json(meta: Path) -> dict:
    try:
        return json.loads(meta.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(
            f"alignment file {str(meta)!r} is not valid JSON ({error}); expected the alignment.json a calibfuse.align run writes: run that stage again"
        ) from None


def load_alignment(path: str | Path) -> tuple[torch.Tensor, dict]:
    """A (d_c x d_T) and the alignment.json written by calibfuse.align."""
    directory = Path(path)
    if directory.is_file():
        directory = directory.parent
    weights, meta = directory / "alignment.safetensors", directory / "alignment.json"
    for file in (weights, meta):
        if not file.is_file():
            raise FileNotFoundError(f"alignment file {str(file)!r} does not exist; expected the alignment/ dir of a calibfuse.align run")
    A = read_tensors(weights)["A"]
    bad = int((~torch.isfinite(A)).sum())
    if bad:  # a diverged A fuses into empty continuations, which a grid would count as non-toxic
        raise ValueError(
            f"alignment file {str(weights)!r} holds {bad} non-finite entries of {A.numel()} in A; "
            "expected finite values: align again (a diverged run: lower alignment.optimizer.lr)"
        )
    return A, read_alignment_json(meta)


def alignment_gain(path: str | Path, default: float | None = None) -> float:
    """The scalar gain a fusion head learned with A (fusion.scale=learned); `default` where there is
    none (else an error)."""
    directory = Path(path).expanduser()
    weights = (directory.parent if directory.is_file() else directory) / "alignment.safetensors"
    tensors = read_tensors(weights)
    if "gain" not in tensors and default is not None:
        return default
    if "gain" not in tensors:
        raise ValueError(
            f"alignment file {str(weights)!r} has no learned gain; expected an alignment from calibfuse.fusion_head fusion.scale=learned "
            "(or fusion.scale=none|target_rms)"
        )
    gain = float(tensors["gain"])
    if not math.isfinite(gain):
        raise ValueError(f"alignment file {str(weights)!r} holds a non-finite gain ({gain}); expected a finite scalar: train the head again")
    return gain


def alignment_norm_affine(path: str | Path, required: bool = True) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The LayerNorm weight and bias a fusion head learned with A (fusion.layer_norm=affine); None
    where there are none and they are not `required` (else an error)."""
    directory = Path(path).expanduser()
    weights = (directory.parent if directory.is_file() else directory) / "alignment.safetensors"
    tensors = read_tensors(weights)
    if not required and "norm_weight" not in tensors:
        return None
    if "norm_weight" not in tensors or "norm_bias" not in tensors:
        raise ValueError(
            f"alignment file {str(weights)!r} has no LayerNorm weight and bias; expected an alignment from "
            "calibfuse.fusion_head fusion.layer_norm=affine (or fusion.layer_norm=parameter_free|none)"
        )
    affine = tensors["norm_weight"], tensors["norm_bias"]
    if not all(torch.isfinite(t).all() for t in affine):
        raise ValueError(f"alignment file {str(weights)!r} holds non-finite LayerNorm weights; expected finite values: train the head again")
    return affine


def alignment_extras(path: str | Path, config) -> dict:
    """What a FusionConfig needs from an alignment besides A: a fusion head's gain (scale=learned) and
    LayerNorm weight and bias (layer_norm=affine); missing ones are named errors."""
    return {
        "gain": alignment_gain(path) if config.scale == "learned" else None,
        "norm_affine": alignment_norm_affine(path) if config.layer_norm == "affine" else None,
    }


def check_alignment_made_for(alignment, meta: dict, **models: tuple[ModelSpec, object]) -> None:
    """Refuse an alignment whose recorded weight fingerprints differ from the models at hand
    (keyword: role in alignment.json -> (spec, loaded model))."""
    role_names = {"calibration": "calibration_model", "target": "target"}
    for role, (spec, model) in models.items():
        record = meta[role_names.get(role, role)]
        recorded, actual = record["fingerprint"], fingerprint(spec, model)
        if recorded != actual:
            raise ValueError(
                f"alignment {str(alignment)!r} was made for {role_names.get(role, role)} {record['name_or_path']!r} ({recorded}), "
                f"not for {spec.name_or_path!r} ({actual}); align these models first, or turn the check off: check_fingerprints=False "
                "(fusion.check_fingerprints=false)"
            )


def recorded_model(record: dict, alignment_dir: Path) -> str:
    """The model an alignment.json record names: a local path is tried relative to the alignment dir
    (calibfuse.align writes it so), then as given (absolute or relative to the working directory,
    as older alignments recorded it), then at the recorded absolute path; a hub id or embedded name
    is returned as it is. The fingerprint check still decides whether the weights found are the ones."""
    name = record["name_or_path"]
    if name in EMBEDDED_MODELS:
        return name
    candidates = [alignment_dir / Path(name).expanduser(), Path(name).expanduser()]
    if record.get("absolute_path"):
        candidates.append(Path(record["absolute_path"]))
    for candidate in candidates:
        if candidate.exists():
            return str(candidate.resolve())
    if record.get("absolute_path") or name.startswith((".", "/", "~")) or name.count("/") > 1:  # a path, not an 'org/name' hub id
        raise FileNotFoundError(
            f"alignment {str(alignment_dir)!r} was made with the local model {name!r}, which is not at "
            f"{', '.join(repr(str(c)) for c in dict.fromkeys(candidates))}; expected it at one of these (an older alignment "
            "names it relative to the directory it was made in: run from there), or name it: calibration_model={name_or_path:<path>}"
        )
    return name
