"""Fused generation in one object: a target LM, an aligned calibration model and a FusionConfig.

from calibfuse.fusion.decoding import GenerationSettings
from calibfuse.fusion.generator import FusedGenerator
generator = FusedGenerator.from_artifacts(target="smollm2-135m-instruct",
                                          calibration="<pretrain run>/calibration_model",
                                          alignment="<align run>/alignment")
rows = generator.generate(["You are such a"], alphas=[0.0, 0.3], settings=GenerationSettings(max_new_tokens=20))
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from calibfuse.fusion.artifacts import check_alignment_made_for
from calibfuse.fusion.config import FusionConfig, check_alpha
from calibfuse.fusion.decoding import Generation, GenerationSettings, decode, row_generators
from calibfuse.fusion.fuse import Calibration, fuse
from calibfuse.fusion.plan import plan_fusion
from calibfuse.fusion.target import TargetLM
from calibfuse.models.loading import ModelSpec, as_spec, load_model, load_tokenizer

log = logging.getLogger(__name__)


class FusedGenerator:
    """A target LM fused with an aligned calibration model; batched, left-padded generation."""

    def __init__(
        self,
        target,
        target_tokenizer,
        calibration,
        calibration_tokenizer,
        alignment: torch.Tensor | None,  # (d_c, d_T); None = identity (needs d_c == d_T)
        config: FusionConfig | None = None,
        prompt_format: str = "raw",
        gain: float | None = None,  # scale="learned": the gain a fusion head learned
        norm_affine: tuple[torch.Tensor, torch.Tensor] | None = None,  # layer_norm="affine": its LayerNorm weight and bias
    ):
        self.config = FusionConfig.of(config)
        self.target_lm = TargetLM(target, target_tokenizer, prompt_format)
        width = target.config.hidden_size
        self.fusion = Calibration(calibration, calibration_tokenizer, alignment, target_tokenizer, width, self.config, gain, norm_affine)
        self.target, self.target_tokenizer = self.target_lm.model, target_tokenizer
        self.calibration, self.calibration_tokenizer = self.fusion.model, calibration_tokenizer
        self.shared_tokenizer = self.fusion.shared_tokenizer

    @classmethod
    def from_artifacts(
        cls,
        target: ModelSpec | dict | str,
        calibration: ModelSpec | dict | str | None,
        alignment: str | Path | None,
        config: FusionConfig | dict | None = None,
        prompt_format: str = "raw",
    ) -> FusedGenerator:
        """Load what the grid's fusion method would (calibfuse.fusion.plan): the alignment and what `config`
        needs from it, the calibration model (None: the one the alignment records); an alignment made for
        other models is refused. `alignment=None`: the identity map (equal widths)."""
        config = FusionConfig.of(config, **({"alignment": "identity"} if alignment is None else {}))
        target_spec = as_spec(target)
        plan = plan_fusion("target", target_spec, alignment, calibration, config)
        target_model, calibration_model = load_model(target_spec), load_model(plan["calibration"])
        if config.check_fingerprints and plan["meta"] is not None:
            models = {"calibration": (plan["calibration"], calibration_model), "target": (target_spec, target_model)}
            check_alignment_made_for(plan["alignment"], plan["meta"], **models)
        tokenizers = load_tokenizer(target_spec), load_tokenizer(plan["calibration"])
        return cls(target_model, tokenizers[0], calibration_model, tokenizers[1], plan["A"], config, prompt_format, plan.get("gain"), plan.get("norm_affine"))

    @property
    def A(self) -> torch.Tensor:
        return self.fusion.A

    @property
    def eos_ids(self) -> torch.Tensor:
        return self.target_lm.eos_ids

    @property
    def device(self) -> torch.device:
        return self.target_lm.device

    def to(self, device) -> FusedGenerator:
        """Move both models and A (e.g. to the GPU a DDP rank owns)."""
        self.target_lm.to(device)
        self.fusion.to(device)
        return self

    def fuse(self, h_target: torch.Tensor, h_calibration: torch.Tensor, alpha: float) -> torch.Tensor:
        f = self.fusion
        return fuse(h_target, h_calibration, self.A, alpha, self.config, f.gain, f.norm_affine)

    def _prompt_ids(self, prompts: list[str]) -> list[list[int]]:
        return self.target_lm.prompt_ids(prompts)

    def _consumed_texts(self, sequences: list[list[int]]) -> list[str]:
        return self.fusion.consumed_texts(sequences)

    def calibration_state_of_texts(self, texts: list[str]) -> torch.Tensor:
        return self.fusion.state_of_texts(texts)

    def generate(
        self, prompts: list[str], alphas: float | list[float] = 0.0, settings: GenerationSettings | None = None, use_cache: bool = True
    ) -> list[Generation]:
        """Continuations of every prompt at every alpha: one Generation per (alpha, prompt, sample)."""
        settings = settings or GenerationSettings()
        alphas = [check_alpha(a) for a in ([alphas] if isinstance(alphas, (int, float)) else alphas)]
        rows = []
        for alpha in alphas:  # the same seed, so the same draws, for every alpha
            rows += self.target_lm.generate(prompts, settings, alpha=alpha, hidden_transform=self.fusion.transform(alpha), use_cache=use_cache)
        return rows

    def trace(self, prompts: list[str], alpha: float, settings: GenerationSettings, use_cache: bool = True, processors=()) -> list[dict]:
        """Per-step logits and both hidden states for one batch (what the tests check by hand)."""
        steps: list[dict] = []
        generators = row_generators([(settings.seed + i) * 1_000_003 for i in range(len(prompts))], self.device)
        decode(
            self.target,
            self.target_tokenizer,
            self._prompt_ids(prompts),
            settings,
            generators,
            eos_ids=self.eos_ids,
            hidden_transform=self.fusion.transform(alpha, always=True),
            processors=processors,
            use_cache=use_cache,
            trace=steps,
        )
        return steps
