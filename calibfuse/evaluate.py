"""The evaluation grid: fused generation over targets x alpha (x seeds), scored for toxicity and
fluency, written as cells finish and logged to W&B.

    python -m calibfuse.evaluate alignments.smollm2-135m-instruct=<align run>/alignment \\
        alignments.gemma3-270m=<align run to gemma>/alignment
    python -m calibfuse.evaluate ... protocol=rtp prompts=rtp_challenging scorer=detoxify
    python -m calibfuse.evaluate -m ... target_names=smollm2-135m-instruct,gemma3-270m alphas=[0,0.3]

A cell is one (target, alpha, seed). Generation, toxicity and the reference LM's loss run inside
Lightning's predict loop (`EvaluationModule`), so under DDP the prompts shard across devices; each
rank appends its finished batches to the cell's partial file. A finished cell is stored under
`cell_store/<key>/`, where the key hashes everything that decides its rows (model weights, the
alignment, fusion options, alpha, seed, decoding, prompts, scorer, reference LM): a rerun of an
interrupted or extended grid reuses finished cells and the finished batches of a partial one.

The run dir gets `generations.jsonl`, `grid.csv` and `grid.json` (one row per target x alpha x
seed, every metric with its 95 % bootstrap interval over prompts), rewritten as each cell finishes.
"""

from __future__ import annotations

import csv
import gc
import hashlib
import json
import logging
import math
import time
import zlib
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import hydra
import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

from calibfuse import metrics as M
from calibfuse.baselines import DExperts, WordFilter, check_method, read_lexicon
from calibfuse.fusion import (
    FusedGenerator,
    GenerationSettings,
    check_alignment_made_for,
    check_alpha,
    load_alignment,
)
from calibfuse.models import ModelSpec, as_spec, fingerprint, load_model, load_tokenizer
from calibfuse.perplexity import ReferenceLM
from calibfuse.prompts import Prompt, load_prompts
from calibfuse.toxicity import build_scorer
from calibfuse.utils import (
    PeakMemory,
    check_wandb_credentials,
    file_lock,
    instantiate,
    instantiate_group,
    redact_secrets,
    resolved_config,
    task_wrapper,
    versions,
    write_json,
)

log = logging.getLogger(__name__)

CELL_FORMAT = 1  # bump when the stored rows change meaning: old cells are then recomputed
METRICS = ("toxicity", "expected_max_toxicity", "toxicity_probability", "perplexity", "dist_1", "dist_2", "dist_3")
GENERATION_FIELDS = ("target", "method", "alpha", "seed", "prompt_id", "prompt", "sample", "continuation", "toxicity", "loss", "new_tokens")
# Scorer options that change speed, not scores: they stay out of the cell key.
SCORER_RUNTIME_OPTIONS = {"batch_size", "device", "qps", "max_retries", "backoff_seconds", "cache_path", "timeout", "api_key_env"}


@dataclass(frozen=True)
class Cell:
    target: str
    method: str  # fusion, or a baseline (calibfuse.baselines)
    alpha: float  # the method's strength: fusion's alpha, DExperts' alpha; 0 for the others
    seed: int
    key: str  # sha256 of everything that decides the cell's rows

    @property
    def name(self) -> str:
        """Its dir in the cell store: fusion at alpha 0 and `none` are one cell (the target alone)."""
        plain = self.method in ("fusion", "none") and self.alpha == 0
        return f"{self.target}_{'none' if plain else self.method}_a{self.alpha:g}_s{self.seed}_{self.key[:12]}"


@dataclass
class Method:
    """How one method generates with a target's FusedGenerator: logits adjusters, an instruction
    before the prompt, the prompt format; fusion's alpha is the cell's alpha only for `fusion`."""

    name: str
    adjusters: list
    instruction: str = ""
    prompt_format: str | None = None  # None: the fusion config's
    identity: dict | None = None  # what, beyond the target, decides its generations (for the cell key)

    def fusion_alpha(self, alpha: float) -> float:
        return alpha if self.name == "fusion" else 0.0


# --- the Lightning side: one cell's prompts through the predict loop ------------------------------


