"""LM-Steer (Han et al., ACL 2024) as a LightningModule and its export (the entry point, with its usage,
is calibfuse.steer; the method in the grid is calibfuse.methods.lm_steer; docs/lm_steer.md).

A steer is a linear map of the output embeddings, applied at the target's final hidden state (after its
final norm, before its LM head): h' = h + eps * sum_i s_i * (h P1_i) P2_i^T, with P1_i, P2_i of shape
(d, rank). Two steers train, through the frozen target, on its ordinary next-token loss: steer 0, the
detox steer, at s = +1 on non-toxic text and s = -1 on toxic text; steer 1, the dummy steer, at s = 1 on
both, so that what both classes share (their domain) goes there and not into the detox steer.
"""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import torch
from safetensors.torch import save_file

from calibfuse.fusion.artifacts import model_record
from calibfuse.models.lm import final_hidden, lm_head_logits
from calibfuse.stages.export import ExportArtifact

log = logging.getLogger(__name__)

CLASSES = ("clean", "toxic")
STEER_VALUES = {"clean": 1.0, "toxic": -1.0}  # the detox steer's value per class in training (LM-Steer's labels)

DETOX, DUMMY = 0, 1  # the steers' rows in projector1 / projector2
FORMAT = "calibfuse.steer/1"


