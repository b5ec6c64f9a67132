"""The fusion head's LightningModule (A, and with the variants a gain or LayerNorm weights, trained on
the fused model's loss with target and calibration model frozen), the hidden-state fit and its
export. The entry point, with its usage, is calibfuse.fusion_head; the variant is docs/method.md,
"Fusion variants"."""

from __future__ import annotations

import logging
import math

import lightning as L
import torch

from calibfuse.fusion.config import FusionConfig, check_alpha
from calibfuse.fusion.fuse import fuse
from calibfuse.models.lm import final_hidden, lm_head_logits
from calibfuse.models.positions import matched_positions, with_offsets

log = logging.getLogger(__name__)


TOXIC_LOSSES = ("unlikelihood", "margin")  # how the head is pushed away from toxic completions


HEAD_TENSORS = ("A", "gain", "norm_weight", "norm_bias")  # what a head writes into alignment.safetensors


INITS = ("stage2", "hidden_states")  # where A starts: stage 2's embedding alignment, or fitted on paired hidden states


class FusionHeadModule(L.LightningModule):
    """A (and, with scale="learned", a log-gain; with layer_norm="affine", the LayerNorm's weight and bias) as
    the only parameters; the frozen models are held
    outside the module (not in checkpoints). With toxic text, the loss adds a push away from its completions."""

    def __init__(
        self,
        A: torch.Tensor,
        alpha: float,
        fusion: FusionConfig,
        max_length: int,
        optimizer,
        gain: float = 1.0,
        toxic_weight: float = 0.0,
        toxic_loss: str = "unlikelihood",
        margin: float = 2.0,
        norm_affine: tuple[torch.Tensor, torch.Tensor] | None = None,
    ):
        super().__init__()
        self.A = torch.nn.Parameter(A.detach().clone().float())
        self.log_gain = torch.nn.Parameter(torch.tensor(math.log(gain))) if fusion.scale == "learned" else None
        if fusion.layer_norm == "affine":  # from a head's earlier weights, else the parameter-free LN's (1, 0)
            weight, bias = norm_affine if norm_affine is not None else (torch.ones(A.shape[1]), torch.zeros(A.shape[1]))
            self.norm_weight, self.norm_bias = (torch.nn.Parameter(t.detach().clone().float()) for t in (weight, bias))
        else:
            self.norm_weight = self.norm_bias = None
        self.alpha, self.fusion, self.max_length = check_alpha(alpha), fusion, max_length
        self.optimizer_factory, self.toxic_weight = optimizer, toxic_weight
        self.toxic_loss, self.margin = toxic_loss, margin
        self.frozen: dict = {}
        self.val_before: float | None = None
        self.toxic_val: tuple[list[str], list[int]] | None = None  # held-out toxic rows for toxic_completion_nll

    @property
    def gain(self) -> torch.Tensor | float:  # a tensor that trains with scale=learned, else 1
        return self.log_gain.exp() if self.log_gain is not None else 1.0

    @property
    def norm_affine(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        return (self.norm_weight, self.norm_bias) if self.norm_weight is not None else None

    def trained(self) -> list[torch.nn.Parameter]:
        return [p for p in (self.A, self.log_gain, self.norm_weight, self.norm_bias) if p is not None]

    def objective_record(self, metrics: dict) -> dict:  # what alignment.json says of another objective (fusion_head_contrast)
        return {}

    def attach(self, target, target_tokenizer, calibration, calibration_tokenizer) -> None:
        for model in (target, calibration):
            model.eval().requires_grad_(False)
        self.frozen = {"target": target, "target_tokenizer": target_tokenizer, "calibration": calibration, "calibration_tokenizer": calibration_tokenizer}

    def on_fit_start(self) -> None:
        for key in ("target", "calibration"):
            self.frozen[key].to(self.device)

    def _encode(self, tokenizer, texts: list[str]):
        kwargs = dict(padding=True, padding_side="right", truncation=True, max_length=self.max_length, return_tensors="pt")
        return with_offsets(tokenizer, texts, **kwargs)

    def _states(self, texts: list[str]):
        f, device = self.frozen, self.device
        t, c = self._encode(f["target_tokenizer"], texts), self._encode(f["calibration_tokenizer"], texts)
        with torch.no_grad():
            h_t, _ = final_hidden(f["target"], input_ids=t["input_ids"].to(device), attention_mask=t["attention_mask"].to(device), use_cache=False)
            h_c, _ = final_hidden(f["calibration"], input_ids=c["input_ids"].to(device), attention_mask=c["attention_mask"].to(device), use_cache=False)
        index = matched_positions(c["offset_mapping"], c["attention_mask"], t["offset_mapping"]).to(device)
        h_c = torch.gather(h_c, 1, index[..., None].expand(-1, -1, h_c.shape[-1]))
        return h_t, h_c, t["input_ids"].to(device), t["attention_mask"].to(device)

    def _token_logprobs(self, texts: list[str], alpha: float | None, with_target: bool = False):
        """log p_fused(next token) at every position of the target's tokenization, the label mask, and
        (with_target) log p_target, without gradient."""
        h_t, h_c, ids, mask = self._states(texts)
        alpha = self.alpha if alpha is None else alpha
        fused = fuse(h_t, h_c, self.A, alpha, self.fusion, self.gain, self.norm_affine) if alpha > 0 else h_t

        def logprobs(hidden):
            logits = lm_head_logits(self.frozen["target"], hidden.float()).float()[:, :-1]
            return logits.log_softmax(-1).gather(-1, ids[:, 1:, None])[..., 0]

        if not with_target:
            return logprobs(fused), mask[:, 1:].bool()
        with torch.no_grad():
            target = logprobs(h_t)
        return logprobs(fused), mask[:, 1:].bool(), target

    def losses(self, texts: list[str], alpha: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed next-token loss of the fused model and the number of predicted tokens."""
        logp, keep = self._token_logprobs(texts, alpha)
        return -logp[keep].sum(), keep.sum()

    def toxic_losses(self, texts: list[str], starts: list[int], alpha: float | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """On the completion tokens of toxic rows (those reaching past character `start`): the summed push
        away from them, summed NLL, and their number. The push is unlikelihood, -log(1 - p), or with
        toxic_loss="margin", max(0, margin - (NLL_fused - NLL_target)): rare tokens still get a gradient."""
        logp, keep, target = self._token_logprobs(texts, alpha, with_target=True)
        ends = self._encode(self.frozen["target_tokenizer"], texts)["offset_mapping"][:, 1:, 1].to(logp.device)
        keep = keep & (ends > torch.tensor(starts, device=logp.device)[:, None])
        if self.toxic_loss == "margin":
            push = torch.relu(self.margin - (target - logp))
        else:
            push = -torch.log1p(-logp.exp().clamp(max=1 - 1e-6))
        return push[keep].sum(), -logp[keep].sum(), keep.sum()

    def training_step(self, batch, batch_idx: int):
        clean, toxic = (batch["clean"], batch["toxic"]) if isinstance(batch, dict) else (batch, None)
        total, count = self.losses(clean)
        loss = total / count.clamp(min=1)
        self.log("train/fused_loss", loss, prog_bar=True, batch_size=len(clean))
        if toxic is not None:
            unlikely, _, n = self.toxic_losses(*toxic)
            unlikely = unlikely / n.clamp(min=1)
            self.log(f"train/toxic_{self.toxic_loss}", unlikely, prog_bar=True, batch_size=len(toxic[0]))
            loss = loss + self.toxic_weight * unlikely
        return loss

    def validation_step(self, texts: list[str], batch_idx: int):
        total, count = self.losses(texts)
        self.log("val/fused_loss", total / count.clamp(min=1), batch_size=int(count), reduce_fx="mean")

    def configure_optimizers(self):
        return self.optimizer_factory(params=self.trained())


def fit_on_hidden_states(module: FusionHeadModule, texts: list[str], batch_size: int, ridge: float) -> torch.Tensor:
    """The alignment-space variant: A minimising ||h_c A - h_T||^2 + ridge * mean(diag) * ||A||^2 over every
    target position of paired text (the same text through both models, positions matched by characters),
    in closed form. Final hidden states, not embeddings, are what fusion mixes."""
    d_c, d_t = module.A.shape
    xtx, xty = torch.zeros(d_c, d_c, dtype=torch.float64), torch.zeros(d_c, d_t, dtype=torch.float64)
    with torch.no_grad():
        for start in range(0, len(texts), batch_size):
            h_t, h_c, _, mask = module._states(texts[start : start + batch_size])
            keep = mask.bool()
            x, y = h_c[keep].double().cpu(), h_t[keep].double().cpu()
            xtx += x.T @ x
            xty += x.T @ y
    penalty = ridge * xtx.diagonal().mean() * torch.eye(d_c, dtype=torch.float64)
    return torch.linalg.solve(xtx + penalty, xty).float()


def _per_token(step, columns: tuple[list, ...], batch_size: int) -> float:
    """Sum over batches of `step(*batch columns) -> (summed loss, tokens)`, per token, without gradient."""
    total = count = 0.0
    with torch.no_grad():
        for i in range(0, len(columns[0]), batch_size):
            loss, n = step(*(column[i : i + batch_size] for column in columns))
            total, count = total + loss.item(), count + n.item()
    return total / max(count, 1)


def held_out_loss(module: FusionHeadModule, texts: list[str], batch_size: int, alpha: float | None = None) -> float:
    return _per_token(lambda batch: module.losses(batch, alpha), (texts,), batch_size)


def toxic_nll(module: FusionHeadModule, texts: list[str], starts: list[int], batch_size: int, alpha: float | None = None) -> float:
    return _per_token(lambda t, s: module.toxic_losses(t, s, alpha)[1:], (texts, starts), batch_size)
