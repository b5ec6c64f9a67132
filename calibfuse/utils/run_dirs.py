"""One job per run dir: a Hydra run dir (or a multirun's job dir) that holds an earlier job is refused before
Hydra overwrites its .hydra/, unless this job goes on in it; each job records itself in the dir's run.json.
docs/operations.md ("Run dirs") states the rules."""

from __future__ import annotations

import json
import logging
import os
import socket
from datetime import datetime
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from calibfuse.utils.checks import leaves
from calibfuse.utils.files import sha256_json, write_json
from calibfuse.utils.ranks import launched_rank

log = logging.getLogger(__name__)

RUN_RECORD = "run.json"  # written into each job's dir at its start (status running) and end (finished | failed)
GOES_ON = ("pipeline", "report", "corpus")  # rebuilt from their stores and inputs: the same config goes on in its dir
FROM_CHECKPOINT = ("pretrain", "align", "fusion_head", "steer")  # go on in their dir only to resume: with ckpt_path set


def a(word: str) -> str:
    return ("an " if word[:1] in "aeiou" else "a ") + word


def earlier_job(directory: Path) -> dict | None:
    """What a dir holds of an earlier Hydra job: its run.json, .hydra/config.yaml and overrides; None if none."""
    record_path, hydra_dir = directory / RUN_RECORD, directory / ".hydra"
    if not record_path.is_file() and not (hydra_dir / "config.yaml").is_file():
        return None
    found: dict[str, Any] = {"record": {}, "config": None, "overrides": None}
    for key, path, read in (
        ("record", record_path, lambda p: json.loads(p.read_text(encoding="utf-8"))),
        ("config", hydra_dir / "config.yaml", lambda p: OmegaConf.to_container(OmegaConf.load(p), resolve=False)),
        ("overrides", hydra_dir / "overrides.yaml", lambda p: [str(o) for o in OmegaConf.load(p)]),
    ):
        try:
            found[key] = read(path) if path.is_file() else found[key]
        except Exception:  # noqa: BLE001 - an unreadable record counts as an earlier run of unknown config
            pass
    found["record"] = found["record"] if isinstance(found["record"], dict) else {}
    return found


def job_state(directory: Path, record: dict, task: str) -> str:
    """running | interrupted | failed | finished. A dir from before run.json: finished if it holds its task's summary."""
    status = record.get("status")
    if status == "running":
        return "running" if process_alive(record) else "interrupted"
    if status in ("finished", "failed"):
        return status
    return "finished" if (directory / f"{task}.json").is_file() else "interrupted"


def process_alive(record: dict) -> bool:
    """Whether the process that wrote a run.json still runs (on this host; one on another host cannot be asked)."""
    import psutil

    if record.get("host") != socket.gethostname():
        return False
    try:
        return abs(psutil.Process(int(record["pid"])).create_time() - float(record["pid_started"])) < 1
    except (psutil.Error, KeyError, TypeError, ValueError):
        return False


def config_changes(before: dict, after: dict, shown: int = 4) -> list[str]:
    """The dotted keys whose values differ between two plain configs (ckpt_path aside), as `key: old -> new`."""
    old, new = ({where: value for where, _, value in leaves(c) if where != "ckpt_path"} for c in (before, after))

    def short(value: Any) -> str:
        text = repr(value)
        return text if len(text) <= 40 else text[:37] + "..."

    changed = sorted(k for k in old.keys() | new.keys() if old.get(k, "<unset>") != new.get(k, "<unset>"))
    listed = [f"{k}: {short(old.get(k, '<unset>'))} -> {short(new.get(k, '<unset>'))}" for k in changed[:shown]]
    return listed + ([f"and {len(changed) - shown} more"] if len(changed) > shown else [])


def run_dir_verdict(directory: Path, key: str, task: str, config: dict | None, overrides: list[str] | None, from_checkpoint: bool) -> str | None:
    """Whether a job may run in `directory`: None if it holds no earlier job; a note (to log) if this job goes
    on in it; else SystemExit naming the dir. Compared by config (a run) or by overrides (a multirun's job)."""
    earlier = earlier_job(directory)
    if earlier is None:
        return None
    record = earlier["record"]
    earlier_task = record.get("task") or (earlier["config"] or {}).get("task_name") or "unknown"
    state = job_state(directory, record, earlier_task)

    def refuse(what: str, hint: str = "") -> None:
        raise SystemExit(
            f"Error: {key}: {str(directory)!r} already holds {what}; refusing to run into it: its .hydra/, log and results would be "
            f"replaced or mixed with this run's. Expected another {key.split(' ')[0]}{hint}, or {str(directory)!r} removed or moved first"
        )

    if earlier_task != task:
        refuse(f"a run of calibfuse.{earlier_task} ({state})")
    if state == "running":
        refuse(f"{a(task)} run that is still running (pid {record.get('pid')})")
    if task in FROM_CHECKPOINT:
        if from_checkpoint:
            return f"{directory}: going on from ckpt_path in the {state} {task} run it holds"
        refuse(f"{a(state)} {task} run", "; or, to resume its training there, ckpt_path=last")
    if config is not None and earlier["config"] is not None:
        changes = config_changes(earlier["config"], config)
    elif config is not None and "config_sha256" in record:  # a job that wrote no .hydra/ (hydra.output_subdir=null)
        changes = [] if record["config_sha256"] == config_sha256(config) else ["its config's sha256 differs"]
    elif overrides is not None and earlier["overrides"] is not None:
        changes = [f"overrides {earlier['overrides']} -> {overrides}"] if sorted(earlier["overrides"]) != sorted(overrides) else []
    else:
        changes = ["its config is not recorded"]
    if changes:
        refuse(f"{a(state)} {task} run of another config ({'; '.join(changes)})")
    if task in GOES_ON or state != "finished":
        return f"{directory} holds {a(state)} {task} run of the same config: going on in it"
    hint = " (finished cells are reused from cell_store)" if task == "evaluate" else ""
    refuse(f"a finished {task} run of the same config", hint)
    return None


