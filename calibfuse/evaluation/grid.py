"""The evaluation grid: targets x methods x strengths x seeds, every cell scored for toxicity and
fluency, the grid files rewritten as cells finish, logged to W&B at the end."""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

from calibfuse.data.datamodule import held_out_texts
from calibfuse.data.prompts import Prompt, load_prompts
from calibfuse.evaluation.capability import Capability, annotate_capability, capability_columns
from calibfuse.evaluation.cells import Cell, cell_key, flat, setting_key, stored_description, stored_rows
from calibfuse.evaluation.loggers import log_grid
from calibfuse.evaluation.metrics import DIAGNOSTICS, cell_metrics, check_metrics, is_degenerate
from calibfuse.evaluation.paired import annotate_grid, toxicity_metric
from calibfuse.evaluation.quality import Neutral, annotate_quality, neutral_columns
from calibfuse.evaluation.results import format_table, sample_rows, write_grid, write_prompt_scores
from calibfuse.evaluation.runner import EvaluationModule, run_cell
from calibfuse.fusion.decoding import GenerationSettings
from calibfuse.fusion.target import TargetLM
from calibfuse.methods import Method, build_methods
from calibfuse.models.loading import ModelCache, ModelSpec, as_spec, fingerprint, runtime_identity
from calibfuse.scoring.perplexity import ReferenceLM
from calibfuse.utils.checks import check_accelerator, check_int, check_ints, check_output_dir, check_required, check_wandb_credentials
from calibfuse.utils.files import file_lock, sha256_json, write_json, write_text
from calibfuse.utils.run import instantiate, instantiate_group, redact_secrets, resolved_config, task_wrapper, versions
from calibfuse.utils.sweeps import sweep_knobs, sweep_name

log = logging.getLogger(__name__)

# Scorer options that change speed, not scores: they stay out of the cell key.
SCORER_RUNTIME_OPTIONS = {"batch_size", "device", "qps", "max_retries", "backoff_seconds", "cache_path", "timeout", "api_key_env"}


@dataclass
class GridRun:
    """Everything a grid needs, checked before any model loads."""

    cfg: DictConfig
    settings: GenerationSettings
    seeds: list[int]
    names: list[str]  # metrics
    prompts: list[Prompt]
    scorer: object
    targets: dict[str, ModelSpec]
    methods: list[Method]
    reference: ModelSpec | None
    context: dict  # the part of every cell key the grid shares
    described: dict  # the same, readable and flat: how a report labels this grid's settings when they differ from others'
    store: Path
    output_dir: Path
    meta: dict
    neutral: Neutral | None = None  # the method's own perplexity on held-out neutral text (calibfuse.evaluation.quality)
    capability: Capability | None = None  # zero-shot multiple-choice accuracy (calibfuse.evaluation.capability)
    models: ModelCache = field(default_factory=ModelCache)
    neutral_memo: dict = field(default_factory=dict)  # per setting: seeds share one neutral measurement
    grid: list[dict] = field(default_factory=list)
    generations: list[list[dict]] = field(default_factory=list)
    computed: int = 0
    reused: int = 0


