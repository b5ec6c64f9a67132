"""Stage 3: output-layer fusion at inference (docs/method.md, stage 3).

At every generated position the target's final hidden state h_T (after its final norm) is replaced by

    h = alpha * LN(h_c A) + (1 - alpha) * h_T,        logits = lm_head_T(h)

where h_c is the calibration model's last hidden state for the same text, A the stage-2 alignment
and LN a parameter-free layer norm over d_T. Fusing in hidden space needs no second vocabulary
projection and stays right for heads with soft-capping.

Unlike the reference code, the calibration state covers the whole text so far (its own KV cache),
also when the two models tokenize differently: the calibration model then reads the text the
target has consumed through its own tokenizer. `calibration_context="last_token"` keeps the
reference's behaviour (newest token only, position 0, no cache) for the ablation.

    from calibfuse.fusion import FusedGenerator, GenerationSettings
    generator = FusedGenerator.from_artifacts(target="smollm2-135m-instruct",
                                              calibration="<pretrain run>/calibration_model",
                                              alignment="<align run>/alignment")
    rows = generator.generate(["You are such a"], alphas=[0.0, 0.3], settings=GenerationSettings(max_new_tokens=20))
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from calibfuse.fusion.artifacts import alignment_gain, alignment_norm_affine, check_alignment_made_for, load_alignment
from calibfuse.fusion.decoding import Generation, GenerationSettings, decode, row_generators
from calibfuse.fusion.fuse import Calibration, check_alpha, fuse
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
        calibration_context: str = "full",
        layer_norm: str = "parameter_free",
        prompt_format: str = "raw",
        layer_norm_eps: float = 1e-5,
        scale: str = "none",
        gain: float | None = None,
        norm_affine: tuple[torch.Tensor, torch.Tensor] | None = None,
    ):
        self.target_lm = TargetLM(target, target_tokenizer, prompt_format)
        self.fusion = Calibration(
            calibration,
            calibration_tokenizer,
            alignment,
            target_tokenizer,
            target.config.hidden_size,
            calibration_context,
            layer_norm,
            layer_norm_eps,
            scale,
            gain,
            norm_affine,
        )
        self.target, self.target_tokenizer = self.target_lm.model, target_tokenizer
        self.calibration, self.calibration_tokenizer = self.fusion.model, calibration_tokenizer
        self.shared_tokenizer = self.fusion.shared_tokenizer

    @classmethod
    def from_artifacts(
        cls,
        target: ModelSpec | dict | str,
        calibration: ModelSpec | dict | str,
        alignment: str | Path | None,
        check_fingerprints: bool = True,
        **options,
    ) -> FusedGenerator:
        """Load target, calibration model and alignment; refuse an alignment made for other models."""
        target_spec, calibration_spec = as_spec(target), as_spec(calibration)
        target_model, calibration_model = load_model(target_spec), load_model(calibration_spec)
        A = None
        if alignment is not None:
            A, meta = load_alignment(alignment)
            if check_fingerprints:
                check_alignment_made_for(alignment, meta, calibration=(calibration_spec, calibration_model), target=(target_spec, target_model))
            if options.get("scale") == "learned":
                options["gain"] = alignment_gain(alignment)
            if options.get("layer_norm") == "affine":
                options["norm_affine"] = alignment_norm_affine(alignment)
        return cls(target_model, load_tokenizer(target_spec), calibration_model, load_tokenizer(calibration_spec), A, **options)

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
        return fuse(h_target, h_calibration, self.A, alpha, f.layer_norm, f.layer_norm_eps, f.scale, f.gain, f.norm_affine)

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
            rows += self.target_lm.generate(prompts, settings, strength=alpha, hidden_transform=self.fusion.transform(alpha), use_cache=use_cache)
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
