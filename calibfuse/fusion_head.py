"""A trained fusion head, a fusion variant (docs/method.md, "Fusion variants"): the alignment A trained
so that the fused model predicts non-toxic text well at a fixed alpha, target and calibration model frozen.

    python -m calibfuse.fusion_head alignment_dir=<align run>/alignment alpha=0.3
    python -m calibfuse.pipeline fusion_head=true             # after stage 2, for every target

Only A trains, starting from stage 2's A: the loss is the fused model's next-token loss on stage 1's
non-toxic corpus, read through the target's tokenizer. Across tokenizers, the calibration state at a
target position is the calibration model's state at its last token that ends within the characters the
target has read (character offsets), as the calibration stream reads it at inference. The result is an
alignment artifact like stage 2's (`alignment/`), so `methods.fusion` uses it unchanged.
"""

from __future__ import annotations

import logging
import math
import random
from pathlib import Path

import hydra
import lightning as L
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader

from calibfuse.artifacts import load_alignment, model_record, recorded_model
from calibfuse.checks import check_required, check_wandb_credentials
from calibfuse.data import read_prompt_completions
from calibfuse.export import ExportArtifact, fit_and_export
from calibfuse.fusion import LAYER_NORMS, SCALES, check_alpha, fuse
from calibfuse.lm import final_hidden, lm_head_logits
from calibfuse.models import ModelSpec, load_model, load_tokenizer
from calibfuse.utils import instantiate, resolved_config, task_wrapper

log = logging.getLogger(__name__)

INITS = ("stage2", "hidden_states")  # where A starts: stage 2's embedding alignment, or fitted on paired hidden states


def char_matched_positions(source_offsets: torch.Tensor, source_mask: torch.Tensor, target_offsets: torch.Tensor) -> torch.Tensor:
    """For every target token, the index of the last source token that ends within the characters read
    through it (both right-padded; special tokens end at 0, so a leading BOS is always matched)."""
    source_end = source_offsets[..., 1].masked_fill(source_mask == 0, torch.iinfo(torch.long).max)
    read = (source_end[:, None, :] <= target_offsets[..., 1][:, :, None]).sum(-1)
    return (read - 1).clamp(min=0)


