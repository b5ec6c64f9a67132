"""Every option of stage 3 in one object, each with its default, checked once (as transformers'
`GenerationConfig` is for decoding). The grid's fusion method, `FusedGenerator`, `calibfuse.generate`,
the fusion head and the pipeline all read it; configs build it from `conf/fusion/default.yaml`.

alpha is not an option here: it is what a grid sweeps (`alphas`), passed where fusion runs."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass

CALIBRATION_CONTEXTS = ("full", "last_token")  # last_token: the reference's behaviour (newest token only, no cache)
LAYER_NORMS = ("parameter_free", "none", "affine")  # affine: weight and bias trained by calibfuse.fusion_head, stored with A
SCALES = ("none", "target_rms", "learned")  # learned: a scalar gain trained by calibfuse.fusion_head, stored with A
ALIGNMENTS = ("learned", "identity")  # identity: the ablation A = I (equal widths only)


def check_alpha(alpha: float) -> float:
    if not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"alpha={alpha}; expected a weight in [0, 1] (0 = the target alone)")
    return float(alpha)


@dataclass(frozen=True)
class FusionConfig:
    calibration_context: str = "full"  # full: the whole text so far (own KV cache) | last_token: the reference's
    layer_norm: str = "parameter_free"  # LN(h_c A) as the reference (weight 1, bias 0) | none | affine (a fusion head's)
    scale: str = "none"  # none: LN(h_c A) at unit RMS (faithful) | target_rms: at h_T's RMS | learned: a fusion head's gain
    alignment: str = "learned"  # learned: the stage-2 (or fusion-head) A | identity: A = I (ablation)
    layer_norm_eps: float = 1e-5
    check_fingerprints: bool = True  # refuse an alignment made for other models

    def __post_init__(self):
        for option, allowed in (
            ("calibration_context", CALIBRATION_CONTEXTS),
            ("layer_norm", LAYER_NORMS),
            ("scale", SCALES),
            ("alignment", ALIGNMENTS),
        ):
            if getattr(self, option) not in allowed:
                raise ValueError(f"fusion.{option}={getattr(self, option)!r}; expected one of {list(allowed)}")
        if not self.layer_norm_eps > 0:
            raise ValueError(f"fusion.layer_norm_eps={self.layer_norm_eps!r}; expected a positive number")
        if self.alignment == "identity" and (self.scale == "learned" or self.layer_norm == "affine"):
            raise ValueError(
                f"fusion.scale={self.scale}, fusion.layer_norm={self.layer_norm}: scale=learned and layer_norm=affine need a fusion "
                "head's alignment (its gain, its LayerNorm weights); fusion.alignment=identity has none"
            )

    @classmethod
    def of(cls, value: FusionConfig | Mapping | None = None, **options) -> FusionConfig:
        """A FusionConfig from one, a mapping (a config block, `_target_` ignored) or nothing, with `options` on top."""
        if isinstance(value, FusionConfig):
            return dataclasses.replace(value, **options) if options else value
        fields = {f.name for f in dataclasses.fields(cls)}
        given = {k: v for k, v in dict(value or {}).items() if k != "_target_"} | options
        unknown = sorted(set(given) - fields)
        if unknown:
            raise ValueError(f"fusion options {unknown} are unknown; expected some of {sorted(fields)}")
        return cls(**given)
