"""Stage 2's LightningModule (contrastive alignment of the calibration model's embedding space with a
target's, with negatives drawn over the shared vocabulary), its data and its export. The entry
point, with its usage, is calibfuse.align; the method is docs/method.md, stage 2."""

from __future__ import annotations

import logging
import math
import warnings
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import DataLoader
from torchmetrics import MeanMetric

from calibfuse.data.resumable import shuffled_loader
from calibfuse.models.vocabulary import SharedVocabulary
from calibfuse.stages.export import ExportArtifact

log = logging.getLogger(__name__)


warnings.filterwarnings("ignore", ".*does not have many workers.*")  # index batches: workers cost more than they save


warnings.filterwarnings("ignore", ".*when logging on epoch level in distributed setting.*")  # val metrics are reduced by hand


EMBEDDING_SOURCES = ("input", "output")


def embedding_rows(model, token_ids: torch.Tensor, source: str = "input") -> torch.Tensor:
    """Rows of the input embedding (the paper) or of the LM head (output) for `token_ids`, in fp32.

    The raw weight rows: Gemma's input-embedding scale (sqrt(d)) is a forward-pass detail and
    would only rescale the scores."""
    if source not in EMBEDDING_SOURCES:
        raise ValueError(f"embedding_source={source!r}; expected one of {list(EMBEDDING_SOURCES)}")
    layer = model.get_input_embeddings() if source == "input" else model.get_output_embeddings()
    if source == "output" and layer.weight is model.get_input_embeddings().weight:
        log.warning("%s ties its LM head to its input embeddings: embedding_source=output reads the same rows as input", model.config.model_type)
    return layer.weight.detach()[token_ids].float().clone()


def sample_negatives(positions: torch.Tensor, pool_size: int, num_negatives: int, generator=None) -> torch.Tensor:
    """K positions per anchor, uniform over the pool without the anchor's own: one draw for the batch.

    Draw from pool_size - 1 values and shift those at or above the anchor up by one, which skips
    exactly the anchor and keeps the rest uniform."""
    draws = torch.randint(0, pool_size - 1, (positions.shape[0], num_negatives), device=positions.device, generator=generator)
    return draws + (draws >= positions[:, None]).long()


