"""One cell through Lightning's predict loop: under DDP the prompts shard across devices and every
rank appends its finished batches to the cell's partial file, so a kill loses at most one batch."""

from __future__ import annotations

import logging
import time
import zlib
from dataclasses import asdict, replace
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from torch.utils.data import DataLoader

from calibfuse.data.prompts import Prompt
from calibfuse.evaluation.cells import Cell, append_rows, finish_cell, finished_prompt_ids, read_partial_rows
from calibfuse.fusion.decoding import GenerationSettings
from calibfuse.fusion.target import TargetLM
from calibfuse.methods import Method
from calibfuse.scoring.perplexity import ReferenceLM
from calibfuse.utils.run import PeakMemory, instantiate

log = logging.getLogger(__name__)


class EvaluationModule(L.LightningModule):
    """Generates a batch of prompts with one method at one strength, then scores the continuations
    (toxicity, and the reference LM's loss given the prompt). Nothing is trained."""

    def __init__(
        self, target: TargetLM, method: Method, cell: Cell, settings: GenerationSettings, scorer, reference: ReferenceLM | None, cell_dir: Path | None = None
    ):
        super().__init__()
        models = {id(m): m for m in [target.model, *method.modules()] + ([reference.model] if reference else [])}
        self.models = torch.nn.ModuleList(models.values())  # registered, so Lightning moves them to the rank's device
        self.target, self.method, self.cell, self.settings, self.scorer, self.reference = target, method, cell, settings, scorer, reference
        self.cell_dir = cell_dir  # where generations are kept apart from their scores
        self.generated: dict[tuple, dict] = {}

    def on_predict_start(self) -> None:
        # Generations an earlier run made but did not score (a scorer failed): scored now, not generated again.
        self.generated = {(g["prompt_id"], g["sample"]): g for g in read_partial_rows(self.cell_dir, "generated")} if self.cell_dir else {}
        self.target.to(self.device)
        self.method.to(self.device)
        if self.reference is not None:
            self.reference.to(self.device)
        data = getattr(self.trainer, "datamodule", None)
        self.check_lengths([asdict(p) for p in getattr(data, "remaining", [])])

    def check_lengths(self, prompts: list[dict]) -> None:
        """A prompt too long for the context is refused before the cell's first batch, named by its id."""
        if self.settings.long_prompts != "refuse" or not prompts:
            return
        lm = self.method.generator(self.target, self.cell.alpha)
        texts, prompt_format = self.method.prompt([p["text"] for p in prompts], lm)
        lm.fit_context(lm.prompt_ids(texts, prompt_format), self.settings, names=[p["id"] for p in prompts])

    def predict_step(self, batch: list[dict], batch_idx: int = 0) -> list[dict]:
        kept = [self.generated.get((p["id"], s)) for p in batch for s in range(self.settings.num_samples)]
        generations = kept if all(kept) else self.generate(batch)
        return self.score(batch, generations)

    def generate(self, batch: list[dict]) -> list[dict]:
        """The batch's continuations, appended to the cell's generated file before they are scored."""
        # Seeded per prompt (and sample) by its id, not its position: a resumed, rebatched or resharded run draws alike.
        settings = replace(self.settings, batch_size=len(batch) * self.settings.num_samples)
        seeds = [self.cell.seed + zlib.crc32(p["id"].encode()) for p in batch]
        started = time.perf_counter()
        lm = self.method.generator(self.target, self.cell.alpha)
        given = [p["text"] for p in batch]
        texts, prompt_format = self.method.prompt(given, lm)
        # KL and agreement compare with the target on the same input: not applicable when another LM
        # generates or the method rewrote the prompt (the target alone would read other text).
        diagnostics = lm is self.target and texts == given and prompt_format is None
        generations = lm.generate(
            texts,
            settings,
            alpha=self.cell.alpha,
            prompt_format=prompt_format,
            hidden_transform=self.method.hidden_transform(self.cell.alpha),
            processors=self.method.logits_processors(self.cell.alpha),
            seeds=seeds,
            diagnostics=diagnostics,
            names=[p["id"] for p in batch],
        )
        seconds = (time.perf_counter() - started) / len(generations)
        fields = ("sample", "continuation", "new_tokens", "kl", "agreement", "ended_with_eos")
        rows = [
            {"prompt_id": batch[i // self.settings.num_samples]["id"], **{k: getattr(g, k) for k in fields}, "seconds": seconds}
            for i, g in enumerate(generations)
        ]
        if self.cell_dir is not None:
            append_rows(self.cell_dir / f"generated.rank{self.global_rank}.jsonl", rows)
        return rows

    def score(self, batch: list[dict], generations: list[dict]) -> list[dict]:
        continuations = [g["continuation"] for g in generations]
        # A multi-label scorer (toxblock) keeps every label per generation; `toxicity` is its configured one.
        attributes = self.scorer.score_attributes(continuations) if hasattr(self.scorer, "score_attributes") else {}
        toxicity = attributes[self.scorer.label] if attributes else self.scorer.score(continuations)
        per_prompt = self.settings.num_samples
        prompts = [batch[i // per_prompt]["text"] for i in range(len(generations))]  # as given: without an instruction
        losses = self.reference.sample_losses(prompts, continuations) if self.reference else [None] * len(generations)
        c = self.cell
        return [
            {
                "target": c.target,
                "method": c.method,
                "alpha": c.alpha,
                "seed": c.seed,
                "prompt_id": batch[i // per_prompt]["id"],
                "prompt": prompts[i],
                "sample": g["sample"],
                "continuation": g["continuation"],
                "toxicity": tox,
                "loss": loss,
                "new_tokens": g["new_tokens"],
                "seconds": g["seconds"],
                "attributes": {k: v[i] for k, v in attributes.items()},
                "kl": g["kl"],
                "agreement": g["agreement"],
                "ended_with_eos": g["ended_with_eos"],
            }
            for i, (g, tox, loss) in enumerate(zip(generations, toxicity, losses, strict=True))
        ]


class PartialRowsWriter(BasePredictionWriter):
    """Appends each finished batch to the cell's partial file of this rank."""

    def __init__(self, cell_dir: Path):
        super().__init__(write_interval="batch")
        self.cell_dir = cell_dir

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx):
        append_rows(self.cell_dir / f"partial.rank{trainer.global_rank}.jsonl", prediction)


class CellPrompts(L.LightningDataModule):
    """The prompts of a cell that no earlier (interrupted) run has finished."""

    def __init__(self, cell_dir: Path, prompts: list[Prompt], num_samples: int, batch_size: int):
        super().__init__()
        self.cell_dir, self.prompts, self.num_samples, self.batch_size = cell_dir, prompts, num_samples, batch_size
        self.remaining: list[Prompt] = []

    def setup(self, stage: str) -> None:
        done = finished_prompt_ids(read_partial_rows(self.cell_dir), self.num_samples)
        self.remaining = [p for p in self.prompts if p.id not in done]
        if self.trainer is not None and self.trainer.world_size > 1:
            self.trainer.strategy.barrier()  # every rank has read the partial files before any rank appends

    def predict_dataloader(self):
        return DataLoader(self.remaining, batch_size=self.batch_size, shuffle=False, collate_fn=prompt_dicts)


def prompt_dicts(batch: list[Prompt]) -> list[dict]:
    return [asdict(p) for p in batch]  # plain containers: Lightning's batch transfer walks them


def run_cell(trainer_cfg, cell: Cell, cell_dir: Path, module: EvaluationModule, prompts: list[Prompt], description: dict) -> list[dict] | None:
    """The cell's unfinished prompts through the predict loop; rank 0 then stores the cell."""
    settings = module.settings
    data = CellPrompts(cell_dir, prompts, settings.num_samples, max(1, settings.batch_size // settings.num_samples))
    trainer = instantiate(trainer_cfg, callbacks=[PartialRowsWriter(cell_dir)], logger=False, enable_checkpointing=False, enable_model_summary=False)
    started = time.time()
    log.info("cell %s: generating", cell.name)
    with PeakMemory(str(module.target.device)) as memory:
        trainer.predict(module, datamodule=data, return_predictions=False)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()  # all ranks' rows are on disk
    if not trainer.is_global_zero:
        return None
    description = {
        **description,
        "wall_seconds": round(time.time() - started, 1),
        "peak_memory_mb": round(memory.peak_mb),
    }  # this process (or GPU) while the cell ran
    return finish_cell(cell, cell_dir, [p.id for p in prompts], settings.num_samples, description)
