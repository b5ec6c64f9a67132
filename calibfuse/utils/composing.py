"""Each stage's config as the pipeline composes it: its entry point's config (conf/<stage>.yaml) with the
pipeline's knobs and `<stage>_overrides`, and the user's `hydra.searchpath` passed on. The pipeline runs
them; calibfuse.plan reads them without running anything."""

from __future__ import annotations

from pathlib import Path

from hydra import compose
from omegaconf import DictConfig, open_dict


def stage_overrides(cfg: DictConfig) -> dict[str, list[str]]:
    """The pipeline's knobs as overrides of each entry point's config, then the extra overrides."""
    knobs = {
        "pretrain": [f"module.num_layers={cfg.calibration_layers}", f"seed={cfg.train_seed}"],
        "align": [
            f"seed={cfg.train_seed}",
            f"alignment.num_negatives={cfg.num_negatives}",
            f"alignment.matching={cfg.matching}",
            f"alignment.embedding_source={cfg.embedding_source}",
        ],
        "fusion_head": [
            f"seed={cfg.train_seed}",
            f"alpha={cfg.fusion_head_alpha}",
            f"fusion.layer_norm={cfg.layer_norm}",
            f"fusion.scale={cfg.scale}",
            f"init={cfg.fusion_head_init}",
        ]
        + ([f"objective={cfg.fusion_head_objective}"] if cfg.get("fusion_head_objective") else []),  # null: no group, the faithful head's key
        "steer": [f"seed={cfg.train_seed}"],
        "evaluate": [f"alphas=[{','.join(str(a) for a in cfg.alphas)}]", f"methods=[{','.join(cfg.method_names)}]", f"prompts={cfg.prompt_set}"]
        + [f"fusion.{knob}={cfg[knob]}" for knob in ("layer_norm", "calibration_context", "alignment", "scale")]
        + [f"cell_store={cfg.cell_store}"]
        + ([f"prompts.sample={cfg.prompt_sample}"] if cfg.get("prompt_sample") else []),
    }
    if cfg.get("seeds"):
        knobs["evaluate"].append(f"seeds=[{','.join(str(s) for s in cfg.seeds)}]")
    return {stage: knobs[stage] + list(cfg.get(f"{stage}_overrides") or []) for stage in knobs}


def searchpath_override() -> list[str]:
    """The pipeline's own `hydra.searchpath` (config folders of the user's: their targets, prompts,
    scorers), passed on to every stage it composes."""
    from hydra.core.hydra_config import HydraConfig

    paths = list(HydraConfig.get().searchpath) if HydraConfig.initialized() else []
    return [f"hydra.searchpath=[{','.join(paths)}]"] if paths else []


def compose_config(name: str, overrides: list[str]) -> DictConfig:
    return compose(config_name=name, overrides=[*searchpath_override(), *overrides])


def compose_stage(name: str, overrides: list[str]) -> DictConfig:
    cfg = compose_config(name, overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = "<stage dir>"  # set per stage; never part of a key
    return cfg


def evaluate_overrides(targets: list[str], alignments: dict, calibration: Path, cfg: DictConfig, extra: list[str]) -> list[str]:
    """Evaluate every pipeline target: the embedded ones are in evaluate.yaml's targets already,
    others are added from conf/target/ under targets.<name>."""
    built_in = set(compose_config("evaluate", []).targets)
    result = [f"+target@targets.{t}={t}" for t in targets if t not in built_in]
    result.append(f"target_names=[{','.join(targets)}]")
    for target, path in alignments.items():
        result.append(f"{'' if target in built_in else '+'}alignments.{target}={path}")
    if cfg.alignment == "identity":
        result.append(f"calibration_model={{name_or_path:'{calibration}'}}")
    return result + neutral_overrides(compose_config("pretrain", stage_overrides(cfg)["pretrain"]).data) + extra


# What decides stage 1's held-out split: the neutral-text perplexity reads its rows (calibfuse.evaluation.quality).
SPLIT_KEYS = ("path", "hf_name", "split", "prompt_columns", "completion_column", "data_types", "load_kwargs", "corpus", "max_examples", "val_fraction", "seed")


def neutral_overrides(data: DictConfig) -> list[str]:
    """The grid's neutral texts from the held-out split of the pipeline's own stage 1 (its data settings)."""
    from omegaconf import OmegaConf

    values = OmegaConf.to_container(data, resolve=True)
    return [f"++neutral.data.{k}={as_override(values.get(k))}" for k in SPLIT_KEYS]


def as_override(value) -> str:
    """A value in Hydra's override grammar: strings quoted, lists and mappings nested."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(as_override(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{as_override(v)}" for k, v in value.items()) + "}"
    return "'" + str(value).replace("\\", "\\\\").replace("'", "\\'") + "'"
