"""Stage 2: align the calibration model's embedding space with a target's (docs/method.md, stage 2).

    python -m calibfuse.align calibration_model.name_or_path=<pretrain run>/calibration_model
    python -m calibfuse.align calibration_model.name_or_path=... target=gemma3-270m
    python -m calibfuse.align ... alignment.embedding_source=output alignment.matching=exact
    python -m calibfuse.align ... experiment=paper_align      # the reference's hyper-parameters

For every token t of the shared vocabulary, x_t (calibration embedding row, d_c) and y_t (target
row, d_T). A linear map A (d_c x d_T) is learned with InfoNCE: score s(t,u) = (x_t A) . y_u, the
positive y_t against K negatives drawn uniformly from the other shared tokens. A held-out slice
of the vocabulary measures retrieval: does x_t A find y_t among all shared tokens?

The run dir receives `alignment/alignment.safetensors` (A, plus the matched token ids) and
`alignment/alignment.json` (identities with content hashes, dims, counts, K, accuracy, time).
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
import lightning as L
import torch
from omegaconf import DictConfig

from calibfuse.fusion.artifacts import model_record
from calibfuse.models.loading import ModelSpec, load_model, load_tokenizer
from calibfuse.models.vocabulary import shared_vocabulary
from calibfuse.stages.align import AlignmentModule, ExportAlignment, SharedVocabularyDataModule, check_validates, embedding_rows, split_vocabulary
from calibfuse.stages.export import fit_and_export
from calibfuse.utils.checks import check_required, check_wandb_credentials
from calibfuse.utils.run import instantiate, resolved_config, task_wrapper

log = logging.getLogger(__name__)


@task_wrapper
def align(cfg: DictConfig) -> dict:
    """Match vocabularies, learn A, export it; return the final metrics."""
    check_required(cfg)
    output_dir = Path(cfg.paths.output_dir)
    check_wandb_credentials(cfg.get("logger"))
    L.seed_everything(cfg.seed, workers=True)
    settings = cfg.alignment

    calibration_spec: ModelSpec = instantiate(cfg.calibration_model)
    target_spec: ModelSpec = instantiate(cfg.target)
    calibration_tokenizer, target_tokenizer = load_tokenizer(calibration_spec), load_tokenizer(target_spec)
    vocabulary = shared_vocabulary(calibration_tokenizer, target_tokenizer, settings.matching)
    log.info("shared vocabulary: %d tokens by %s matching (counts %s)", len(vocabulary), settings.matching, vocabulary.counts)
    train_tokens, val_tokens = split_vocabulary(len(vocabulary), settings.val_fraction, cfg.seed)
    check_validates(cfg.trainer, len(train_tokens), settings.batch_size)  # before the models load and train

    calibration, target = load_model(calibration_spec), load_model(target_spec)
    x = embedding_rows(calibration, vocabulary.calibration_ids, settings.embedding_source)
    y = embedding_rows(target, vocabulary.target_ids, settings.embedding_source)
    for role, spec, rows in (("calibration model", calibration_spec, x), ("target", target_spec, y)):
        if not torch.isfinite(rows).all():
            raise ValueError(
                f"{role} {spec.name_or_path!r} has {int((~torch.isfinite(rows)).sum())} non-finite entries in its "
                f"{settings.embedding_source} embeddings of the shared tokens; expected finite weights"
            )
    metadata = {
        "stage": "align",
        "artifact": "alignment",
        "calibration_model": model_record(calibration_spec, calibration, calibration_tokenizer, output_dir / "alignment"),
        "target": model_record(target_spec, target, target_tokenizer, output_dir / "alignment"),
        "embedding_source": settings.embedding_source,
        "matching": settings.matching,
        "shared_tokens": len(vocabulary),
        "shared_counts": vocabulary.counts,  # exact vs normalized
        "train_tokens": len(train_tokens),
        "held_out_tokens": len(val_tokens),
        "num_negatives": settings.num_negatives,
        "batch_size": settings.batch_size,
        "max_epochs": cfg.trainer.max_epochs,
        "seed": cfg.seed,
        "config": resolved_config(cfg),
    }
    del calibration, target  # only the matched rows are needed from here on

    module = AlignmentModule(x, y, train_tokens, settings.num_negatives, instantiate(settings.optimizer))
    datamodule = SharedVocabularyDataModule(train_tokens, val_tokens, settings.batch_size)
    return fit_and_export(cfg, module, datamodule, ExportAlignment(output_dir / "alignment", metadata, vocabulary))


@hydra.main(version_base="1.3", config_path="../conf", config_name="align")
def main(cfg: DictConfig) -> float | None:
    metrics = align(cfg)
    return metrics.get(cfg.get("optimized_metric"))


if __name__ == "__main__":
    main()
