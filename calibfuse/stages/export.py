"""Training and export, shared by both training stages (pretrain, align).

`fit_and_export` runs a stage's LightningModule; an `ExportArtifact` callback writes its artifact.
Export runs inside `fit`, so it works the same in a single process, in spawned DDP workers and under
FSDP: every rank takes part in `gather` (collective calls), rank 0 writes.
"""

from __future__ import annotations

import time
from datetime import datetime, timezone
from pathlib import Path

import lightning as L
from omegaconf import DictConfig

from calibfuse.data.resumable import ResumeRandomState
from calibfuse.utils.files import write_json
from calibfuse.utils.run import instantiate, instantiate_group, versions


class ExportArtifact(L.Callback):
    """Write a stage's artifact at the end of training: its files, then its manifest.

    A stage says what to gather on every rank (`gather`) and what to write from it on rank 0 (`write`,
    which returns the stage's manifest entries). This class logs the resolved config to every logger
    (in the process that owns them, spawned workers included), times the training, records a resumed
    checkpoint, and writes the manifest last: its presence marks a complete artifact.
    """

    manifest_name = "manifest.json"

    def __init__(self, out_dir: str | Path, config: dict):
        self.out_dir, self.config = Path(out_dir), config
        self.resumed_from: str | None = None
        self.started = time.time()

    @property
    def manifest_path(self) -> Path:
        return self.out_dir / self.manifest_name

    def gather(self, trainer: L.Trainer, pl_module: L.LightningModule):
        """On every rank: what `write` needs (collective calls, e.g. FSDP's full state dict, go here)."""
        return None

    def write(self, trainer: L.Trainer, pl_module: L.LightningModule, gathered) -> dict:
        """On rank 0: write the artifact's files into `out_dir`; return the stage's manifest entries."""
        raise NotImplementedError

    def on_fit_start(self, trainer, pl_module):
        self.resumed_from = str(trainer.ckpt_path) if trainer.ckpt_path else None  # "last" resolved to a file
        self.started = time.time()
        for logger in trainer.loggers:
            logger.log_hyperparams(self.config)

    def on_train_end(self, trainer, pl_module):
        gathered = self.gather(trainer, pl_module)
        if not trainer.is_global_zero:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        manifest = self.write(trainer, pl_module, gathered)
        manifest["training"] = {
            "global_step": trainer.global_step,
            "epochs_completed": trainer.current_epoch,
            "seconds": round(time.time() - self.started, 1),
            "resumed_from": self.resumed_from,
            **manifest.get("training", {}),
        }
        manifest.update(
            versions=versions(),
            created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            config=self.config,
        )
        write_json(self.manifest_path, manifest)


def fit_and_export(cfg: DictConfig, module: L.LightningModule, datamodule: L.LightningDataModule, export: ExportArtifact) -> dict:
    """Train `module` with the trainer, callbacks and loggers of `cfg` (resuming from cfg.ckpt_path);
    `export` writes the artifact when training ends. Returns the final metrics."""
    callbacks = [*instantiate_group(cfg.get("callbacks"), "callback"), ResumeRandomState(), export]
    loggers = instantiate_group(cfg.get("logger"), "logger")
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    # weights_only: Lightning unpickles an http(s) ckpt_path with weights_only=False unless told; a
    # checkpoint holds tensors and plain containers only, so nothing arbitrary is ever unpickled.
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"), weights_only=True)
    if trainer.is_global_zero and not export.manifest_path.is_file():
        raise RuntimeError(
            f"training ended without writing {export.manifest_path}: was ckpt_path={cfg.get('ckpt_path')!r} already at "
            "trainer.max_epochs / max_steps? Raise them to train on"
        )
    metrics = {k: v.item() for k, v in trainer.callback_metrics.items()}
    metrics["global_step"] = trainer.global_step
    return metrics
