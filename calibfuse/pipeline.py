"""The whole method in one command: pretrain -> align (once per target) -> evaluate -> report.

    python -m calibfuse.pipeline                                   # the embedded demo (README main job)
    python -m calibfuse.pipeline "alphas=[0,0.1,0.3,0.5,0.7]"       # reuses stages 1-2, computes the new cells
    python -m calibfuse.pipeline -m calibration_layers=1,3,6        # an ablation: one job per setting
    python -m calibfuse.pipeline experiment=paper_table             # the paper's table (GPUs, the hub)

Each stage composes its own entry point's config (conf/pretrain.yaml, align.yaml, evaluate.yaml)
from the pipeline's knobs plus any extra overrides (`pretrain_overrides`, ...). A stage's artifact
lives in `stage_store/<stage>-<hash>/`, keyed by its resolved config and its inputs' keys, so a
rerun after a crash or with a new alpha grid skips finished stages; an interrupted training stage
resumes from its last checkpoint; an artifact found incomplete, or changed since it was built (the
sha256 of its files, recorded in stage.json when the stage finished, is checked on every reuse), is set
aside (renamed, not deleted) and rebuilt, with a warning that names the file. Evaluation cells are reused the same way
(calibfuse.evaluate's cell store).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from calibfuse.align import align
from calibfuse.evaluation.grid import evaluate
from calibfuse.fusion_head import train_fusion_head
from calibfuse.methods import role_of
from calibfuse.pretrain import pretrain
from calibfuse.reporting.report import build_report, log_summary, plain, printable
from calibfuse.reporting.verdict import HELD_OUT, checked_confirm, checked_goal, names
from calibfuse.steer import train_steer
from calibfuse.utils.checks import check_accelerator, check_output_dir, check_required
from calibfuse.utils.composing import compose_config, compose_stage, evaluate_overrides, stage_overrides
from calibfuse.utils.files import file_lock, sha256_file, sha256_json, write_json
from calibfuse.utils.ranks import distributed, launched_rank, leave_process_group, wait_for_rank_zero
from calibfuse.utils.run import stop_on_sigterm
from calibfuse.utils.sweeps import sweep_setting

log = logging.getLogger(__name__)

STAGES = ("pretrain", "align", "evaluate", "report")
# Keys that never change a stage's artifact: where it is written, how it is logged.
# The pipeline's knobs: what a setting is made of (logged as flat W&B config keys by the grid).
KNOBS = (
    "targets",
    "alphas",
    "method_names",
    "seeds",
    "prompt_set",
    "prompt_sample",
    "train_seed",
    "calibration_layers",
    "num_negatives",
    "matching",
    "embedding_source",
    "alignment",
    "layer_norm",
    "calibration_context",
    "scale",
    "fusion_head",
    "fusion_head_alpha",
    "fusion_head_init",
    "fusion_head_objective",
)
VOLATILE_KEYS = ("paths", "logger", "callbacks", "tags", "ckpt_path", "task_name")
DECIDING_CALLBACKS = ("early_stopping",)  # callbacks that decide when training stops, so what it makes: keyed


def stage_key(cfg: DictConfig, inputs: dict | None = None) -> str:
    """sha256 of the resolved stage config (without volatile keys) and its inputs' keys."""
    content = OmegaConf.to_container(cfg, resolve=False)  # unresolved: output paths must not change the key
    deciding = {name: c for name, c in (content.get("callbacks") or {}).items() if name in DECIDING_CALLBACKS}
    for key in VOLATILE_KEYS:
        content.pop(key, None)
    if deciding:
        content["callbacks"] = deciding
    trainer = content.get("trainer") or {}
    trainer.pop("default_root_dir", None)
    return sha256_json({"config": content, "inputs": inputs or {}})


ARTIFACTS = {"pretrain": "calibration_model", "align": "alignment", "fusion_head": "alignment", "steer": "steer"}  # a stage's exported files


def artifact_hashes(stage: str, directory: Path) -> dict[str, str]:
    """sha256 of every exported file of a stage (its safetensors, config and tokenizer JSON, manifest), by
    path relative to the stage dir. Lightning's checkpoints are not hashed: they are not reused, only resumed."""
    root = directory / ARTIFACTS[stage]
    return {str(path.relative_to(directory)): sha256_file(path) for path in sorted(root.rglob("*")) if path.is_file()}


