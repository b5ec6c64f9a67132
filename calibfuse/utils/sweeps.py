"""A multirun job's view of its sweep: the overrides that set it apart (typed, for W&B config keys), the
keys the sweep varies, and the names reports and W&B give the job from them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from calibfuse.utils.run import multirun_job


def sweep_setting() -> str:
    """In a multirun, the job's own overrides (e.g. `calibration_layers=1`): the label reports group by."""
    job = multirun_job()
    return job.job.override_dirname if job is not None else ""


def typed(value: str) -> Any:
    """An override's value as YAML reads it (0.3 -> float, [0,0.3] -> list, none -> 'none'): W&B config keys a
    dashboard can sort, filter and plot."""
    import yaml

    try:
        return yaml.safe_load(value)
    except yaml.YAMLError:
        return value


def sweep_knobs() -> dict[str, Any]:
    """In a multirun, the job's own overrides as {key: typed value} (what sets this job apart); else {}."""
    job = multirun_job()
    pairs = (o.split("=", 1) for o in (job.overrides.task if job is not None else []) if "=" in o)
    return {k.lstrip("+~"): typed(v) for k, v in pairs if not k.startswith("hydra.")}


def swept_keys() -> list[str]:
    """In a multirun, the keys the sweep varies (`a=1,2`, `range(...)`, `choice(...)` in its overrides); else []."""
    job = multirun_job()
    launched = Path(job.sweep.dir) / "multirun.yaml" if job is not None else None
    if launched is None or not launched.is_file():
        return []
    from hydra.core.override_parser.overrides_parser import OverridesParser

    task = OmegaConf.load(launched).hydra.overrides.task
    return [o.key_or_group for o in OverridesParser.create().parse_overrides(list(task)) if o.is_sweep_override()]


def sweep_name() -> str | None:
    """A multirun job's W&B name: the values of what its sweep varies (`fusion.layer_norm=none`); None otherwise."""
    knobs, keys = sweep_knobs(), swept_keys()
    return ",".join(f"{k}={knobs[k]}" for k in keys if k in knobs) or None