def prepare(cfg: DictConfig) -> GridRun:
    check_required(cfg)  # a `???` left unset (prompts=local_jsonl without prompts.source, ...) fails here, by name
    check_wandb_credentials(cfg.get("logger"))
    check_accelerator(cfg.get("trainer"))
    check_output_dir(cfg.cell_store, "cell_store")
    check_ints(
        cfg,
        {
            "prompts.limit": (1, True),
            "prompts.sample": (1, True),
            "prompts.seed": (None, False),
            "protocol.generation.batch_size": (1, False),
            "protocol.generation.num_samples": (1, False),
            "protocol.generation.max_new_tokens": (1, False),
            "protocol.generation.seed": (None, False),
            "bootstrap_resamples": (1, False),
            "samples_per_cell": (0, False),
        },
    )
    seeds = cfg.get("seeds")
    if seeds is not None and (not isinstance(seeds, ListConfig) or not seeds):
        raise ValueError(f"seeds={seeds!r}; expected a non-empty list of integers such as seeds=[1,2,3], or null for the protocol's seed")
    seeds = list(dict.fromkeys(check_int("seeds", s) for s in seeds)) if seeds else None  # a repeated seed runs once
    capability = Capability.of(cfg.get("capability"))  # an unknown task or a missing task file fails here, before any model loads
    settings: GenerationSettings = instantiate(cfg.protocol.generation)
    names = check_metrics(list(cfg.protocol.metrics))
    prompts = load_prompts(**OmegaConf.to_container(cfg.prompts, resolve=True))
    scorer_cfg = redact_secrets(OmegaConf.to_container(cfg.scorer, resolve=True))
    scorer = instantiate(cfg.scorer)  # a missing Perspective key fails here, before any work
    targets = target_specs(cfg)
    methods = build_methods(cfg.get("methods"))
    for method in methods:
        method.prepare(targets)  # bad method settings fail here, before any model loads
    reference = as_spec(instantiate(cfg.reference_lm.model)) if cfg.get("reference_lm") else None
    context = {
        "decoding": {k: v for k, v in asdict(settings).items() if k not in ("seed", "batch_size")},
        "prompts": sha256_json([(p.id, p.text) for p in prompts]),
        "prompt_format": cfg.prompt_format,
        "scorer": {k: v for k, v in scorer_cfg.items() if k not in SCORER_RUNTIME_OPTIONS},
        "reference": {"model": fingerprint(reference), **runtime_identity(reference), "max_length": cfg.reference_lm.max_length} if reference else None,
        "runtime": {"accelerator": str(cfg.trainer.get("accelerator")), "precision": str(cfg.trainer.get("precision"))},
    }
    store = Path(cfg.cell_store).expanduser()
    meta = {
        "protocol": cfg.protocol.name,
        "metrics": names,
        "scorer": scorer.name,
        "scorer_note": scorer.note,
        "reference_lm": reference.name_or_path if reference else None,
        "prompts": len(prompts),
        "prompt_source": cfg.prompts.source,
        "cell_store": str(store),
        "versions": versions(),
        "config": resolved_config(cfg),
    }
    seeds = seeds or [settings.seed]
    described = flat(
        {
            "prompts": f"{cfg.prompts.source} ({len(prompts)} prompts, {context['prompts'][:8]})",
            "prompt_format": cfg.prompt_format,
            "decoding": context["decoding"],
            "scorer": {"name": scorer.name} | {k: v for k, v in context["scorer"].items() if k != "_target_"},
            "reference": reference.name_or_path if reference else None,
            "protocol": {"name": cfg.protocol.name, "toxicity_threshold": cfg.protocol.toxicity_threshold, "empty": cfg.protocol.empty_continuations},
            "runtime": context["runtime"],
        }
    )
    run = GridRun(cfg, settings, seeds, names, prompts, scorer, targets, methods, reference, context, described, store, Path(cfg.paths.output_dir), meta)
    run.neutral, run.capability = Neutral.of(cfg.get("neutral"), held_out_texts), capability
    return run


def target_specs(cfg: DictConfig) -> dict[str, ModelSpec]:
    names = cfg.get("target_names") or list(cfg.targets)
    names = [n.strip() for n in names.split(",")] if isinstance(names, str) else list(names)
    unknown = [n for n in names if n not in cfg.targets]
    if unknown:
        raise ValueError(f"target_names has {unknown[0]!r}, which is not in targets; expected some of {sorted(cfg.targets)}")
    return {name: as_spec(instantiate(cfg.targets[name])) for name in names}


