"""Fusion planned from files, before any model loads: the target's alignment (A, what the config needs
from it, its record of the calibration model) and the calibration model's spec and fingerprint. The
grid's fusion method and FusedGenerator.from_artifacts both start here, so a wrong pairing or a
missing file fails the same way, early, in both."""

from __future__ import annotations

import logging
from pathlib import Path

from calibfuse.fusion.artifacts import alignment_extras, check_alignment_made_for, load_alignment, recorded_model
from calibfuse.fusion.config import FusionConfig
from calibfuse.models.loading import ModelSpec, as_spec, fingerprint, runtime_identity
from calibfuse.utils.files import sha256_file

log = logging.getLogger(__name__)


def plan_fusion(name: str, spec: ModelSpec, path: str | Path | None, calibration_model: dict | ModelSpec | None, config: FusionConfig) -> dict:
    """The target's alignment and calibration model, read from their files; nothing loaded."""
    if config.alignment == "identity":  # the ablation: no learned map (equal widths only)
        if calibration_model is None:
            raise ValueError("fusion.alignment=identity needs calibration_model.name_or_path: there is no alignment to read it from")
        calibration = as_spec(calibration_model)
        return {
            "A": None,
            "meta": None,
            "alignment": None,
            "alignment_sha256": "identity",
            "calibration": calibration,
            "calibration_fingerprint": {"weights": fingerprint(calibration), **runtime_identity(calibration)},
        }
    if path in (None, "???"):
        raise ValueError(
            f"no alignment for target {name!r}: set alignments.{name}=<align run dir>/alignment (+alignments.{name}=... for a target the config does not list)"
        )
    A, meta = load_alignment(path)
    top1, chance = meta.get("held_out_top1"), meta.get("chance_top1") or 0.0
    if isinstance(top1, float) and top1 <= 2 * chance:  # A maps nothing to its token: fusion would mix in noise
        log.warning("alignment %s for %s has held-out top-1 %.3f (chance %.2g): it aligns nothing; align longer", path, name, top1, chance)
    directory = Path(path).expanduser()
    directory = directory.parent if directory.is_file() else directory
    if calibration_model is not None:
        calibration = as_spec(calibration_model)
    else:  # the calibration model this alignment was made with, loaded like the target
        record = meta["calibration_model"]
        calibration = ModelSpec(
            recorded_model(record, directory),
            gguf_file=record.get("gguf_file"),
            revision=record.get("revision"),
            dtype=spec.dtype,
            device=spec.device,
            cache_dir=spec.cache_dir,
        )
    calibration_fingerprint = fingerprint(calibration)
    if config.check_fingerprints:  # local weights are hashed without loading: a wrong pairing fails now, not after loading
        local = {role: (model, None) for role, model in (("calibration", calibration), ("target", spec)) if fingerprint(model).startswith("sha256:")}
        check_alignment_made_for(directory, meta, **local)
    return {
        "A": A,
        **alignment_extras(directory, config),
        "meta": meta,
        "alignment": str(directory),
        "alignment_sha256": sha256_file(directory / "alignment.safetensors"),
        "calibration": calibration,
        "calibration_fingerprint": {"weights": calibration_fingerprint, **runtime_identity(calibration)},
    }
