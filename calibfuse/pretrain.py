"""Stage 1: pretrain the calibration model on non-toxic data (docs/method.md, stage 1).

    python -m calibfuse.pretrain                                   # embedded default, CPU, ~3 min
    python -m calibfuse.pretrain trainer.max_epochs=1 logger=csv   # any key can be overridden
    python -m calibfuse.pretrain hydra.run.dir=DIR ckpt_path=last  # resume the run in DIR
    python -m calibfuse.pretrain experiment=paper_pretrain         # the paper's setting (the hub; 1 GPU, or 8 with trainer=ddp trainer.devices=8)

The run dir receives `calibration_model/` (a save_pretrained folder: config, safetensors, tokenizer)
with `manifest.json`, Lightning checkpoints in `checkpoints/` and the offline W&B run in `wandb/`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
import lightning as L
from omegaconf import DictConfig

from calibfuse.models.loading import ModelSpec, load_tokenizer
from calibfuse.stages.export import fit_and_export
from calibfuse.stages.pretrain import CalibrationPretrainModule, ExportCalibrationModel
from calibfuse.utils.checks import check_wandb_credentials
from calibfuse.utils.run import instantiate, resolved_config, task_wrapper

log = logging.getLogger(__name__)


@task_wrapper
def pretrain(cfg: DictConfig) -> dict:
    """Build, train and export the calibration model; return the final metrics."""
    output_dir = Path(cfg.paths.output_dir)
    check_wandb_credentials(cfg.get("logger"))
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)

    base_spec: ModelSpec = instantiate(cfg.base_model)
    tokenizer = load_tokenizer(base_spec)
    log.info("data <%s>", cfg.data._target_)
    datamodule = instantiate(cfg.data, tokenizer=tokenizer)
    datamodule.setup("fit")  # read and check the data before spending time on the model
    log.info("calibration model <%s> from %s", cfg.module._target_, base_spec.name_or_path)
    module: CalibrationPretrainModule = instantiate(cfg.module, base_model=base_spec)
    return fit_and_export(cfg, module, datamodule, ExportCalibrationModel(output_dir / "calibration_model", resolved_config(cfg)))


@hydra.main(version_base="1.3", config_path="../conf", config_name="pretrain")
def main(cfg: DictConfig) -> float | None:
    metrics = pretrain(cfg)
    return metrics.get(cfg.get("optimized_metric"))  # for Hydra sweepers


if __name__ == "__main__":
    main()
