"""The calibration model alone, as a grid row: its own continuations (its own tokenizer and LM head)
scored like every other cell, so a reader sees what fusion mixes into the target. It is read from the
same alignments as fusion (each records the calibration model it was made with)."""

from __future__ import annotations

from calibfuse.fusion.config import FusionConfig
from calibfuse.fusion.target import TargetLM
from calibfuse.methods.fusion import Fusion


class CalibrationAlone(Fusion):
    role = "diagnostic"  # what fusion mixes in, shown beside it

    def __init__(self, alignments: dict | None = None, calibration_model: dict | None = None, config: FusionConfig | dict | None = None):
        super().__init__(alphas=[0.0], alignments=alignments, calibration_model=calibration_model, config=config)
        self.lm: TargetLM | None = None

    def identity(self, target: str, alpha: float) -> dict | None:
        return {"generator": "calibration_model", "calibration": self.plans[target]["calibration_fingerprint"]}

    def bind(self, target, target_lm, models) -> None:
        model, tokenizer = models.get(self.plans[target]["calibration"])
        self.lm = TargetLM(model, tokenizer, prompt_format=target_lm.prompt_format)

    def generator(self, target_lm: TargetLM, alpha: float = 0.0) -> TargetLM:
        return self.lm

    def modules(self) -> list:
        return [self.lm.model] if self.lm else []

    def to(self, device) -> CalibrationAlone:
        if self.lm is not None:
            self.lm.to(device)
        return self

    def hidden_transform(self, alpha: float):
        return None