class AlignmentModule(L.LightningModule):
    """Learns A (d_c x d_T) by InfoNCE with negative sampling over the shared vocabulary."""

    def __init__(
        self,
        calibration_embeddings: torch.Tensor,  # (N, d_c): x_t for every shared token
        target_embeddings: torch.Tensor,  # (N, d_T): y_t
        train_tokens: torch.Tensor,  # indices into the N shared tokens used for training (negatives come from here too)
        num_negatives: int = 10,
        optimizer=None,  # partial(torch.optim.X, lr=...)
    ):
        super().__init__()
        if calibration_embeddings.shape[0] != target_embeddings.shape[0]:
            raise ValueError(f"{calibration_embeddings.shape[0]} calibration rows but {target_embeddings.shape[0]} target rows; expected one per shared token")
        if not 1 <= num_negatives < len(train_tokens):
            raise ValueError(
                f"num_negatives={num_negatives} but the shared vocabulary has {target_embeddings.shape[0]} tokens, "
                f"{len(train_tokens)} of them for training; expected 1 <= num_negatives < {len(train_tokens)}"
            )
        self.num_negatives = num_negatives
        self.optimizer_factory = optimizer
        # Inputs, not parameters: kept out of checkpoints (persistent=False), rebuilt from the models.
        self.register_buffer("x", calibration_embeddings, persistent=False)
        self.register_buffer("y", target_embeddings, persistent=False)
        self.register_buffer("train_tokens", train_tokens, persistent=False)
        self.A = nn.Linear(calibration_embeddings.shape[1], target_embeddings.shape[1], bias=False)  # random init
        self.val_metrics = nn.ModuleDict({name: MeanMetric() for name in ("loss", "top1", "top10")})  # over all held-out tokens
        self._epoch_negatives: torch.Tensor | None = None

    @property
    def alignment_matrix(self) -> torch.Tensor:
        """A as the method writes it: (d_c, d_T), so that h_c @ A lives in the target's space."""
        return self.A.weight.detach().T.contiguous()

    def info_nce(self, tokens: torch.Tensor, negatives: torch.Tensor) -> torch.Tensor:
        """Cross-entropy over [s(t,t), s(t,u_1..K)] with the positive at index 0."""
        mapped = self.A(self.x[tokens])  # (B, d_T)
        candidates = self.y[torch.cat([tokens[:, None], negatives], dim=1)]  # (B, 1+K, d_T)
        scores = torch.einsum("bd,bkd->bk", mapped, candidates)
        return F.cross_entropy(scores, torch.zeros_like(tokens))

    def on_train_epoch_start(self):
        # K negatives (as token indices) for every training token, drawn for the whole epoch in one call on the device.
        pool = len(self.train_tokens)
        self._epoch_negatives = self.train_tokens[sample_negatives(torch.arange(pool, device=self.device), pool, self.num_negatives)]

    def on_save_checkpoint(self, checkpoint):
        checkpoint["epoch_negatives"] = self._epoch_negatives  # a run resumed mid-epoch does not start the epoch again

    def on_load_checkpoint(self, checkpoint):
        self._epoch_negatives = checkpoint.get("epoch_negatives")  # on the CPU: moved at the first step

    def training_step(self, positions, batch_idx):
        if self._epoch_negatives is None:  # resumed mid-epoch from a checkpoint that did not keep them
            self.on_train_epoch_start()
        self._epoch_negatives = self._epoch_negatives.to(positions.device)  # a no-op but after a resume on a GPU
        loss = self.info_nce(self.train_tokens[positions], self._epoch_negatives[positions])
        self.log("train/loss", loss, prog_bar=True, batch_size=positions.shape[0])
        return loss

    def validation_step(self, tokens, batch_idx):
        # Negatives for held-out anchors come from the training pool (never the anchor itself).
        negatives = self.train_tokens[torch.randint(0, len(self.train_tokens), (tokens.shape[0], self.num_negatives), device=self.device)]
        scores = self.A(self.x[tokens]) @ self.y.T  # (B, N): against every shared token
        top = scores.topk(min(10, scores.shape[1]), dim=1).indices
        weight = torch.tensor(float(tokens.shape[0]), device=self.device)
        self.val_metrics["loss"].update(self.info_nce(tokens, negatives), weight=weight)
        self.val_metrics["top1"].update((top[:, 0] == tokens).float())  # a mean over held-out tokens
        self.val_metrics["top10"].update((top == tokens[:, None]).any(dim=1).float())

    def on_validation_epoch_end(self):
        values = {name: metric.compute() for name, metric in self.val_metrics.items()}  # synced over processes
        for metric in self.val_metrics.values():
            metric.reset()
        if self.trainer.sanity_checking:
            return
        self.log("val/loss", values["loss"], sync_dist=False)  # already reduced
        self.log("val/top1", values["top1"], prog_bar=True, sync_dist=False)
        self.log("val/top10", values["top10"], prog_bar=True, sync_dist=False)

    def configure_optimizers(self):
        return self.optimizer_factory(params=self.trainer.model.parameters())


class SharedVocabularyDataModule(L.LightningDataModule):
    """Batches of token indices: training positions into the train pool, held-out token indices for val."""

    def __init__(self, train_tokens: torch.Tensor, val_tokens: torch.Tensor, batch_size: int = 32, val_batch_size: int = 512):
        super().__init__()
        self.train_tokens, self.val_tokens = train_tokens, val_tokens
        self.batch_size, self.val_batch_size = batch_size, val_batch_size

    def train_dataloader(self):
        return shuffled_loader(torch.arange(len(self.train_tokens)), batch_size=self.batch_size)  # resumable mid-epoch

    def val_dataloader(self):
        return DataLoader(self.val_tokens, batch_size=self.val_batch_size, shuffle=False)


def split_vocabulary(num_tokens: int, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded (train, held-out) split of token indices 0..N-1; held-out is at least one token."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction={val_fraction}; expected a fraction strictly between 0 and 1")
    order = torch.randperm(num_tokens, generator=torch.Generator().manual_seed(seed))
    num_val = min(max(1, round(num_tokens * val_fraction)), num_tokens - 1)
    return order[num_val:].sort().values, order[:num_val].sort().values


def world_size(trainer) -> int | None:
    """Processes a trainer runs (devices x nodes), or None where the config leaves it to the machine (-1, "auto")."""
    devices, nodes = trainer.get("devices", 1), trainer.get("num_nodes", 1) or 1
    count = len(devices) if not isinstance(devices, (int, str)) else devices if isinstance(devices, int) and devices > 0 else None
    return count * nodes if count is not None else None


