"""Fusion with a null calibration state, a diagnostic row: h = alpha * 0 + (1 - alpha) * h_T. Through a
linear head (no soft-capping) that is the target at sampling temperature 1 / (1 - alpha). Under greedy
decoding (the paper protocol) it keeps the target's tokens except where rounding the shrunk state to
the target's dtype breaks a near-tie: the row is then the grid's noise floor. Fusion's formula shrinks
h_T by (1 - alpha) whatever the calibration model says; this row shows what that alone does to
toxicity and perplexity, so the part of fusion's effect that comes from the calibration model is
the difference between the two rows at the same alpha."""

from __future__ import annotations

import torch

from calibfuse.methods import Method
from calibfuse.methods.fusion import checked_alphas


class NullCalibration(Method):
    role = "diagnostic"  # fusion's alpha without the calibration model

    def __init__(self, alphas: list[float]):
        self.alphas = checked_alphas(alphas)

    def identity(self, target: str, alpha: float) -> dict | None:
        return None if alpha == 0 else {"hidden": "shrink_by_1_minus_alpha"}

    def hidden_transform(self, alpha: float):
        return None if alpha == 0 else Shrink(alpha)


class Shrink:
    """h_T -> (1 - alpha) h_T: fusion's transform with LN(h_c A) = 0."""

    def __init__(self, alpha: float):
        self.alpha = alpha

    def __call__(self, h_target: torch.Tensor, state) -> torch.Tensor:
        return ((1.0 - self.alpha) * h_target.float()).to(h_target.dtype)