def stage_problem(stage: str, directory: Path) -> tuple[str | None, dict]:
    """Why a finished stage dir cannot be reused (None if it can) and its stage.json. A stage that recorded
    the sha256 of its files is checked against them; one built before stages recorded them is read whole."""
    try:
        record = json.loads((directory / "stage.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        return f"stage.json cannot be read ({type(error).__name__}: {error})", {}
    recorded = record.get("sha256") if isinstance(record, dict) else None
    if not isinstance(recorded, dict):
        return artifact_problem(stage, directory), record if isinstance(record, dict) else {}
    for name, digest in recorded.items():
        path = directory / name
        if not path.is_file():
            return f"{path} is missing", record
        if sha256_file(path) != digest:
            return f"{path} does not match the sha256 recorded when the stage finished", record
    return None, record


def artifact_problem(stage: str, directory: Path) -> str | None:
    """Why a stage dir does not hold a usable artifact, or None if it does."""
    from safetensors import safe_open

    if stage == "pretrain":
        required = ["calibration_model/manifest.json", "calibration_model/config.json", "calibration_model/model.safetensors"]
        weights, tensor = directory / "calibration_model" / "model.safetensors", None
    elif stage == "steer":
        required, weights, tensor = ["steer/steer.json", "steer/steer.safetensors"], directory / "steer" / "steer.safetensors", "W"
    else:
        required = ["alignment/alignment.json", "alignment/alignment.safetensors"]
        weights, tensor = directory / "alignment" / "alignment.safetensors", "A"
    missing = [r for r in required if not (directory / r).is_file()]
    if missing:
        return f"missing {', '.join(missing)}"
    try:
        with safe_open(str(weights), framework="pt") as f:
            names = list(f.keys())
            if tensor is not None and tensor not in names:
                return f"{weights.name} has no tensor {tensor!r}"
            for name in names:
                f.get_tensor(name)  # reads every tensor: a truncated file fails here
    except Exception as e:  # noqa: BLE001 - any failure to read the weights means: rebuild
        return f"{weights.name} cannot be read ({type(e).__name__}: {e})"
    return None


def run_stage(stage: str, cfg: DictConfig, store: Path, inputs: dict | None, task) -> tuple[Path, str, bool]:
    """Reuse the stage's artifact if it is there and sound; else (re)build it. Returns (dir, key, reused).
    Parallel jobs that need the same stage wait for the one building it (a lock file beside it).
    Under a launcher that runs this script once per rank (`strategy=ddp`, SLURM, torchrun) only rank 0
    takes the lock and writes the artifact: the other ranks join a distributed stage's training without
    the lock, and wait for rank 0's artifact of any other stage."""
    key = stage_key(cfg, inputs)
    directory = store / f"{stage}-{key[:12]}"
    store.mkdir(parents=True, exist_ok=True)
    if launched_rank() > 0:
        if (directory / "stage.json").is_file() and stage_problem(stage, directory)[0] is None:
            return directory, key, True
        if not distributed(cfg):
            return wait_for_rank_zero(stage, directory), key, True
        with open_dict(cfg):
            cfg.paths.output_dir = str(directory)
            cfg.ckpt_path = str(directory / "checkpoints" / "last.ckpt") if (directory / "checkpoints" / "last.ckpt").is_file() else cfg.get("ckpt_path")
        task(cfg)  # rank 0 exports and records the artifact
        leave_process_group()
        return directory, key, False
    with file_lock(store / f".{directory.name}.lock"):
        built = _run_stage(stage, cfg, directory, key, inputs, task)
    if distributed(cfg):
        leave_process_group()
    return built


def _run_stage(stage: str, cfg: DictConfig, directory: Path, key: str, inputs: dict | None, task) -> tuple[Path, str, bool]:
    if (directory / "stage.json").is_file():
        problem, record = stage_problem(stage, directory)
        if problem is None:
            if "sha256" not in record:  # built before stages recorded their files' sha256: read whole just now, so recorded as they are
                write_json(directory / "stage.json", {**record, "sha256": artifact_hashes(stage, directory)})
                log.info("stage %s: %s recorded no sha256 of its files (built before stages did); recorded them now", stage, directory)
            log.info("stage %s: reusing %s", stage, directory)
            return directory, key, True
        aside = directory.with_name(f"{directory.name}.broken-{time.strftime('%Y%m%d-%H%M%S')}")
        directory.rename(aside)
        log.warning("stage %s: the artifact in %s is unusable (%s); moved it to %s and rebuilding the stage", stage, directory, problem, aside)
    with open_dict(cfg):
        cfg.paths.output_dir = str(directory)
        last = directory / "checkpoints" / "last.ckpt"
        if last.is_file():  # a crash mid-training: continue from the last checkpoint
            log.info("stage %s: resuming from %s", stage, last)
            cfg.ckpt_path = str(last)
    log.info("stage %s: building in %s", stage, directory)
    started = time.time()
    metrics = task(cfg)
    seconds = round(time.time() - started, 1)
    hashes = artifact_hashes(stage, directory)  # checked whenever the stage is reused
    write_json(directory / "stage.json", {"stage": stage, "key": key, "inputs": inputs or {}, "seconds": seconds, "metrics": metrics, "sha256": hashes})
    return directory, key, False


def pipeline(cfg: DictConfig) -> dict:
    check_required(cfg)
    output_dir, store = Path(cfg.paths.output_dir), Path(cfg.stage_store)
    overrides = stage_overrides(cfg)
    targets = [cfg.targets] if isinstance(cfg.targets, str) else list(cfg.targets)
    started = time.time()

    if cfg.until not in STAGES:
        raise ValueError(f"until={cfg.until!r}; expected one of {list(STAGES)}")
    if cfg.scale == "learned" and not (cfg.fusion_head and cfg.alignment == "learned"):
        raise ValueError("scale=learned uses the gain a fusion head trains; expected fusion_head=true (and alignment=learned)")
    if cfg.layer_norm == "affine" and not (cfg.fusion_head and cfg.alignment == "learned"):
        raise ValueError("layer_norm=affine uses the LayerNorm weights a fusion head trains; expected fusion_head=true (and alignment=learned)")
    if cfg.fusion_head_init != "stage2" and not cfg.fusion_head:
        raise ValueError(f"fusion_head_init={cfg.fusion_head_init!r} sets where a fusion head's A starts; expected fusion_head=true with it")
    if cfg.get("fusion_head_objective") and not cfg.fusion_head:
        raise ValueError(f"fusion_head_objective={cfg.fusion_head_objective!r} sets how a fusion head trains; expected fusion_head=true with it")
    if cfg.steer != ("lm_steer" in cfg.method_names) and not any("lm_steer.steers" in o for o in cfg.evaluate_overrides):
        raise ValueError('steer=true trains steers for method lm_steer, and lm_steer needs them; expected both: steer=true "method_names=[...,lm_steer]"')
    goal, confirm, held_out = report_options(cfg) if cfg.until == "report" else (None, None, None)
    check_before_any_stage(cfg, overrides, targets)
    pretrain_dir, pretrain_key, _ = run_stage("pretrain", compose_stage("pretrain", overrides["pretrain"]), store, None, pretrain)
    calibration = pretrain_dir / "calibration_model"
    result = {"pretrain": str(pretrain_dir)}
    alignments = {}
    if cfg.alignment == "learned" and cfg.until != "pretrain":
        for target in targets:
            align_cfg = compose_stage("align", [f"target={target}", f"calibration_model.name_or_path={calibration}", *overrides["align"]])
            directory, align_key, _ = run_stage("align", align_cfg, store, {"pretrain": pretrain_key}, align)
            if cfg.fusion_head:  # the variant: A trained further on the fused LM loss at fusion_head_alpha
                head_cfg = compose_stage("fusion_head", [f"alignment_dir={directory / 'alignment'}", *overrides["fusion_head"]])
                directory, _, _ = run_stage("fusion_head", head_cfg, store, {"align": align_key}, train_fusion_head)
            alignments[target] = directory / "alignment"
    result["alignments"] = {k: str(v) for k, v in alignments.items()}
    steers = {}  # the LM-Steer baseline: one steer per target, for the grid's lm_steer method
    for target in targets if cfg.steer and STAGES.index(cfg.until) >= STAGES.index("evaluate") else []:
        steer_cfg = compose_stage("steer", [f"target={target}", *overrides["steer"]])
        steers[target] = run_stage("steer", steer_cfg, store, None, train_steer)[0] / "steer"
    result |= {"steers": {k: str(v) for k, v in steers.items()}} if steers else {}
    if STAGES.index(cfg.until) >= STAGES.index("evaluate"):
        steer_paths = [f"++methods.lm_steer.steers.{target}={path}" for target, path in steers.items()]
        evaluate_cfg = compose_stage("evaluate", evaluate_overrides(targets, alignments, calibration, cfg, [*steer_paths, *overrides["evaluate"]]))
        if launched_rank() > 0 and not distributed(evaluate_cfg):
            return result  # a single-process grid and its report are rank 0's
        with open_dict(evaluate_cfg):
            evaluate_cfg.paths.output_dir = str(output_dir / "evaluate")
            evaluate_cfg.setting = cfg.get("setting") or sweep_setting()
            evaluate_cfg.knobs = {knob: OmegaConf.to_container(cfg[knob]) if OmegaConf.is_config(cfg[knob]) else cfg[knob] for knob in KNOBS}
        result["evaluate"] = evaluate(evaluate_cfg)
    if launched_rank() > 0:
        return result  # the report and pipeline.json are rank 0's
    if cfg.until == "report":
        report = build_report([output_dir / "evaluate"], output_dir / "report", cfg.report.alpha, goal, confirm, evaluate_cfg.bootstrap_resamples, held_out)
        log_summary(report, report_logger(evaluate_cfg, output_dir / "report"))
        print(f"\n{printable(report)}\n\nplots and LaTeX: {output_dir / 'report'}")
        result["report"] = str(output_dir / "report")
    result["seconds"] = round(time.time() - started, 1)
    write_json(output_dir / "pipeline.json", result)
    return result


def report_logger(evaluate_cfg: DictConfig, out_dir: Path) -> DictConfig | None:
    """The grid's loggers, writing the report's run into the report dir (job type `report`)."""
    logger = evaluate_cfg.get("logger")
    if not logger or "wandb" not in logger:
        return None
    logger = OmegaConf.create({"wandb": OmegaConf.to_container(logger.wandb, resolve=True)})
    logger.wandb.save_dir, logger.wandb.job_type = str(out_dir), "report"
    return logger


def check_before_any_stage(cfg: DictConfig, overrides: dict[str, list[str]], targets: list[str]) -> None:
    """What would fail after stage 1's training fails now: no target, an unknown target name, a GPU
    trainer without a GPU, a stage store that is a file."""
    if not targets and cfg.until != "pretrain":
        raise ValueError(f"targets=[] with until={cfg.until}; expected at least one conf/target/ name, e.g. targets=[gemma3-270m] (or until=pretrain)")
    check_output_dir(cfg.stage_store, "stage_store")
    pretrain_cfg = compose_config("pretrain", overrides["pretrain"])
    check_accelerator(pretrain_cfg.trainer, "pretrain_overrides: trainer")
    if cfg.until != "pretrain":
        for target in targets:  # an unknown name fails here, with Hydra's list of conf/target/ options
            align_cfg = compose_config("align", [f"target={target}", *overrides["align"]])
            check_accelerator(align_cfg.trainer, "align_overrides: trainer")
            if cfg.alignment == "learned":
                check_alignment_validates(align_cfg, pretrain_cfg.base_model)
    if STAGES.index(cfg.until) >= STAGES.index("evaluate"):
        check_accelerator(compose_config("evaluate", overrides["evaluate"]).trainer, "evaluate_overrides: trainer")


def check_alignment_validates(align_cfg: DictConfig, base_model: DictConfig) -> None:
    """align_overrides that end stage 2 before its held-out check (e.g. trainer.max_steps=2) fail now, not
    after stage 1: the check needs the shared vocabulary's size, so both tokenizers load, only for such a trainer."""
    from calibfuse.models.loading import load_tokenizer
    from calibfuse.models.vocabulary import shared_vocabulary
    from calibfuse.stages.align import check_validates, split_vocabulary

    trainer = align_cfg.trainer
    if (trainer.get("max_steps") or -1) <= 0 and trainer.get("limit_val_batches") != 0:
        return  # whole epochs: it validates at each epoch's end
    calibration, target = (load_tokenizer(instantiate(spec)) for spec in (base_model, align_cfg.target))  # stage 1 keeps its base's tokenizer
    train, _ = split_vocabulary(len(shared_vocabulary(calibration, target, align_cfg.alignment.matching)), align_cfg.alignment.val_fraction, align_cfg.seed)
    check_validates(trainer, len(train), align_cfg.alignment.batch_size, "align_overrides: trainer")


def report_options(cfg: DictConfig) -> tuple[dict | None, dict | str | None, object | None]:
    """The report's goal, confirmation and held-out scorer, checked before any stage: a bad key, a
    held_out confirmation of several alphas or a scorer that cannot load fails now, not after the grid."""
    goal, confirm = checked_goal(plain(cfg.report.get("goal"))), checked_confirm(plain(cfg.report.get("confirm")))
    judged = [m for m in cfg.method_names if role_of({"method": m}) == "method"] if goal["method"] is None else sorted(names(goal["method"]))
    fixed = [f"{m} α={a:g}" for m in judged for a in cfg.alphas if a > 0]
    if confirm == HELD_OUT and len(fixed) > 1:
        raise ValueError(f"report.confirm={HELD_OUT} judges one setting per target, fixed before the run; this run has {len(fixed)}: {fixed}")
    return goal, confirm, instantiate(cfg.report.held_out_scorer) if cfg.report.get("held_out_scorer") else None


@hydra.main(version_base="1.3", config_path="../conf", config_name="pipeline")
def main(cfg: DictConfig) -> None:
    with stop_on_sigterm():  # also between stages
        pipeline(cfg)


if __name__ == "__main__":
    main()
