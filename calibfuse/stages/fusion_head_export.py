"""A trained fusion head's export: an alignment/ dir like stage 2's, with the trained A (and gain, LayerNorm
weights) and what it was trained for. Apart from the module (calibfuse.stages.fusion_head), so the objectives
built on that module sit below the model records the export writes."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from calibfuse.fusion.artifacts import model_record
from calibfuse.stages.export import ExportArtifact
from calibfuse.stages.fusion_head import HEAD_TENSORS, FusionHeadModule, toxic_nll

log = logging.getLogger(__name__)


class ExportFusionHead(ExportArtifact):
    """An alignment/ dir like stage 2's, with the trained A and what it was trained for."""

    manifest_name = "alignment.json"

    def __init__(self, out_dir: Path, config: dict, stage2_dir: Path, stage2_meta: dict, models: dict):
        super().__init__(out_dir, config)
        self.stage2_dir, self.stage2_meta, self.models = stage2_dir, stage2_meta, models

    def gather(self, trainer, pl_module: FusionHeadModule):
        trained = {"A": pl_module.A} | ({"gain": pl_module.gain} if pl_module.log_gain is not None else {})
        if pl_module.norm_affine is not None:
            trained |= dict(zip(("norm_weight", "norm_bias"), pl_module.norm_affine, strict=True))
        trained = {k: torch.as_tensor(v).detach().cpu().float().contiguous() for k, v in trained.items()}
        if not all(torch.isfinite(t).all() for t in trained.values()):
            raise RuntimeError(f"the trained {', '.join(trained)} have non-finite entries; refusing to write {self.out_dir} (lower optimizer.lr)")
        return trained

    def write(self, trainer, pl_module: FusionHeadModule, trained: dict[str, torch.Tensor]) -> dict:
        # stage 2's tensors, less what an earlier head trained that this one does not: its A, gain and LN weights
        tensors = {k: v for k, v in load_file(self.stage2_dir / "alignment.safetensors").items() if k not in HEAD_TENSORS} | trained
        gain = float(trained["gain"]) if "gain" in trained else None
        save_file(tensors, self.out_dir / "alignment.safetensors", metadata={"format": "calibfuse.alignment/1"})
        after = trainer.callback_metrics["val/fused_loss"].item()
        head = {
            "alpha": pl_module.alpha,
            "layer_norm": pl_module.fusion.layer_norm,
            "scale": pl_module.fusion.scale,
            "gain": gain,
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
        if pl_module.toxic_val is not None:  # what the unlikelihood did: NLL of held-out toxic completions
            nll = dict(self.models["toxic_nll"], fused_after=toxic_nll(pl_module, *pl_module.toxic_val, batch_size=8))
            head |= {
                "toxic_loss": pl_module.toxic_loss,
                "margin": pl_module.margin,
                "toxic_weight": pl_module.toxic_weight,
                "toxic_rows": self.models["toxic_rows"],
                "toxic_completion_nll": nll,
            }
            log.info("held-out toxic completions, NLL per token: target %.2f, fused %.2f -> %.2f", nll["target"], nll["fused_before"], nll["fused_after"])
        head |= pl_module.objective_record(trainer.callback_metrics)
        records = {role: model_record(*self.models[role], self.out_dir) for role in ("calibration_model", "target")}
        return {
            **{k: v for k, v in self.stage2_meta.items() if k not in ("config", "training", "versions", "created")},
            **records,
            "stage": "fusion_head",
            "fusion_head": head,
        }
