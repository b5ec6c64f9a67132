"""A trained fusion head, a fusion variant (docs/method.md, "Fusion variants"): the alignment A trained
so that the fused model predicts non-toxic text well at a fixed alpha, target and calibration model frozen.

    python -m calibfuse.fusion_head alignment_dir=<align run>/alignment alpha=0.3
    python -m calibfuse.fusion_head alignment_dir=<align run>/alignment objective=contrast fusion.scale=learned
    python -m calibfuse.pipeline fusion_head=true             # after stage 2, for every target

Only A trains (with scale=learned, also a scalar gain on LN(h_c A); with layer_norm=affine, the
LayerNorm's weight and bias), starting from stage 2's A: the loss
is the fused model's next-token loss on stage 1's non-toxic corpus, read through the target's tokenizer.
With `toxic_data` (an extension, not in the paper), it adds a push away from the completion tokens of
toxic text (unlikelihood, or a margin over the target's NLL), so the head also learns what to avoid;
`objective=contrast` trains by LM-Steer's lesson instead (calibfuse.stages.fusion_head_contrast: the
sign-flipped fusion fitted to toxic text, a shared alignment dropped at export, a KL to the target).
Across tokenizers, the calibration state at a target position is the calibration model's state at its
last token that ends within the characters the target has read (character offsets), as the calibration
stream reads it at inference. The result is an
alignment artifact like stage 2's (`alignment/`), so `methods.fusion` uses it unchanged.
"""

from __future__ import annotations

import logging
import math
from functools import partial
from pathlib import Path

import hydra
import lightning as L
from omegaconf import DictConfig

from calibfuse.data.datamodule import read_prompt_completions
from calibfuse.fusion.artifacts import alignment_gain, alignment_norm_affine, load_alignment, recorded_model
from calibfuse.fusion.config import check_alpha
from calibfuse.models.loading import ModelSpec, load_model, load_tokenizer
from calibfuse.stages.export import fit_and_export
from calibfuse.stages.fusion_head import INITS, TOXIC_LOSSES, FusionHeadModule, fit_on_hidden_states, held_out_loss, toxic_nll
from calibfuse.stages.fusion_head_contrast import ContrastHeadModule, check_objective
from calibfuse.stages.fusion_head_data import TextData, toxic_rows, unzip
from calibfuse.stages.fusion_head_export import ExportFusionHead
from calibfuse.utils.checks import check_required, check_wandb_credentials
from calibfuse.utils.run import instantiate, resolved_config, task_wrapper

log = logging.getLogger(__name__)


@task_wrapper
def train_fusion_head(cfg: DictConfig) -> dict:
    check_required(cfg)
    check_alpha(cfg.alpha)
    check_wandb_credentials(cfg.get("logger"))
    L.seed_everything(cfg.seed, workers=True)
    if cfg.init not in INITS:
        raise ValueError(f"init={cfg.init!r}; expected one of {list(INITS)}")
    fusion = instantiate(cfg.fusion)  # FusionConfig: a bad option is named here, before any model loads
    if not cfg.toxic_weight >= 0:
        raise ValueError(f"toxic_weight={cfg.toxic_weight}; expected a number >= 0")
    if cfg.toxic_loss not in TOXIC_LOSSES:
        raise ValueError(f"toxic_loss={cfg.toxic_loss!r}; expected one of {list(TOXIC_LOSSES)}")
    objective = check_objective(cfg)  # None: the fused LM loss; else the contrast's options
    stage2 = Path(cfg.alignment_dir).expanduser()
    A, meta = load_alignment(stage2)
    stage2 = stage2.parent if stage2.is_file() else stage2
    specs = {
        role: ModelSpec(recorded_model(meta[role], stage2), gguf_file=meta[role].get("gguf_file"), dtype="float32") for role in ("calibration_model", "target")
    }
    pairs = read_prompt_completions(**instantiate(cfg.data, tokenizer=None).source)
    texts = [f"{p.prompt}\n{p.completion}" for p in pairs]
    toxic = toxic_rows(read_prompt_completions(**instantiate(cfg.toxic_data, tokenizer=None).source)) if cfg.get("toxic_data") else None
    datamodule = TextData(texts[: cfg.max_rows] if cfg.get("max_rows") else texts, cfg.val_rows, cfg.batch_size, cfg.seed, toxic)

    loaded = {role: (spec, load_model(spec)) for role, spec in specs.items()}
    tokenizers = {role: load_tokenizer(spec) for role, spec in specs.items()}
    gain = alignment_gain(stage2, default=1.0) if fusion.scale == "learned" else 1.0  # a head's gain carries on
    norm_affine = alignment_norm_affine(stage2, required=False) if fusion.layer_norm == "affine" else None  # as do its LN weights
    toxic_options = dict(toxic_weight=cfg.toxic_weight, toxic_loss=cfg.toxic_loss, margin=cfg.margin)
    head = FusionHeadModule if objective is None else partial(ContrastHeadModule, **objective)
    module = head(A, cfg.alpha, fusion, cfg.max_length, instantiate(cfg.optimizer), gain, norm_affine=norm_affine, **toxic_options)
    module.attach(loaded["target"][1], tokenizers["target"], loaded["calibration_model"][1], tokenizers["calibration_model"])
    if cfg.init == "hidden_states":
        rows = datamodule.train[: cfg.init_rows]
        module.A.data.copy_(fit_on_hidden_states(module, rows, cfg.batch_size, cfg.ridge))
        log.info("A fitted on the hidden states of %d paired texts (ridge %g)", len(rows), cfg.ridge)
    module.val_before = held_out_loss(module, datamodule.val, cfg.batch_size)
    models = {role: (spec, model, tokenizers[role]) for role, (spec, model) in loaded.items()}
    models["target_val_perplexity"] = math.exp(held_out_loss(module, datamodule.val, cfg.batch_size, alpha=0.0))
    if toxic:
        module.toxic_val = unzip(datamodule.toxic_val)
        models["toxic_rows"] = len(toxic)
        before = {"target": 0.0, "fused_before": None}  # alpha None: the head's own
        models["toxic_nll"] = {when: toxic_nll(module, *module.toxic_val, batch_size=cfg.batch_size, alpha=a) for when, a in before.items()}
    export = ExportFusionHead(Path(cfg.paths.output_dir) / "alignment", resolved_config(cfg), stage2, meta, models)
    return fit_and_export(cfg, module, datamodule, export)


@hydra.main(version_base="1.3", config_path="../conf", config_name="fusion_head")
def main(cfg: DictConfig) -> float | None:
    return train_fusion_head(cfg).get(cfg.get("optimized_metric"))


if __name__ == "__main__":
    main()