def run_target(run: GridRun, name: str) -> None:
    """Every cell of one target: reused when stored, else generated (the target is loaded only then)."""
    target_lm = reference = None
    bound: set[str] = set()
    rank_zero = rank_zero_only.rank == 0  # under DDP (subprocess launch) every rank runs this function
    target = target_identity(run, name)

    def ready(method: Method) -> TargetLM:
        """The target and the method bound to it, loaded on first need: a fully finished target loads nothing."""
        nonlocal target_lm, reference
        if target_lm is None:
            target_lm = TargetLM(*run.models.get(run.targets[name]), prompt_format=run.cfg.prompt_format, name=name)
            reference = build_reference(run)
        if method.name not in bound:
            method.bind(name, target_lm, run.models)
            bound.add(method.name)
        return target_lm

    for method in run.methods:
        for alpha in method.alphas:
            for seed in run.seeds:
                identity = method.identity(name, alpha)
                cell = cell_of(run, name, target, method, identity, alpha, seed)
                cell_dir = run.store / cell.name
                cell_dir.mkdir(parents=True, exist_ok=True)
                neutral = capability = None
                setting = sha256_json([name, target, Method.name if identity is None else method.name, identity, alpha])  # seeds share extras
                # One job per cell (parallel jobs may share one, e.g. alpha = 0); under DDP only rank 0
                # locks, the other ranks follow it through the predict loop's barriers.
                with file_lock(cell_dir / ".lock", enabled=rank_zero):
                    rows = stored_rows(cell_dir)
                    if not rank_zero_decides(rows is not None):
                        module = EvaluationModule(ready(method), method, cell, run.settings, run.scorer, reference, cell_dir)
                        description = {"target_model": run.targets[name].name_or_path, "identity": identity}
                        rows = run_cell(run.cfg.trainer, cell, cell_dir, module, run.prompts, description)
                        run.computed += 1
                    else:
                        run.reused += 1
                        log.info("cell %s: reused from %s", cell.name, cell_dir)
                    if rank_zero and run.neutral is not None:  # a reused cell that lacks them gets them here, without generating
                        neutral = run.neutral.for_cell(cell_dir, lambda m=method: ready(m), method, alpha, run.neutral_memo, setting)
                    if rank_zero and run.capability is not None:  # the same for the capability tasks
                        capability = run.capability.for_cell(cell_dir, lambda m=method: ready(m), method, alpha, setting)
                if rank_zero:
                    add_to_grid(run, cell, rows, described(run, target, method, identity, alpha), neutral, capability)
    if run.targets[name] != run.reference:  # one target in memory at a time; calibration model and reference stay
        run.models.release(run.targets[name])


def target_identity(run: GridRun, name: str) -> dict:
    """What decides a target's outputs: its weights' fingerprint, resolved dtype and device."""
    return {"weights": fingerprint(run.targets[name]), **runtime_identity(run.targets[name])}


def cell_of(run: GridRun, name: str, target: dict, method: Method, identity: dict | None, alpha: float, seed: int) -> Cell:
    """The cell of (target, method, alpha, seed), keyed by everything that decides its rows (`identity`: the method's for it)."""
    key = cell_key(target, method.name, identity, alpha, seed, run.context)
    setting = setting_key(target, method.name, identity, alpha, run.context)
    return Cell(name, method.name, alpha, seed, key, identity is None, method.role, setting)


def described(run: GridRun, target: dict, method: Method, identity: dict | None, alpha: float) -> dict:
    """A cell's setting as flat, readable keys: `setting` (the method, its strength and its knobs) and
    `context` (target weights, prompts, decoding, scorer, ...): a report labels settings by the keys that vary."""
    alone = identity is None
    name = Method.name if alone else method.name
    return {
        "setting": {"method": name, "alpha": alpha} | flat(identity or {}, name),
        "context": flat({"target": {"weights": target["weights"], "dtype": target.get("dtype")}}) | run.described,
    }