def config_sha256(config: dict) -> str:
    return sha256_json({k: v for k, v in config.items() if k != "ckpt_path"})


def sweep_jobs(config: DictConfig) -> list[list[str]] | None:
    """Each job's overrides, as Hydra's basic sweeper will make them; None for another sweeper or job subdir."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    sweeper = OmegaConf.to_container(config.hydra.sweeper, resolve=False)
    subdir = OmegaConf.to_container(config.hydra.sweep, resolve=False).get("subdir")
    if not str(sweeper.get("_target_", "")).endswith("BasicSweeper") or subdir != "${hydra.job.num}":
        return None
    arguments = [f"{k}={v}" for k, v in (sweeper.get("params") or {}).items()] + list(OmegaConf.to_container(config.hydra.overrides.task, resolve=False))
    return [job for batch in BasicSweeper.split_arguments(OverridesParser.create().parse_overrides(arguments), None) for job in batch]


class OneRunPerDir(Callback):
    """Hydra callback (conf/hydra/default.yaml): a run dir, or a multirun's job dir, that holds an earlier job is
    refused before Hydra overwrites its .hydra/, unless this job goes on in it (run_dir_verdict); each job
    records its task, config and status in run.json. A launcher's other ranks (same dir) are left alone."""

    def __init__(self) -> None:
        self.notes: list[str] = []

    @staticmethod
    def directory(config: DictConfig, key: str) -> Path | None:
        """The dir `key` names, or None when ${run_id:} makes it new (read unresolved: Hydra resolves it once)."""
        _, group, name = key.split(".")
        text = str(OmegaConf.to_container(config.hydra[group], resolve=False)[name])
        return None if "${run_id:" in text else Path(str(OmegaConf.select(config, key))).expanduser()

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.notes = []
        directory = self.directory(config, "hydra.run.dir")
        if directory is None or launched_rank() > 0:
            return
        task_config = {k: v for k, v in OmegaConf.to_container(config, resolve=False).items() if k != "hydra"}
        note = run_dir_verdict(directory, "hydra.run.dir", str(config.task_name), task_config, None, config.get("ckpt_path") is not None)
        self.notes = [note] if note else []

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        sweep = self.directory(config, "hydra.sweep.dir")
        jobs = sweep_jobs(config) if sweep is not None and launched_rank() == 0 else None
        for number, overrides in enumerate(jobs or []):
            resuming = config.get("ckpt_path") is not None or any(o.startswith("ckpt_path=") and o != "ckpt_path=null" for o in overrides)
            key = f"hydra.sweep.dir (job {number})"
            note = run_dir_verdict(sweep / str(number), key, str(config.task_name), None, overrides, resuming)
            if note:
                log.info("%s", note)

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        if launched_rank() > 0:
            return
        import psutil

        for note in self.notes:
            log.info("%s", note)
        task_config = {k: v for k, v in OmegaConf.to_container(config, resolve=False).items() if k != "hydra"}
        self.record = {
            "task": str(config.task_name),
            "status": "running",
            "started": datetime.now().isoformat(timespec="seconds"),
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "pid_started": psutil.Process().create_time(),
            "config_sha256": config_sha256(task_config),
        }
        self.path = Path(config.hydra.runtime.output_dir) / RUN_RECORD
        write_json(self.path, self.record)

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        from hydra.core.utils import JobStatus

        if getattr(self, "path", None) is None:
            return
        failed = job_return.status != JobStatus.COMPLETED
        error = getattr(job_return, "_return_value", None) if failed else None
        ended = {"status": "failed" if failed else "finished", "ended": datetime.now().isoformat(timespec="seconds")}
        write_json(self.path, {**self.record, **ended, **({"error": f"{type(error).__name__}: {error}"[:500]} if error is not None else {})})
        self.path = None
