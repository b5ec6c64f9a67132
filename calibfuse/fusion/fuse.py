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


FusedGenerator (calibfuse.fusion.generator) puts it to work; FusionConfig (calibfuse.fusion.config) holds its options.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from calibfuse.fusion.calibration import CalibrationStream
from calibfuse.fusion.config import FusionConfig, check_alpha
from calibfuse.fusion.decoding import DecodeState, forward_step
from calibfuse.models.lm import final_hidden, positions_from_mask, same_tokenizer

log = logging.getLogger(__name__)
DEFAULT = FusionConfig()  # the faithful fusion


def fuse(
    h_target: torch.Tensor,
    h_calibration: torch.Tensor,
    A: torch.Tensor,
    alpha: float,
    config: FusionConfig = DEFAULT,
    gain: float | torch.Tensor = 1.0,
    norm_affine: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """alpha * LN(h_c A) + (1 - alpha) * h_T, in fp32, returned in the target's dtype.

    scale="target_rms" (a variant): LN(h_c A) has unit RMS while h_T carries the target's final-norm
    scale, so the same alpha mixes differently per target; rescale it to h_T's RMS at each position.
    scale="learned" (a variant): LN(h_c A) times `gain`, a scalar trained with A (calibfuse.fusion_head).
    layer_norm="affine" (a variant): the LayerNorm's elementwise weight and bias, `norm_affine`, trained with A."""
    layer_norm, scale, eps = config.layer_norm, config.scale, config.layer_norm_eps
    mapped = h_calibration.float() @ A
    if layer_norm == "parameter_free":  # the reference's fresh nn.LayerNorm: weight 1, bias 0, never trained
        mapped = F.layer_norm(mapped, (mapped.shape[-1],), eps=eps)
    elif layer_norm == "affine":
        mapped = F.layer_norm(mapped, (mapped.shape[-1],), *norm_affine, eps=eps)
    target = h_target.float()
    if scale == "target_rms":
        mapped = mapped * (target.pow(2).mean(-1, keepdim=True).sqrt() / mapped.pow(2).mean(-1, keepdim=True).add(eps).sqrt())
    elif scale == "learned":
        mapped = mapped * gain
    return (alpha * mapped + (1.0 - alpha) * target).to(h_target.dtype)


class Calibration:
    """The calibration side of fusion: the calibration model, its tokenizer, A, and the rule for
    reading its state at a target position. `transform(alpha)` plugs it into the decode loop."""

    def __init__(
        self,
        model,
        tokenizer,
        alignment: torch.Tensor | None,
        target_tokenizer,
        target_width: int,
        config: FusionConfig = DEFAULT,
        gain: float | None = None,
        norm_affine: tuple[torch.Tensor, torch.Tensor] | None = None,
    ):
        layer_norm, scale = config.layer_norm, config.scale
        if scale == "learned" and gain is None:
            raise ValueError(
                "scale='learned' needs the gain a fusion head learned (alignment.safetensors 'gain'); "
                "expected an alignment from calibfuse.fusion_head scale=learned"
            )
        if layer_norm == "affine" and (norm_affine is None or any(tuple(t.shape) != (target_width,) for t in norm_affine)):
            shapes = None if norm_affine is None else [tuple(t.shape) for t in norm_affine]
            raise ValueError(
                f"layer_norm='affine' needs the LayerNorm weight and bias a fusion head learned, each of shape ({target_width},); "
                f"got {shapes}: expected an alignment from calibfuse.fusion_head layer_norm=affine"
            )
        d_c = model.config.hidden_size
        if alignment is None:
            if d_c != target_width:
                raise ValueError(f"an identity alignment needs equal widths; calibration model is {d_c} wide, target {target_width}")
            alignment = torch.eye(d_c)
        if tuple(alignment.shape) != (d_c, target_width):
            raise ValueError(
                f"alignment A has shape {tuple(alignment.shape)} but the calibration model is {d_c} wide and the "
                f"target {target_width} wide; expected A of shape ({d_c}, {target_width})"
            )
        self.model, self.tokenizer, self.target_tokenizer = model.eval(), tokenizer, target_tokenizer
        self.A = alignment.float().to(next(model.parameters()).device)
        self.config = config
        self.shared_tokenizer = same_tokenizer(target_tokenizer, tokenizer)
        self.gain = 1.0 if gain is None else float(gain)
        self.norm_affine = None if layer_norm != "affine" else tuple(t.float().to(self.A.device) for t in norm_affine)

    def to(self, device) -> Calibration:
        self.model.to(device)
        self.A = self.A.to(device)
        if self.norm_affine is not None:
            self.norm_affine = tuple(t.to(device) for t in self.norm_affine)
        return self

    def transform(self, alpha: float, always: bool = False) -> FusionTransform | None:
        """The hidden transform for the decode loop; None at alpha = 0 (the target alone, exactly)."""
        return FusionTransform(self, check_alpha(alpha)) if alpha > 0 or always else None

    def consumed_texts(self, sequences: list[list[int]]) -> list[str]:
        """The text each row's target tokens spell, without special tokens or a dangling partial character."""
        texts = self.target_tokenizer.batch_decode(sequences, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        return [t.rstrip("\ufffd") for t in texts]

    def state_of_texts(self, texts: list[str]) -> torch.Tensor:
        """The calibration model run from scratch on each text: its last hidden state (after its final norm)."""
        encoded = self.tokenizer(texts, add_special_tokens=True, padding=True, padding_side="left", return_tensors="pt")
        mask = encoded["attention_mask"].to(self.A.device)
        h_c, _ = final_hidden(
            self.model, input_ids=encoded["input_ids"].to(self.A.device), attention_mask=mask, position_ids=positions_from_mask(mask), use_cache=False
        )
        return h_c[:, -1]

    def last_token_state(self, tokens: torch.Tensor) -> torch.Tensor:
        """The reference's calibration state: only the newest token (re-spelled if tokenizers differ), position 0, no cache."""
        if self.shared_tokenizer:
            ids, mask = tokens[:, None], torch.ones_like(tokens[:, None])
        else:
            pieces = self.target_tokenizer.batch_decode(tokens[:, None].tolist(), skip_special_tokens=True)
            encoded = self.tokenizer(pieces, add_special_tokens=False, padding=True, padding_side="left", return_tensors="pt")
            ids, mask = encoded["input_ids"].to(tokens.device), encoded["attention_mask"].to(tokens.device)
            mask[mask.sum(-1) == 0, -1] = 1  # a token that spells nothing: feed the pad token, unmasked
        h_c, _ = final_hidden(self.model, input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask), use_cache=False)
        return h_c[:, -1]


class FusionTransform:
    """Fusion as a hidden transform of the decode loop: h_T -> alpha LN(h_c A) + (1 - alpha) h_T."""

    def __init__(self, calibration: Calibration, alpha: float):
        self.calibration, self.alpha = calibration, alpha
        self.cache = self.stream = None

    def start(self, state: DecodeState) -> None:
        c = self.calibration
        self.cache = self.stream = None
        if not c.shared_tokenizer and c.config.calibration_context == "full" and state.use_cache:
            self.stream = CalibrationStream(c.model, c.tokenizer, len(state.prompt_ids), state.input_ids.device)

    def calibration_state(self, state: DecodeState) -> torch.Tensor:
        """h_c at every row's newest position, by the configured context rule."""
        c = self.calibration
        if c.config.calibration_context == "last_token" and state.step > 0:
            return c.last_token_state(state.step_ids[:, -1])
        if c.shared_tokenizer:  # one to one: the same ids, mask and positions as the target
            h_c, self.cache = forward_step(c.model, state, self.cache)
            return h_c
        texts = c.consumed_texts(state.sequences())
        return self.stream.advance(texts) if self.stream is not None else c.state_of_texts(texts)

    def __call__(self, h_target: torch.Tensor, state: DecodeState) -> torch.Tensor:
        h_c = self.calibration_state(state)
        if state.record is not None:
            state.record["h_calibration"] = h_c.float().cpu()
        c = self.calibration
        return fuse(h_target, h_c, c.A, self.alpha, c.config, c.gain, c.norm_affine)
