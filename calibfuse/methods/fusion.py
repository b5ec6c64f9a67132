"""calibfuse's method as a grid method: the aligned calibration state mixed into the target's final
hidden state with weight alpha (calibfuse.fusion.fuse). At alpha 0 it is the target alone, so those
cells are shared with `none` and with every other fusion setting."""

from __future__ import annotations

import logging
import math
from numbers import Real
from pathlib import Path

from calibfuse.fusion.artifacts import alignment_extras, check_alignment_made_for, load_alignment, recorded_model
from calibfuse.fusion.config import FusionConfig, check_alpha
from calibfuse.fusion.fuse import Calibration
from calibfuse.methods import Method
from calibfuse.models.loading import ModelSpec, as_spec, fingerprint, runtime_identity
from calibfuse.utils.files import sha256_file

log = logging.getLogger(__name__)


def checked_alphas(alphas: list[float]) -> list[float]:
    """A grid's fusion weights: at least one, each a number in [0, 1]; duplicates run once, in order."""
    if isinstance(alphas, (str, bytes, Real)) or not hasattr(alphas, "__iter__"):  # alphas="0.3" would be read character by character
        raise ValueError(f"alphas={alphas!r}; expected a list of fusion weights in [0, 1], e.g. alphas=[0,0.3]")
    if not alphas:
        raise ValueError("alphas=[]; expected at least one fusion weight in [0, 1], e.g. alphas=[0,0.3]")
    for alpha in alphas:
        if isinstance(alpha, bool) or not isinstance(alpha, Real) or math.isnan(alpha):
            raise ValueError(f"alphas has {alpha!r}; expected numbers in [0, 1], e.g. alphas=[0,0.3]")
    return sorted({check_alpha(a) for a in alphas}, key=list(alphas).index)


class Fusion(Method):
    def __init__(self, alphas: list[float], alignments: dict | None = None, calibration_model: dict | None = None, config: FusionConfig | dict | None = None):
        self.alphas = checked_alphas(alphas)
        self.config = FusionConfig.of(config)
        self.alignments, self.calibration_model = dict(alignments or {}), calibration_model
        self.plans: dict[str, dict] = {}
        self.targets: dict[str, ModelSpec] = {}
        self.calibration: Calibration | None = None

    def strengths(self) -> list[float]:
        return self.alphas

    def prepare(self, targets: dict[str, ModelSpec]) -> None:
        self.targets = dict(targets)
        for name, spec in targets.items():
            self.plans[name] = self._plan(name, spec)

    def _plan(self, name: str, spec: ModelSpec) -> dict:
        """The target's alignment and calibration model, read from their files; nothing loaded."""
        if self.config.alignment == "identity":  # the ablation: no learned map (equal widths only)
            if self.calibration_model is None:
                raise ValueError("fusion.alignment=identity needs calibration_model.name_or_path: there is no alignment to read it from")
            calibration = as_spec(self.calibration_model)
            return {
                "A": None,
                "meta": None,
                "alignment": None,
                "alignment_sha256": "identity",
                "calibration": calibration,
                "calibration_fingerprint": {"weights": fingerprint(calibration), **runtime_identity(calibration)},
            }
        path = self.alignments.get(name)
        if path in (None, "???"):
            raise ValueError(
                f"no alignment for target {name!r}: set alignments.{name}=<align run dir>/alignment "
                f"(+alignments.{name}=... for a target the config does not list)"
            )
        A, meta = load_alignment(path)
        top1, chance = meta.get("held_out_top1"), meta.get("chance_top1") or 0.0
        if isinstance(top1, float) and top1 <= 2 * chance:  # A maps nothing to its token: fusion would mix in noise
            log.warning("alignment %s for %s has held-out top-1 %.3f (chance %.2g): it aligns nothing; align longer", path, name, top1, chance)
        directory = Path(path).expanduser()
        directory = directory.parent if directory.is_file() else directory
        if self.calibration_model is not None:
            calibration = as_spec(self.calibration_model)
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
        if self.config.check_fingerprints:  # local weights are hashed without loading: a wrong pairing fails now, not after loading
            local = {role: (model, None) for role, model in (("calibration", calibration), ("target", spec)) if fingerprint(model).startswith("sha256:")}
            check_alignment_made_for(directory, meta, **local)
        return {
            "A": A,
            **alignment_extras(directory, self.config),
            "meta": meta,
            "alignment": str(directory),
            "alignment_sha256": sha256_file(directory / "alignment.safetensors"),
            "calibration": calibration,
            "calibration_fingerprint": {"weights": calibration_fingerprint, **runtime_identity(calibration)},
        }

    def identity(self, target: str, alpha: float) -> dict | None:
        if alpha == 0:
            return None  # the target alone does not depend on the calibration model
        plan = self.plans[target]
        return {
            "calibration": plan["calibration_fingerprint"],
            "alignment": plan["alignment_sha256"],
            "calibration_context": self.config.calibration_context,
            "layer_norm": self.config.layer_norm,
        } | ({"scale": self.config.scale} if self.config.scale != "none" else {})

    def bind(self, target, target_lm, models) -> None:
        plan = self.plans[target]
        model, tokenizer = models.get(plan["calibration"])
        if self.config.check_fingerprints and plan["meta"] is not None:
            check_alignment_made_for(plan["alignment"], plan["meta"], calibration=(plan["calibration"], model), target=(self.targets[target], target_lm.model))
        self.calibration = Calibration(
            model,
            tokenizer,
            plan["A"],
            target_lm.tokenizer,
            target_lm.model.config.hidden_size,
            self.config,
            gain=plan.get("gain"),
            norm_affine=plan.get("norm_affine"),
        )

    def modules(self) -> list:
        return [self.calibration.model] if self.calibration else []

    def to(self, device) -> Fusion:
        if self.calibration is not None:
            self.calibration.to(device)
        return self

    def hidden_transform(self, alpha: float):
        return self.calibration.transform(alpha) if alpha > 0 else None