class SteerModule(L.LightningModule):
    """projector1 and projector2, (2, d, rank) each (the detox steer, then the dummy steer), are the only
    parameters; the frozen target is held outside the module, so checkpoints hold the steers alone."""

    def __init__(self, hidden_size: int, rank: int, epsilon: float, init_var: float, optimizer=None, cache_states: bool = False):
        super().__init__()
        # LM-Steer's init: both factors N(0, 1) * init_var, so W starts near 0 and the target alone.
        self.projector1 = torch.nn.Parameter(torch.randn(2, hidden_size, rank) * init_var)
        self.projector2 = torch.nn.Parameter(torch.randn(2, hidden_size, rank) * init_var)
        self.epsilon, self.optimizer_factory = epsilon, optimizer
        self.frozen: dict = {}
        # The target is frozen, so a row's final hidden states never change: kept after its first pass, a row
        # read again (the next epoch, every held-out pass) costs the LM head only, not the target's layers.
        self.states: dict[tuple, torch.Tensor] | None = {} if cache_states else None
        self.val_sums: dict[str, list[float]] = {}

    def attach(self, target, tokenizer) -> None:
        target.eval().requires_grad_(False)
        self.frozen = {"target": target, "tokenizer": tokenizer}

    def on_fit_start(self) -> None:
        self.frozen["target"].to(self.device)

    def W(self, steer: int) -> torch.Tensor:
        """One steer as the map h -> h W that inference applies (eps * P1 P2^T, d x d)."""
        return self.epsilon * self.projector1[steer] @ self.projector2[steer].T

    def steered(self, h: torch.Tensor, detox: float, dummy: float = 1.0) -> torch.Tensor:
        """h + eps * (detox * (h P1_0) P2_0^T + dummy * (h P1_1) P2_1^T); training runs the dummy at 1."""
        delta = sum(s * (h @ self.projector1[i]) @ self.projector2[i].T for i, s in ((DETOX, detox), (DUMMY, dummy)) if s != 0)
        return h + self.epsilon * delta

    def _padded(self, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        pad = self.frozen["tokenizer"].pad_token_id
        pad = pad if pad is not None else self.frozen["tokenizer"].eos_token_id
        width = max(len(r) for r in rows)
        ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows], device=self.device)
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=self.device)
        return ids, mask

    @torch.no_grad()  # the target is frozen: no graph through its layers
    def hidden(self, rows: list[list[int]]) -> torch.Tensor:
        """The target's final hidden states (fp32) of right-padded rows; a causal LM's states of a row do not
        depend on the padding after it, so a row's states are its own, cached or not."""
        if self.states is None:
            ids, mask = self._padded(rows)
            return final_hidden(self.frozen["target"], input_ids=ids, attention_mask=mask, use_cache=False)[0].float()
        missing = [list(r) for r in dict.fromkeys(map(tuple, rows)) if r not in self.states]
        if missing:
            ids, mask = self._padded(missing)
            h = final_hidden(self.frozen["target"], input_ids=ids, attention_mask=mask, use_cache=False)[0].float()
            self.states.update({tuple(r): h[i, : len(r)].clone() for i, r in enumerate(missing)})
        width = max(len(r) for r in rows)
        return torch.stack([torch.nn.functional.pad(self.states[tuple(r)], (0, 0, 0, width - len(r))) for r in rows]).to(self.device)

    def nll(self, rows: list[list[int]], detox: float, dummy: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed next-token NLL of every token of the rows (right-padded) with the detox steer at `detox`
        and the dummy at `dummy`, and the number of predicted tokens."""
        ids, mask = self._padded(rows)
        logits = lm_head_logits(self.frozen["target"], self.steered(self.hidden(rows), detox, dummy)).float()[:, :-1]
        logp = logits.log_softmax(-1).gather(-1, ids[:, 1:, None])[..., 0]
        keep = mask[:, 1:].bool()
        return -logp[keep].sum(), keep.sum()

    def loss(self, batch: dict[str, list[list[int]]]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The mean of the two classes' per-token NLL (each class weighs the same, whatever its rows' lengths)."""
        per_class = {}
        for name in CLASSES:
            total, count = self.nll(batch[name], STEER_VALUES[name])
            per_class[name] = total / count.clamp(min=1)
        return (per_class["clean"] + per_class["toxic"]) / 2, per_class

    def training_step(self, batch, batch_idx: int):
        loss, per_class = self.loss(batch)
        size = len(batch["clean"])
        self.log("train/loss", loss, prog_bar=True, batch_size=size)
        for name, value in per_class.items():
            self.log(f"train/{name}_nll", value, batch_size=size)
        return loss

    def on_validation_epoch_start(self) -> None:
        self.val_sums = {name: [0.0, 0.0] for name in CLASSES}

    def validation_step(self, rows, batch_idx: int, dataloader_idx: int = 0):
        name = CLASSES[dataloader_idx]
        total, count = self.nll(rows, STEER_VALUES[name])
        self.val_sums[name][0] += total.item()
        self.val_sums[name][1] += count.item()

    def on_validation_epoch_end(self) -> None:
        per_class = {name: total / max(count, 1) for name, (total, count) in self.val_sums.items()}
        for name, value in per_class.items():
            self.log(f"val/{name}_nll", value, sync_dist=True)
        self.log("val/loss", sum(per_class.values()) / 2, prog_bar=True, sync_dist=True)

    def configure_optimizers(self):
        return self.optimizer_factory(params=[self.projector1, self.projector2])


@torch.no_grad()
def held_out_nll(module: SteerModule, rows: list[list[int]], detox: float, batch_size: int, dummy: bool = True) -> float:
    """Per-token NLL of held-out rows with the detox steer at `detox` (and the dummy at 1, or off: how
    inference runs it). detox=0 without the dummy is the target alone."""
    total = count = 0.0
    for start in range(0, len(rows), batch_size):
        loss, n = module.nll(rows[start : start + batch_size], detox, 1.0 if dummy else 0.0)
        total, count = total + loss.item(), count + n.item()
    return total / max(count, 1)


def held_out(module: SteerModule, val: dict[str, list], batch_size: int, detox: float | None = None, dummy: bool = True) -> dict[str, float]:
    """{class: per-token NLL} of the held-out rows; detox=None: each class at its training value."""
    return {c: round(held_out_nll(module, val[c], STEER_VALUES[c] if detox is None else detox, batch_size, dummy), 4) for c in CLASSES}


def inference_losses(module: SteerModule, val: dict[str, list], batch_size: int) -> dict[str, dict[str, float]]:
    """Held-out NLL as inference runs the steer (the dummy off): at strength 0, the target alone, and at 1."""
    return {"target_alone": held_out(module, val, batch_size, 0.0, dummy=False), "steer_at_1": held_out(module, val, batch_size, 1.0, dummy=False)}


class ExportSteer(ExportArtifact):
    """A steer/ dir: steer.safetensors (W and W_dummy, each eps * P1 P2^T, d x d) and steer.json (the target
    it was made for with its fingerprint, the data, eps, rank, steps, the held-out losses before and after)."""

    manifest_name = "steer.json"

    def __init__(self, out_dir: Path, config: dict, target: tuple, record: dict, val: dict[str, list], batch_size: int):
        super().__init__(out_dir, config)
        self.target, self.record, self.val, self.batch_size = target, record, val, batch_size

    def gather(self, trainer, pl_module: SteerModule):
        with torch.no_grad():
            tensors = {"W": pl_module.W(DETOX), "W_dummy": pl_module.W(DUMMY)}
        tensors = {k: v.detach().cpu().float().contiguous() for k, v in tensors.items()}
        if not all(torch.isfinite(t).all() for t in tensors.values()):
            raise RuntimeError(f"the trained steer has non-finite entries; refusing to write {self.out_dir} (lower optimizer.lr or epsilon)")
        return tensors

    def write(self, trainer, pl_module: SteerModule, tensors: dict[str, torch.Tensor]) -> dict:
        save_file(tensors, self.out_dir / "steer.safetensors", metadata={"format": FORMAT})
        after = held_out(pl_module, self.val, self.batch_size)  # read here, not from the last validation loop: training may end between two
        losses = dict(self.record.pop("losses"))
        losses["val_after"] = after | {"loss": round(sum(after.values()) / 2, 4)}
        losses["train_last"] = round(trainer.callback_metrics["train/loss"].item(), 4) if "train/loss" in trainer.callback_metrics else None
        losses["inference_after"] = inference_losses(pl_module, self.val, self.batch_size)
        log.info(
            "steer: %s (held-out loss %.3f -> %.3f; at strength 1, clean NLL %.3f -> %.3f, toxic %.3f -> %.3f)",
            self.out_dir,
            losses["val_before"]["loss"],
            losses["val_after"]["loss"],
            *(losses["inference_after"][k][c] for c in CLASSES for k in ("target_alone", "steer_at_1")),
        )
        return {
            "stage": "steer",
            "format": FORMAT,
            "target": model_record(*self.target, self.out_dir),
            "epsilon": pl_module.epsilon,
            "rank": pl_module.projector1.shape[-1],
            "hidden_size": pl_module.projector1.shape[1],
            "steer_values": {"training": STEER_VALUES | {"dummy": 1.0}, "inference": "alpha * W (the dummy off unless methods.lm_steer.dummy=true)"},
            **self.record,
            "losses": losses,
            "steps": trainer.global_step,
        }
