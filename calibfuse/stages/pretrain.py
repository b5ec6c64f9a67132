"""Stage 1's LightningModule (the calibration model: the first layers of a pretrained LM, trained on
non-toxic completions) and its export. The entry point, with its usage, is calibfuse.pretrain;
the method is docs/method.md, stage 1."""

from __future__ import annotations

import dataclasses
import logging
import math
import warnings

import lightning as L
import torch
from torchmetrics import MeanMetric

from calibfuse.fusion.calibration import build_calibration_model, count_parameters
from calibfuse.models.lm import IGNORE_INDEX
from calibfuse.models.loading import ModelSpec, as_spec, load_model
from calibfuse.stages.export import ExportArtifact

log = logging.getLogger(__name__)


warnings.filterwarnings("ignore", ".*does not have many workers.*")  # small CPU datasets: workers cost more than they save


warnings.filterwarnings("ignore", ".*when logging on epoch level in distributed setting.*")  # val metrics are reduced by hand


class CalibrationPretrainModule(L.LightningModule):
    """A causal LM cut to its first `num_layers` layers, trained on completion tokens only."""

    def __init__(
        self,
        base_model: ModelSpec | dict | str,
        num_layers: int = 3,
        reinit_non_embedding: bool = False,
        optimizer=None,  # partial(torch.optim.X, lr=...): called with the parameters (works under FSDP)
        scheduler=None,  # partial(schedule, ...): called with optimizer and num_training_steps
        head_on_scored_only: bool = False,
    ):
        super().__init__()
        self.base_spec = as_spec(base_model)
        self.save_hyperparameters(
            {
                "base_model": self.base_spec.to_dict(),
                "num_layers": num_layers,
                "reinit_non_embedding": reinit_non_embedding,
                "head_on_scored_only": head_on_scored_only,
            },
            logger=False,  # the entry point logs the whole resolved config instead
        )
        base = load_model(dataclasses.replace(self.base_spec, device="cpu"))  # Lightning places the module
        self.base_class = type(base).__name__
        self.base_num_layers = base.config.num_hidden_layers
        self.model = build_calibration_model(base, num_layers, reinit_non_embedding).train()
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.head_on_scored_only = head_on_scored_only
        self.val_loss = MeanMetric()  # token-weighted over the whole val set, synced across processes
        self.val_loss_before_training: float | None = None

    def forward(self, **batch):
        return self.model(**batch)

    def loss(self, batch) -> torch.Tensor:
        """The mean cross-entropy over the batch's completion tokens (IGNORE_INDEX masks prompt and padding)."""
        if not self.head_on_scored_only:
            return self.model(**batch).loss  # HF shifts the labels
        # The same loss with the LM head (most of a 3-layer cut's compute) run only where a label is scored:
        # prompt and padding positions, about 45 % of the embedded corpus's, are skipped.
        labels = batch["labels"][:, 1:]
        scored = labels != IGNORE_INDEX
        hidden = self.model.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")).last_hidden_state
        logits = self.model.get_output_embeddings()(hidden[:, :-1][scored]).float()
        if softcap := getattr(self.model.config, "final_logit_softcapping", None):  # as the model's own forward does
            logits = torch.tanh(logits / softcap) * softcap
        return torch.nn.functional.cross_entropy(logits, labels[scored])

    def training_step(self, batch, batch_idx):
        loss = self.loss(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        return loss

    def validation_step(self, batch, batch_idx):
        loss = self.loss(batch)  # the mean over the batch's completion tokens
        self.val_loss.update(loss.float(), weight=(batch["labels"][:, 1:] != IGNORE_INDEX).sum())

    def on_validation_epoch_end(self):
        # Token-weighted mean over the whole val set (not a mean of batch means), over every process.
        loss = self.val_loss.compute()
        self.val_loss.reset()
        if self.trainer.sanity_checking:
            # The full val pass Lightning runs before training (num_sanity_val_steps=-1) measures the
            # untrained model. A resumed run keeps the value its checkpoint carries.
            if self.val_loss_before_training is None:
                self.val_loss_before_training = loss.item()
            return
        self.log("val/loss", loss, prog_bar=True, sync_dist=False)  # already reduced
        self.log("val/perplexity", torch.exp(loss))

    def on_train_start(self):
        if self.val_loss_before_training is not None:
            self.log("val/loss_before_training", self.val_loss_before_training)

    def on_train_batch_end(self, outputs, batch, batch_idx):
        # Stopping through should_stop (not only max_steps) makes Lightning validate once more, so the
        # last val/loss always describes the final weights, also when max_steps ends mid-epoch.
        if 0 < self.trainer.max_steps <= self.trainer.global_step:
            self.trainer.should_stop = True

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(params=self.trainer.model.parameters())
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer=optimizer, num_training_steps=self.trainer.estimated_stepping_batches)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint):
        checkpoint["calibfuse"] = {"val_loss_before_training": self.val_loss_before_training}

    def on_load_checkpoint(self, checkpoint):
        self.val_loss_before_training = checkpoint.get("calibfuse", {}).get("val_loss_before_training")


class ExportCalibrationModel(ExportArtifact):
    """Write `calibration_model/` (save_pretrained: config, safetensors, tokenizer) and its
    `manifest.json`; under FSDP all ranks gather the shards and rank 0 writes."""

    def gather(self, trainer, pl_module):
        return trainer.strategy.lightning_module_state_dict()  # collective under FSDP

    def write(self, trainer, pl_module: CalibrationPretrainModule, state_dict) -> dict:
        weights = {k.removeprefix("model."): v for k, v in state_dict.items() if k.startswith("model.")}
        model, datamodule = pl_module.model, trainer.datamodule
        val_loss = trainer.callback_metrics["val/loss"].item()
        before = pl_module.val_loss_before_training
        model.save_pretrained(self.out_dir, state_dict=weights, safe_serialization=True)
        datamodule.tokenizer.save_pretrained(self.out_dir)
        log.info("calibration model: %s (val loss %s -> %.3f)", self.out_dir, before, val_loss)
        return {
            "stage": "pretrain",
            "artifact": "calibration_model",
            "base_model": pl_module.base_spec.to_dict(),
            "base_model_class": pl_module.base_class,
            "base_num_layers": pl_module.base_num_layers,
            "num_layers": model.config.num_hidden_layers,
            "reinit_non_embedding": pl_module.hparams.reinit_non_embedding,
            "hidden_size": model.config.hidden_size,
            "vocab_size": model.config.vocab_size,
            "parameters": count_parameters(model),
            "data": {**{k: v for k, v in datamodule.source.items() if k != "load_kwargs"}, **datamodule.stats},
            "training": {
                "max_epochs": trainer.max_epochs,
                "max_steps": trainer.max_steps,
                "batch_size_per_device": datamodule.batch_size,
                "effective_batch_size": datamodule.batch_size * trainer.accumulate_grad_batches * trainer.world_size,
                "world_size": trainer.world_size,
                "precision": str(trainer.precision),
                "strategy": type(trainer.strategy).__name__,
            },
            "val_loss_before_training": before,
            "val_loss": val_loss,
            "val_perplexity_before_training": math.exp(before) if before is not None else None,
            "val_perplexity": math.exp(val_loss),
            # The same number, named for what it is: completion tokens of rows never trained on
            # (the split is seeded and one row per completion, so no held-out text is in training).
            "held_out_perplexity": math.exp(val_loss),
            "held_out_perplexity_before_training": math.exp(before) if before is not None else None,
            "held_out_rows": datamodule.stats.get("val_examples"),
            "held_out_tokens": datamodule.stats.get("val_completion_tokens"),
        }
