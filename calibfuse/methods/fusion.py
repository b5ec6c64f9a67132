"""calibfuse's method as a grid method: the aligned calibration state mixed into the target's final
hidden state with weight alpha (calibfuse.fusion.fuse). At alpha 0 it is the target alone, so those
cells are shared with `none` and with every other fusion setting."""

from __future__ import annotations

import logging
import math
from numbers import Real

from calibfuse.fusion.artifacts import check_alignment_made_for
from calibfuse.fusion.config import FusionConfig, check_alpha
from calibfuse.fusion.fuse import Calibration
from calibfuse.fusion.plan import plan_fusion
from calibfuse.methods import Method
from calibfuse.models.loading import ModelSpec

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

    def prepare(self, targets: dict[str, ModelSpec]) -> None:
        self.targets = dict(targets)
        for name, spec in targets.items():
            self.plans[name] = self._plan(name, spec)

    def _plan(self, name: str, spec: ModelSpec) -> dict:
        return plan_fusion(name, spec, self.alignments.get(name), self.calibration_model, self.config)

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