class FusionHeadModule(L.LightningModule):
    """A as the only parameter; the frozen models are held outside the module (not in checkpoints)."""

    def __init__(self, A: torch.Tensor, alpha: float, layer_norm: str, scale: str, max_length: int, optimizer):
        super().__init__()
        self.A = torch.nn.Parameter(A.detach().clone().float())
        self.alpha, self.layer_norm, self.scale, self.max_length = check_alpha(alpha), layer_norm, scale, max_length
        self.optimizer_factory = optimizer
        self.frozen: dict = {}
        self.val_before: float | None = None

    def attach(self, target, target_tokenizer, calibration, calibration_tokenizer) -> None:
        for model in (target, calibration):
            model.eval().requires_grad_(False)
        self.frozen = {"target": target, "target_tokenizer": target_tokenizer, "calibration": calibration, "calibration_tokenizer": calibration_tokenizer}

    def on_fit_start(self) -> None:
        for key in ("target", "calibration"):
            self.frozen[key].to(self.device)

    def _states(self, texts: list[str]):
        f, device = self.frozen, self.device
        kwargs = dict(return_offsets_mapping=True, padding=True, padding_side="right", truncation=True, max_length=self.max_length, return_tensors="pt")
        t, c = f["target_tokenizer"](texts, **kwargs), f["calibration_tokenizer"](texts, **kwargs)
        with torch.no_grad():
            h_t, _ = final_hidden(f["target"], input_ids=t["input_ids"].to(device), attention_mask=t["attention_mask"].to(device), use_cache=False)
            h_c, _ = final_hidden(f["calibration"], input_ids=c["input_ids"].to(device), attention_mask=c["attention_mask"].to(device), use_cache=False)
        index = char_matched_positions(c["offset_mapping"], c["attention_mask"], t["offset_mapping"]).to(device)
        h_c = torch.gather(h_c, 1, index[..., None].expand(-1, -1, h_c.shape[-1]))
        return h_t, h_c, t["input_ids"].to(device), t["attention_mask"].to(device)

    def losses(self, texts: list[str], alpha: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed next-token loss of the fused model and the number of predicted tokens."""
        h_t, h_c, ids, mask = self._states(texts)
        alpha = self.alpha if alpha is None else alpha
        fused = fuse(h_t, h_c, self.A, alpha, layer_norm=self.layer_norm, scale=self.scale) if alpha > 0 else h_t
        logits = lm_head_logits(self.frozen["target"], fused.float()).float()
        labels = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="sum")
        return loss, (labels != -100).sum()

    def training_step(self, texts: list[str], batch_idx: int):
        total, count = self.losses(texts)
        loss = total / count.clamp(min=1)
        self.log("train/fused_loss", loss, prog_bar=True, batch_size=len(texts))
        return loss

    def validation_step(self, texts: list[str], batch_idx: int):
        total, count = self.losses(texts)
        self.log("val/fused_loss", total / count.clamp(min=1), batch_size=int(count), reduce_fx="mean")

    def configure_optimizers(self):
        return self.optimizer_factory(params=[self.A])


class TextData(L.LightningDataModule):
    """Stage 1's corpus as plain text (prompt, newline, completion): a seeded held-out slice and the rest."""

    def __init__(self, texts: list[str], val_rows: int, batch_size: int, seed: int):
        super().__init__()
        if len(texts) <= val_rows:
            raise ValueError(f"the corpus has {len(texts)} rows; expected more than val_rows={val_rows}")
        order = list(range(len(texts)))
        random.Random(seed).shuffle(order)
        self.val = [texts[i] for i in order[:val_rows]]
        self.train = [texts[i] for i in order[val_rows:]]
        self.batch_size = batch_size

    def train_dataloader(self):
        return DataLoader(self.train, batch_size=self.batch_size, shuffle=True, collate_fn=list)

    def val_dataloader(self):
        return DataLoader(self.val, batch_size=self.batch_size, collate_fn=list)


class ExportFusionHead(ExportArtifact):
    """An alignment/ dir like stage 2's, with the trained A and what it was trained for."""

    manifest_name = "alignment.json"

    def __init__(self, out_dir: Path, config: dict, stage2_dir: Path, stage2_meta: dict, models: dict):
        super().__init__(out_dir, config)
        self.stage2_dir, self.stage2_meta, self.models = stage2_dir, stage2_meta, models

    def gather(self, trainer, pl_module: FusionHeadModule):
        A = pl_module.A.detach().cpu()
        if not torch.isfinite(A).all():
            raise RuntimeError(f"the trained A has non-finite entries; refusing to write {self.out_dir} (lower optimizer.lr)")
        return A

    def write(self, trainer, pl_module: FusionHeadModule, A: torch.Tensor) -> dict:
        tensors = load_file(self.stage2_dir / "alignment.safetensors")
        save_file({**tensors, "A": A.contiguous()}, self.out_dir / "alignment.safetensors", metadata={"format": "calibfuse.alignment/1"})
        after = trainer.callback_metrics["val/fused_loss"].item()
        head = {
            "alpha": pl_module.alpha,
            "layer_norm": pl_module.layer_norm,
            "scale": pl_module.scale,
            "initial_alignment": str(self.stage2_dir.resolve()),
            "init": self.config.get("init", "stage2"),
            "val_fused_perplexity_before": math.exp(pl_module.val_before) if pl_module.val_before is not None else None,
            "val_fused_perplexity": math.exp(after),
            "val_target_perplexity": self.models.get("target_val_perplexity"),
        }
        log.info(
            "fusion head: %s (fused perplexity at alpha %g: %.2f -> %.2f; target alone %.2f)",
            self.out_dir,
            pl_module.alpha,
            head["val_fused_perplexity_before"] or math.nan,
            head["val_fused_perplexity"],
            head["val_target_perplexity"] or math.nan,
        )
        records = {role: model_record(*self.models[role], self.out_dir) for role in ("calibration_model", "target")}
        return {
            **{k: v for k, v in self.stage2_meta.items() if k not in ("config", "training", "versions", "created")},
            **records,
            "stage": "fusion_head",
            "fusion_head": head,
        }


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


def held_out_loss(module: FusionHeadModule, texts: list[str], batch_size: int, alpha: float | None = None) -> float:
    total = count = 0.0
    with torch.no_grad():
        for start in range(0, len(texts), batch_size):
            loss, n = module.losses(texts[start : start + batch_size], alpha)
            total, count = total + loss.item(), count + n.item()
    return total / max(count, 1)


@task_wrapper
def train_fusion_head(cfg: DictConfig) -> dict:
    check_required(cfg)
    check_alpha(cfg.alpha)
    check_wandb_credentials(cfg.get("logger"))
    L.seed_everything(cfg.seed, workers=True)
    if cfg.init not in INITS:
        raise ValueError(f"init={cfg.init!r}; expected one of {list(INITS)}")
    if cfg.layer_norm not in LAYER_NORMS or cfg.scale not in SCALES:
        raise ValueError(f"layer_norm={cfg.layer_norm!r}, scale={cfg.scale!r}; expected one of {list(LAYER_NORMS)} and {list(SCALES)}")
    stage2 = Path(cfg.alignment_dir).expanduser()
    A, meta = load_alignment(stage2)
    stage2 = stage2.parent if stage2.is_file() else stage2
    specs = {
        role: ModelSpec(recorded_model(meta[role], stage2), gguf_file=meta[role].get("gguf_file"), dtype="float32") for role in ("calibration_model", "target")
    }
    pairs = read_prompt_completions(**instantiate(cfg.data, tokenizer=None).source)
    texts = [f"{p.prompt}\n{p.completion}" for p in pairs]
    datamodule = TextData(texts[: cfg.max_rows] if cfg.get("max_rows") else texts, cfg.val_rows, cfg.batch_size, cfg.seed)

    loaded = {role: (spec, load_model(spec)) for role, spec in specs.items()}
    tokenizers = {role: load_tokenizer(spec) for role, spec in specs.items()}
    module = FusionHeadModule(A, cfg.alpha, cfg.layer_norm, cfg.scale, cfg.max_length, instantiate(cfg.optimizer))
    module.attach(loaded["target"][1], tokenizers["target"], loaded["calibration_model"][1], tokenizers["calibration_model"])
    if cfg.init == "hidden_states":
        rows = datamodule.train[: cfg.init_rows]
        module.A.data.copy_(fit_on_hidden_states(module, rows, cfg.batch_size, cfg.ridge))
        log.info("A fitted on the hidden states of %d paired texts (ridge %g)", len(rows), cfg.ridge)
    module.val_before = held_out_loss(module, datamodule.val, cfg.batch_size)
    models = {role: (spec, model, tokenizers[role]) for role, (spec, model) in loaded.items()}
    models["target_val_perplexity"] = math.exp(held_out_loss(module, datamodule.val, cfg.batch_size, alpha=0.0))
    export = ExportFusionHead(Path(cfg.paths.output_dir) / "alignment", resolved_config(cfg), stage2, meta, models)
    return fit_and_export(cfg, module, datamodule, export)


@hydra.main(version_base="1.3", config_path="../conf", config_name="fusion_head")
def main(cfg: DictConfig) -> float | None:
    return train_fusion_head(cfg).get(cfg.get("optimized_metric"))


if __name__ == "__main__":
    main()