def rank_zero_decides(flag: bool) -> bool:
    """Under DDP, rank 0's answer for every rank (a shared store seen at different moments must not
    split the ranks: they would hang in different collectives)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        box = [flag]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return flag


def build_reference(run: GridRun) -> ReferenceLM | None:
    if run.reference is None:
        return None
    model, tokenizer = run.models.get(run.reference)
    cfg = run.cfg.reference_lm
    return ReferenceLM(run.reference, batch_size=cfg.batch_size, max_length=cfg.max_length, model=model, tokenizer=tokenizer)


def add_to_grid(run: GridRun, cell: Cell, rows: list[dict], decided_by: dict, neutral: dict | None = None, capability: dict | None = None) -> None:
    protocol = run.cfg.protocol
    names = run.names + [d for d in DIAGNOSTICS if d not in run.names]
    metrics = cell_metrics(rows, names, protocol.toxicity_threshold, run.cfg.bootstrap_resamples, protocol.empty_continuations, run.settings.max_new_tokens)
    row = (
        {
            "target": cell.target,
            "method": cell.method,
            "alpha": cell.alpha,
            "seed": cell.seed,
            "setting": run.cfg.get("setting") or "",
            "protocol": protocol.name,
            "scorer": run.scorer.name,
            **metrics,
            "degenerate": is_degenerate(metrics, **protocol.degenerate),
            **neutral_columns(neutral, run.cfg.bootstrap_resamples),
            **capability_columns(capability, run.cfg.bootstrap_resamples),
            "peak_memory_mb": stored_description(run.store / cell.name).get("peak_memory_mb"),
            "target_alone": cell.target_alone,
            "role": cell.role,
            "cell": cell.name,
            "setting_key": cell.setting,  # what a report groups by: cells that share it are seeds of one setting
            "decided_by": decided_by,  # the same, readable: what labels the setting where reports span several
        }
        | ({"neutral": neutral} if neutral else {})
        | ({"capability": capability} if capability else {})
    )  # per text / item: grid.json, not CSV
    run.grid.append(row)
    run.generations.append(rows)
    toxicity = toxicity_metric(run.names)
    if toxicity:  # every setting against the target alone of this run, on the same prompts
        options = {"toxicity": toxicity, "empty": protocol.empty_continuations, "threshold": protocol.toxicity_threshold}
        annotate_grid(run.grid, run.generations, options, run.cfg.bootstrap_resamples)
    annotate_quality(run.grid, run.generations, run.cfg.bootstrap_resamples)
    annotate_capability(run.grid, run.cfg.bootstrap_resamples)
    write_grid(run.output_dir, run.grid, run.generations, run.meta)
    log.info("cell %s: %s", cell.name, ", ".join(f"{n} {row[n]:.3g}" for n in run.names))


@task_wrapper
def evaluate(cfg: DictConfig) -> dict:
    run = prepare(cfg)
    run.output_dir.mkdir(parents=True, exist_ok=True)
    if rank_zero_only.rank == 0:
        write_prompt_scores(run.output_dir, run.prompts)  # the report's prompt subsets; not part of any cell
    started = time.time()
    for name in run.targets:
        run_target(run, name)
    if rank_zero_only.rank != 0:
        return {}
    note = run.scorer.note
    table = format_table(run.grid, run.names)
    log.info("grid (%s protocol, %d prompts)%s:\n%s", cfg.protocol.name, len(run.prompts), f"; {note}" if note else "", table)
    write_text(run.output_dir / "grid.md", table + "\n" + (f"\n{note}\n" if note else ""))
    knobs = dict(cfg.get("knobs") or {}) or sweep_knobs()
    logger_cfg = cfg.get("logger")
    name = cfg.get("setting") or sweep_name()
    if logger_cfg and logger_cfg.get("wandb") and logger_cfg.wandb.get("name") is None and name:
        with open_dict(cfg):
            logger_cfg.wandb.name = name  # the run is named after what sets it apart in the dashboard
    grid_samples = sample_rows(run.generations, cfg.samples_per_cell)
    log_grid(instantiate_group(logger_cfg, "logger"), run.grid, grid_samples, run.names, resolved_config(cfg), note, knobs)
    summary = {
        "cells": len(run.grid),
        "computed": run.computed,
        "reused": run.reused,
        "seconds": round(time.time() - started, 1),
        "grid": str(run.output_dir / "grid.csv"),
    }
    write_json(run.output_dir / "evaluate.json", {**summary, **run.meta})
    return summary