def check_validates(trainer, train_tokens: int, batch_size: int, where: str = "trainer") -> None:
    """Stage 2 writes its alignment only with its held-out check (val/top1): a trainer that would stop
    before Lightning first validates fails here, before any model loads, not after training."""
    limit = trainer.get("limit_val_batches")
    if limit is not None and limit == 0:
        raise ValueError(f"{where}.limit_val_batches=0: stage 2 never runs its held-out check, and an alignment is only written with it")
    world, every, interval = world_size(trainer), trainer.get("check_val_every_n_epoch", 1), trainer.get("val_check_interval")
    if world is None or not isinstance(interval, (int, float, type(None))):
        return  # how many batches an epoch holds, or when a time-based check falls, is known only when it runs
    epoch = math.ceil(math.ceil(train_tokens / world) / batch_size)  # batches an epoch, per rank (the last one partial)
    limit_train = trainer.get("limit_train_batches")
    if limit_train is not None:
        epoch = min(epoch, limit_train) if isinstance(limit_train, int) else int(epoch * limit_train)
    interval = 1.0 if interval is None else interval
    within = interval if isinstance(interval, int) else max(1, int(epoch * interval))
    first = within if every is None else (every - 1) * epoch + within  # the batch after which it first validates
    accumulate, max_steps, max_epochs = trainer.get("accumulate_grad_batches") or 1, trainer.get("max_steps") or -1, trainer.get("max_epochs") or -1
    stops = min([n for n in (max_steps * accumulate, max_epochs * epoch) if n > 0], default=None)
    if stops is not None and stops < first:
        raise ValueError(
            f"{where}.max_steps={max_steps} with max_epochs={max_epochs} ends stage 2 after {stops} batches, before its first held-out "
            f"check after batch {first} ({epoch} batches an epoch of {train_tokens} shared tokens to train on, val_check_interval={interval}, "
            f"check_val_every_n_epoch={every}), and an alignment is only written with it; expected max_steps >= {math.ceil(first / accumulate)}, "
            "or val_check_interval=<n> with n <= max_steps"
        )


class ExportAlignment(ExportArtifact):
    """Write alignment.safetensors (A and the matched ids) and alignment.json."""

    manifest_name = "alignment.json"

    def __init__(self, out_dir: str | Path, metadata: dict, vocabulary: SharedVocabulary):
        super().__init__(out_dir, metadata["config"])
        self.metadata = {k: v for k, v in metadata.items() if k != "config"}
        self.vocabulary = vocabulary

    def check_finite(self, A: torch.Tensor, when: str) -> None:
        """A diverged A (NaN/inf) would fuse into empty continuations that a grid scores as non-toxic."""
        bad = int((~torch.isfinite(A)).sum())
        if bad:
            raise RuntimeError(
                f"alignment A has {bad} non-finite entries of {A.numel()} {when}; refusing to write {self.out_dir}: "
                "training diverged, expected finite values (lower alignment.optimizer.lr, or check both models' embeddings)"
            )

    def on_train_epoch_end(self, trainer, pl_module: AlignmentModule):  # stop at the epoch it diverged, on every rank
        self.check_finite(pl_module.alignment_matrix, f"after epoch {trainer.current_epoch + 1} of {trainer.max_epochs} (global step {trainer.global_step})")

    def gather(self, trainer, pl_module: AlignmentModule):
        A = pl_module.alignment_matrix.detach().cpu()
        self.check_finite(A, f"at the end of training (global step {trainer.global_step})")
        return A

    def write(self, trainer, pl_module, A: torch.Tensor) -> dict:
        metrics = trainer.callback_metrics
        if "val/top1" not in metrics:  # an alignment is only written with its held-out check
            raise ValueError(
                f"stage 2 ended after {trainer.global_step} steps without a held-out check (val/top1); expected a run that validates: "
                "trainer.val_check_interval <= trainer.max_steps, or whole epochs"
            )
        save_file(
            {"A": A, "calibration_ids": self.vocabulary.calibration_ids, "target_ids": self.vocabulary.target_ids},
            self.out_dir / "alignment.safetensors",
            metadata={"format": "calibfuse.alignment/1", "A_shape": "calibration_dim x target_dim"},
        )
        manifest = {
            **self.metadata,
            "calibration_dim": A.shape[0],
            "target_dim": A.shape[1],
            "held_out_top1": metrics["val/top1"].item(),
            "held_out_top10": metrics["val/top10"].item(),
            "chance_top1": 1 / len(self.vocabulary),
            "held_out_loss": metrics["val/loss"].item(),
        }
        log.info(
            "alignment: %s (held-out top-1 %.3f, top-10 %.3f, chance %.2g)",
            self.out_dir,
            manifest["held_out_top1"],
            manifest["held_out_top10"],
            manifest["chance_top1"],
        )
        return manifest