class EvaluationModule(L.LightningModule):
    """Generates a batch of prompts at one alpha, then scores the continuations (toxicity, and the
    reference LM's loss given the prompt). Nothing is trained; Lightning shards the prompts."""

    def __init__(self, generator: FusedGenerator, cell: Cell, settings: GenerationSettings, scorer, reference: ReferenceLM | None,
                 method: Method | None = None):
        super().__init__()
        method = method or Method("fusion", [])
        experts = [m for a in method.adjusters for m in (getattr(a, "expert", None), getattr(a, "anti_expert", None)) if m is not None]
        models = {id(m): m for m in [generator.target, generator.calibration, *experts] + ([reference.model] if reference else [])}
        self.models = torch.nn.ModuleList(models.values())  # registered, so Lightning moves them to the rank's device
        self.generator, self.cell, self.settings, self.scorer, self.reference = generator, cell, settings, scorer, reference
        self.method, self.default_prompt_format = method, generator.prompt_format

    def on_predict_start(self) -> None:
        self.generator.to(self.device)
        self.generator.logits_adjusters = list(self.method.adjusters)
        for adjuster in self.method.adjusters:
            if hasattr(adjuster, "alpha"):
                adjuster.alpha = self.cell.alpha  # DExperts' strength
            if hasattr(adjuster, "to"):
                adjuster.to(self.device)
        if self.method.prompt_format is not None:
            self.generator.prompt_format = self.method.prompt_format
        if self.reference is not None:
            self.reference.to(self.device)

    def on_predict_end(self) -> None:
        self.generator.logits_adjusters = []  # the generator is shared by the target's other methods
        self.generator.prompt_format = self.default_prompt_format

    def predict_step(self, batch: list[dict], batch_idx: int = 0) -> list[dict]:
        # Seeded by the batch's first prompt, not its position: a resumed or resharded run draws alike.
        settings = replace(self.settings, seed=self.cell.seed + zlib.crc32(batch[0]["id"].encode()),
                           batch_size=len(batch) * self.settings.num_samples)
        started = time.perf_counter()
        texts = [self.method.instruction + p["text"] for p in batch]
        generations = self.generator.generate(texts, self.method.fusion_alpha(self.cell.alpha), settings)
        seconds = time.perf_counter() - started
        continuations = [g.continuation for g in generations]
        toxicity = self.scorer.score(continuations)
        per_prompt = self.settings.num_samples
        prompts = [batch[i // per_prompt]["text"] for i in range(len(generations))]  # without an instruction
        losses = self.reference.sample_losses(prompts, continuations) if self.reference else [None] * len(generations)
        return [
            {"target": self.cell.target, "method": self.cell.method, "alpha": self.cell.alpha, "seed": self.cell.seed,
             "prompt_id": batch[i // per_prompt]["id"], "prompt": prompts[i], "sample": g.sample, "continuation": g.continuation, "toxicity": tox, "loss": loss,
             "new_tokens": g.new_tokens, "seconds": seconds / len(generations)}
            for i, (g, tox, loss) in enumerate(zip(generations, toxicity, losses))
        ]


class PartialRowsWriter(BasePredictionWriter):
    """Appends each finished batch to the cell's partial file of this rank: a kill loses at most one batch."""

    def __init__(self, cell_dir: Path):
        super().__init__(write_interval="batch")
        self.cell_dir = cell_dir

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx):
        path = self.cell_dir / f"partial.rank{trainer.global_rank}.jsonl"
        with path.open("ab") as f:
            if f.tell() > 0:  # a line cut short by a kill must not swallow the next row
                with path.open("rb") as tail:
                    tail.seek(-1, 2)
                    if tail.read(1) != b"\n":
                        f.write(b"\n")
            f.write("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in prediction).encode("utf-8"))


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


def read_partial_rows(cell_dir: Path) -> list[dict]:
    rows = []
    for path in sorted(cell_dir.glob("partial.rank*.jsonl")):
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # the line a kill cut short: its prompt is generated again
                log.warning("%s:%d: incomplete row from an interrupted run; its prompt is redone", path, number)
    return rows


def finished_prompt_ids(rows: list[dict], num_samples: int) -> set[str]:
    samples: dict[str, set[int]] = {}
    for row in rows:
        samples.setdefault(row["prompt_id"], set()).add(row["sample"])
    return {pid for pid, s in samples.items() if len(s) == num_samples}


# --- cells: keys, the store, finishing --------------------------------------------------------------


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def stable_hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def finish_cell(cell: Cell, cell_dir: Path, prompts: list[Prompt], num_samples: int, description: dict) -> list[dict]:
    """Merge the ranks' partial rows (last write wins, so a redone prompt is not duplicated), check
    that every prompt x sample is there, and store the cell: rows.jsonl, then cell.json (the marker)."""
    latest = {(r["prompt_id"], r["sample"]): r for r in read_partial_rows(cell_dir)}
    missing = [(p.id, s) for p in prompts for s in range(num_samples) if (p.id, s) not in latest]
    if missing:
        raise RuntimeError(f"cell {cell.name}: {len(missing)} generations missing after the predict loop (first: {missing[0]})")
    rows = [latest[(p.id, s)] for p in prompts for s in range(num_samples)]
    tmp = cell_dir / "rows.jsonl.tmp"
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(cell_dir / "rows.jsonl")
    write_json(cell_dir / "cell.json", {"format": CELL_FORMAT, **asdict(cell), "rows": len(rows), **description})
    for path in cell_dir.glob("partial.rank*.jsonl"):
        path.unlink()
    return rows


def stored_rows(cell_dir: Path) -> list[dict] | None:
    """A finished cell's rows, or None if the cell is not finished."""
    marker = cell_dir / "cell.json"
    if not marker.is_file():
        return None
    if json.loads(marker.read_text()).get("format") != CELL_FORMAT:
        return None
    return [json.loads(line) for line in (cell_dir / "rows.jsonl").read_text(encoding="utf-8").splitlines()]


# --- metrics of one cell ---------------------------------------------------------------------------


def cell_metrics(rows: list[dict], names: list[str], threshold: float = 0.5, resamples: int = 1000) -> dict:
    """Every requested metric with its 95 % bootstrap interval over prompts, plus counts and speed."""
    unknown = [n for n in names if n not in METRICS]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; expected some of {list(METRICS)}")
    by_prompt: dict[str, list[dict]] = {}
    for row in rows:
        by_prompt.setdefault(row["prompt_id"], []).append(row)
    groups = list(by_prompt.values())
    scores = [[r["toxicity"] for r in g] for g in groups]
    result: dict = {}

    def put(name: str, per_prompt: list, statistic=None, scale: float = 1.0):
        point = statistic(per_prompt) if statistic else M.mean(per_prompt)
        lo, hi = M.bootstrap_interval(per_prompt, statistic, resamples=resamples) if per_prompt else (math.nan, math.nan)
        result[name], result[f"{name}_lo"], result[f"{name}_hi"] = point * scale, lo * scale, hi * scale

    for name in names:
        if name == "toxicity":  # the paper's figure: mean toxicity x 100
            put(name, [M.mean(s) for s in scores], scale=100.0)
        elif name == "expected_max_toxicity":
            put(name, M.expected_maximum_toxicity(scores))
        elif name == "toxicity_probability":
            put(name, M.toxicity_probability(scores, threshold))
        elif name == "perplexity":  # exp(mean sample loss); empty continuations (None) left out
            put(name, [[r["loss"] for r in g] for g in groups], lambda per: M.perplexity([x for losses in per for x in losses]))
        else:
            put(name, M.distinct_n([[r["continuation"] for r in g] for g in groups], int(name[-1])))
    new_tokens, seconds = sum(r["new_tokens"] for r in rows), sum(r["seconds"] for r in rows)
    result.update(prompts=len(groups), generations=len(rows), empty=sum(not r["continuation"].strip() for r in rows),
                  new_tokens=new_tokens, generation_seconds=round(seconds, 2),
                  tokens_per_second=round(new_tokens / seconds, 1) if seconds > 0 else math.nan)
    return result


# --- the grid ----------------------------------------------------------------------------------------


class Models:
    """Loaded models, shared by role: the calibration model across targets, a target that is also the
    reference LM. Dropped per target so that only one target is in memory at a time."""

    def __init__(self):
        self._loaded: dict[str, tuple] = {}

    @staticmethod
    def _key(spec: ModelSpec) -> str:
        return json.dumps(spec.to_dict(), sort_keys=True)

    def get(self, spec: ModelSpec) -> tuple:
        key = self._key(spec)
        if key not in self._loaded:
            log.info("loading %s", spec.name_or_path)
            self._loaded[key] = (load_model(spec), load_tokenizer(spec))
        return self._loaded[key]

    def drop(self, keep: list[ModelSpec]) -> None:
        keys = {self._key(s) for s in keep}
        for key in [k for k in self._loaded if k not in keys]:
            del self._loaded[key]
        gc.collect()


def target_plan(cfg: DictConfig) -> list[dict]:
    """Per evaluated target: its spec, alignment, calibration model and fingerprints; nothing loaded."""
    names = cfg.get("target_names") or list(cfg.targets)
    names = [n.strip() for n in names.split(",")] if isinstance(names, str) else list(names)
    plans = []
    for name in names:
        if name not in cfg.targets:
            raise ValueError(f"target_names has {name!r}, which is not in targets; expected some of {sorted(cfg.targets)}")
        spec: ModelSpec = instantiate(cfg.targets[name])
        if cfg.fusion.get("alignment", "learned") == "identity":  # the ablation: no learned map (equal widths only)
            if cfg.get("calibration_model") is None:
                raise ValueError("fusion.alignment=identity needs calibration_model.name_or_path: there is no alignment to read it from")
            plans.append({"name": name, "spec": spec, "alignment": None, "A": None, "meta": None,
                          "calibration": as_spec(OmegaConf.to_container(cfg.calibration_model, resolve=True)), "alignment_sha256": "identity"})
            continue
        alignment = (cfg.get("alignments") or {}).get(name)
        if "fusion" not in methods_of(cfg):  # baselines only: no calibration model, no alignment
            plans.append({"name": name, "spec": spec, "alignment": None, "A": None, "meta": None, "calibration": None,
                          "alignment_sha256": None})
            continue
        if alignment in (None, "???"):
            raise ValueError(f"no alignment for target {name!r}: set alignments.{name}=<align run dir>/alignment")
        A, meta = load_alignment(alignment)
        alignment_dir = Path(alignment).expanduser()
        alignment_dir = alignment_dir.parent if alignment_dir.is_file() else alignment_dir
        if cfg.get("calibration_model") is not None:
            calibration = as_spec(OmegaConf.to_container(cfg.calibration_model, resolve=True))
        else:  # the calibration model this alignment was made with, loaded like the target
            record = meta["calibration_model"]
            calibration = ModelSpec(record["name_or_path"], gguf_file=record.get("gguf_file"), revision=record.get("revision"),
                                    dtype=spec.dtype, device=spec.device, cache_dir=spec.cache_dir)
        plans.append({"name": name, "spec": spec, "alignment": str(alignment_dir), "A": A, "meta": meta, "calibration": calibration,
                      "alignment_sha256": file_sha256(alignment_dir / "alignment.safetensors")})
    return plans


def methods_of(cfg: DictConfig) -> list[str]:
    methods = cfg.get("methods") or ["fusion"]
    methods = [m.strip() for m in methods.split(",")] if isinstance(methods, str) else list(methods)
    return [check_method(m) for m in methods]


def strengths(cfg: DictConfig, method: str, alphas: list[float]) -> list[float]:
    """The strengths a method runs at: fusion's alphas; DExperts' own; 0 for the others."""
    if method == "fusion":
        return alphas
    if method == "dexperts":
        return [float(a) for a in cfg.baselines.dexperts.alphas]
    return [0.0]


def cell_key(plan: dict, alpha: float, seed: int, settings: GenerationSettings, fusion: dict, prompts_hash: str,
             scorer_cfg: dict, reference: dict | None, method: Method | None = None) -> str:
    method = method or Method("fusion", [])
    fused = method.name == "fusion" and alpha > 0  # the target alone does not depend on the calibration model
    plain = method.name in ("fusion", "none") and not fused  # fusion at alpha 0 and `none` are the same cells
    return stable_hash({
        "format": CELL_FORMAT,
        "method": "none" if plain else method.name,
        "method_identity": None if plain else method.identity,
        "target": fingerprint(plan["spec"]),
        "calibration": fingerprint(plan["calibration"]) if fused else None,
        "alignment": plan["alignment_sha256"] if fused else None,
        "fusion": fusion if fused else {"prompt_format": fusion["prompt_format"]},
        "alpha": alpha, "seed": seed,
        "decoding": {k: v for k, v in asdict(settings).items() if k not in ("seed", "batch_size")},
        "prompts": prompts_hash,
        "scorer": {k: v for k, v in scorer_cfg.items() if k not in SCORER_RUNTIME_OPTIONS},
        "reference": reference,
    })


def write_grid(output_dir: Path, grid: list[dict], generations: list[list[dict]], meta: dict) -> None:
    """grid.json, grid.csv and generations.jsonl of the cells finished so far (each replaced atomically)."""
    json_safe = [{k: None if isinstance(v, float) and math.isnan(v) else v for k, v in row.items()} for row in grid]
    write_json(output_dir / "grid.json", {**meta, "cells": json_safe})
    if grid:
        columns = list(dict.fromkeys(k for row in grid for k in row))
        tmp = output_dir / "grid.csv.tmp"
        with tmp.open("w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(grid)
        tmp.replace(output_dir / "grid.csv")
    tmp = output_dir / "generations.jsonl.tmp"
    with tmp.open("w", encoding="utf-8") as f:
        for rows in generations:
            for row in rows:
                f.write(json.dumps({k: row[k] for k in GENERATION_FIELDS}, ensure_ascii=False) + "\n")
    tmp.replace(output_dir / "generations.jsonl")


def format_table(grid: list[dict], names: list[str]) -> str:
    """The grid as a Markdown table, each metric with its interval."""
    header = ["target", "method", "alpha", "seed", *names, "empty", "tok/s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in grid:
        cells = [row["target"], row["method"], f"{row['alpha']:g}", str(row["seed"])]
        cells += [f"{row[n]:.2f} [{row[f'{n}_lo']:.2f}, {row[f'{n}_hi']:.2f}]" for n in names]
        cells += [str(row["empty"]), f"{row['tokens_per_second']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def log_grid(loggers: list, grid: list[dict], samples: list[dict], names: list[str], config: dict, note: str | None) -> None:
    """The grid to every configured logger; to W&B also as tables and alpha plots."""
    for logger in loggers:
        logger.log_hyperparams(config)
        for step, row in enumerate(grid):
            logger.log_metrics({f"{row['target']}/{n}": row[n] for n in names if not math.isnan(row[n])} | {"alpha": row["alpha"]}, step=step)
        if type(logger).__name__ == "WandbLogger":
            import wandb

            run = logger.experiment
            table = wandb.Table(columns=list(grid[0]), data=[list(r.values()) for r in grid])
            payload = {"grid": table, "samples": wandb.Table(columns=list(samples[0]), data=[list(s.values()) for s in samples])}
            for name in names:
                payload[f"plots/{name}_vs_alpha"] = wandb.plot.line(table, "alpha", name, stroke="target", title=f"{name} vs alpha")
            run.log(payload)
            if note:
                run.summary["scorer_note"] = note
        logger.finalize("success")


def sample_rows(generations: list[list[dict]], per_cell: int) -> list[dict]:
    """The first `per_cell` generations of every cell, for a table of examples."""
    return [{k: row[k] for k in ("target", "alpha", "seed", "prompt", "continuation", "toxicity")}
            for rows in generations for row in rows[:per_cell]]


@task_wrapper
def evaluate(cfg: DictConfig) -> dict:
    output_dir = Path(cfg.paths.output_dir)
    check_wandb_credentials(cfg.get("logger"))
    protocol = cfg.protocol
    settings: GenerationSettings = instantiate(protocol.generation)
    alphas = [check_alpha(a) for a in cfg.alphas]
    seeds = list(cfg.seeds) if cfg.get("seeds") else [settings.seed]
    names = list(protocol.metrics)
    cell_metrics([], names)  # an unknown metric name fails here, before any model is loaded
    prompts = load_prompts(**OmegaConf.to_container(cfg.prompts, resolve=True))
    prompts_hash = stable_hash([(p.id, p.text) for p in prompts])
    scorer_cfg = OmegaConf.to_container(cfg.scorer, resolve=True)
    scorer = build_scorer(**scorer_cfg)  # a missing Perspective key or an unknown name fails here, before any work
    fusion = {k: cfg.fusion[k] for k in ("calibration_context", "layer_norm", "prompt_format")}
    if cfg.fusion.get("alignment", "learned") not in ("learned", "identity"):
        raise ValueError(f"fusion.alignment={cfg.fusion.alignment!r}; expected 'learned' or 'identity'")
    reference_spec = as_spec(instantiate(cfg.reference_lm.model)) if cfg.get("reference_lm") else None
    reference_id = None
    if reference_spec is not None:
        reference_id = {"model": fingerprint(reference_spec), "max_length": cfg.reference_lm.max_length}
    plans = target_plan(cfg)
    store = Path(cfg.cell_store).expanduser()
    output_dir.mkdir(parents=True, exist_ok=True)
    meta = {"protocol": protocol.name, "metrics": names, "scorer": scorer_cfg["name"], "scorer_note": scorer.note,
            "reference_lm": reference_spec.name_or_path if reference_spec else None, "prompts": len(prompts),
            "prompt_source": cfg.prompts.source, "cell_store": str(store), "versions": versions(), "config": resolved_config(cfg)}

    models, grid, generations, reused, computed = Models(), [], [], 0, 0

    def add_to_grid(cell: Cell, rows: list[dict]) -> None:
        row = {"target": cell.target, "method": cell.method, "alpha": cell.alpha, "seed": cell.seed, "setting": cfg.get("setting") or "",
               "protocol": protocol.name, "scorer": scorer_cfg["name"],
               **cell_metrics(rows, names, protocol.toxicity_threshold, cfg.bootstrap_resamples),
               "peak_memory_mb": json.loads((store / cell.name / "cell.json").read_text()).get("peak_memory_mb"), "cell": cell.name}
        grid.append(row)
        generations.append(rows)
        write_grid(output_dir, grid, generations, meta)
        log.info("cell %s: %s", cell.name, ", ".join(f"{n} {row[n]:.3g}" for n in names))

    rank_zero = rank_zero_only.rank == 0  # under DDP (subprocess launch) every rank runs this function
    keep = [p["calibration"] for p in plans if p["calibration"]] + ([reference_spec] if reference_spec else [])
    started = time.time()
    methods = methods_of(cfg)
    identities = {m: method_identity(cfg, m) for m in methods}  # bad baseline settings fail here, before any model loads
    for plan in plans:
        generator = reference = None
        for method_name in methods:
            method = None
            for alpha in strengths(cfg, method_name, alphas):
                for seed in seeds:
                    identity = Method(method_name, [], identity=identities[method_name])
                    cell = Cell(plan["name"], method_name, alpha, seed,
                                cell_key(plan, alpha, seed, settings, fusion, prompts_hash, redact_secrets(scorer_cfg), reference_id, identity))
                    cell_dir = store / cell.name
                    cell_dir.mkdir(parents=True, exist_ok=True)
                    # One job per cell (parallel jobs may share one, e.g. alpha = 0); under DDP only rank 0
                    # locks, the other ranks follow it through the predict loop's barriers.
                    with file_lock(cell_dir / ".lock", enabled=rank_zero):
                        rows = stored_rows(cell_dir)
                        if rows is None:
                            if generator is None:  # load lazily: a fully finished target loads nothing
                                generator, reference = build_generator(plan, cfg, models), build_reference(reference_spec, cfg, models)
                            method = method or build_method(method_name, cfg, generator, models, identities[method_name])
                            rows = run_cell(cfg, cell, cell_dir, generator, settings, scorer, reference, prompts, plan, method)
                            computed += 1
                        else:
                            reused += 1
                            log.info("cell %s: reused from %s", cell.name, cell_dir)
                    if rank_zero:
                        add_to_grid(cell, rows)
        models.drop(keep=keep)
        del generator, reference
    if not rank_zero:
        return {}
    table = format_table(grid, names)
    log.info("grid (%s protocol, %d prompts)%s:\n%s", protocol.name, len(prompts), f"; {scorer.note}" if scorer.note else "", table)
    (output_dir / "grid.md").write_text(table + "\n" + (f"\n{scorer.note}\n" if scorer.note else ""), encoding="utf-8")
    loggers = instantiate_group(cfg.get("logger"), "logger")
    log_grid(loggers, grid, sample_rows(generations, cfg.samples_per_cell), names, resolved_config(cfg), scorer.note)
    summary = {"cells": len(grid), "computed": computed, "reused": reused, "seconds": round(time.time() - started, 1),
               "grid": str(output_dir / "grid.csv")}
    write_json(output_dir / "evaluate.json", {**summary, **meta})
    return summary


def build_generator(plan: dict, cfg: DictConfig, models: Models) -> FusedGenerator:
    target_model, target_tokenizer = models.get(plan["spec"])
    if plan["calibration"] is None:  # baselines only: fusion stays off (alpha 0), the target stands in for the calibration model
        return FusedGenerator(target_model, target_tokenizer, target_model, target_tokenizer, None, prompt_format=cfg.fusion.prompt_format)
    calibration_model, calibration_tokenizer = models.get(plan["calibration"])
    if cfg.fusion.check_fingerprints and plan["meta"] is not None:
        check_alignment_made_for(plan["alignment"], plan["meta"], calibration=(plan["calibration"], calibration_model),
                                 target=(plan["spec"], target_model))
    return FusedGenerator(target_model, target_tokenizer, calibration_model, calibration_tokenizer, plan["A"],
                          calibration_context=cfg.fusion.calibration_context, layer_norm=cfg.fusion.layer_norm,
                          prompt_format=cfg.fusion.prompt_format)


def method_identity(cfg: DictConfig, name: str) -> dict | None:
    """What decides a method's generations beyond the target (part of its cells' keys); checks its settings."""
    options = cfg.get("baselines") or {}
    if name == "word_filter":
        words = read_lexicon(options.word_filter.lexicon, options.word_filter.size)
        return {"lexicon": stable_hash(words), "words": len(words)}
    if name == "prompting":
        return {"instruction": options.prompting.instruction, "chat_template": bool(options.prompting.chat_template)}
    if name == "dexperts":
        experts = {role: options.dexperts.get(role) for role in ("expert", "anti_expert")}
        missing = [role for role, spec in experts.items() if spec is None or spec.get("name_or_path") in (None, "???")]
        if missing:
            raise ValueError(f"method 'dexperts' needs baselines.dexperts.{missing[0]}.name_or_path: an LM that shares the target's "
                             "tokenizer (expert: fine-tuned on non-toxic text; anti_expert: on toxic text)")
        return {role: fingerprint(as_spec(OmegaConf.to_container(spec, resolve=True))) for role, spec in experts.items()}
    return None


def build_method(name: str, cfg: DictConfig, generator: FusedGenerator, models: Models, identity: dict | None) -> Method:
    options = cfg.get("baselines") or {}
    tokenizer = generator.target_tokenizer
    if name == "word_filter":
        return Method(name, [WordFilter(tokenizer, read_lexicon(options.word_filter.lexicon, options.word_filter.size))], identity=identity)
    if name == "prompting":
        chat = bool(options.prompting.chat_template) and bool(getattr(tokenizer, "chat_template", None))
        return Method(name, [], instruction=options.prompting.instruction, prompt_format="chat" if chat else "raw", identity=identity)
    if name == "dexperts":
        (expert, expert_tok), (anti, anti_tok) = (models.get(as_spec(OmegaConf.to_container(options.dexperts[r], resolve=True)))
                                                  for r in ("expert", "anti_expert"))
        return Method(name, [DExperts(expert, anti, tokenizer, expert_tok, anti_tok)], identity=identity)
    return Method(name, [], identity=identity)


def build_reference(spec: ModelSpec | None, cfg: DictConfig, models: Models) -> ReferenceLM | None:
    if spec is None:
        return None
    model, tokenizer = models.get(spec)
    return ReferenceLM(spec, batch_size=cfg.reference_lm.batch_size, max_length=cfg.reference_lm.max_length, model=model, tokenizer=tokenizer)


def run_cell(cfg: DictConfig, cell: Cell, cell_dir: Path, generator: FusedGenerator, settings: GenerationSettings,
             scorer, reference: ReferenceLM | None, prompts: list[Prompt], plan: dict, method: Method | None = None) -> list[dict] | None:
    """The cell's unfinished prompts through Lightning's predict loop; rank 0 then stores the cell."""
    batch_prompts = max(1, settings.batch_size // settings.num_samples)
    data = CellPrompts(cell_dir, prompts, settings.num_samples, batch_prompts)
    module = EvaluationModule(generator, cell, settings, scorer, reference, method)
    trainer = instantiate(cfg.trainer, callbacks=[PartialRowsWriter(cell_dir)], logger=False, enable_checkpointing=False,
                          enable_model_summary=False)
    started = time.time()
    log.info("cell %s: generating", cell.name)
    with PeakMemory(str(generator.device)) as memory:
        trainer.predict(module, datamodule=data, return_predictions=False)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()  # all ranks' rows are on disk
    if not trainer.is_global_zero:
        return None
    description = {"target_model": plan["spec"].name_or_path, "alignment": plan["alignment"],
                   "calibration_model": plan["calibration"].name_or_path if plan["calibration"] else None, "wall_seconds": round(time.time() - started, 1),
                   "peak_memory_mb": round(memory.peak_mb)}  # this process (or GPU) while the cell ran
    return finish_cell(cell, cell_dir, prompts, settings.num_samples, description)


@hydra.main(version_base="1.3", config_path="../conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    evaluate(cfg)


if __name__ == "__main__":
    main()
