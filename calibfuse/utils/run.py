"""Plumbing shared by the entry points: instantiating Hydra groups, secrets, W&B runs, manifests."""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import logging
import os
import re
import secrets
import shlex
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)


# Keys whose values never reach a logger or a manifest (W&B, Perspective and hub credentials).
SECRET_KEY = re.compile(r"(api_?key|secret|password|credentials?|(^|_)(hf|auth|access|api)_?token)$", re.IGNORECASE)


def multirun_job():
    """Hydra's config of this job when it is one job of a multirun; None otherwise (a single run, or
    composed outside a Hydra app: tests, notebooks)."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hydra_cfg = HydraConfig.get()
    except (ImportError, ValueError):
        return None
    return hydra_cfg if hydra_cfg.mode == RunMode.MULTIRUN else None


def run_group(task_name: str) -> str:
    """W&B group of a job: `<task>-<multirun dir name>-<launch time>` for the jobs of one multirun (a sweep
    dir reused by a later launch, as experiments/ablations.sh does, gets a group of its own), `<task>` otherwise."""
    job = multirun_job()
    if job is None:
        return task_name
    launched = Path(job.sweep.dir) / "multirun.yaml"  # written once per launch, before any job starts
    stamp = f"-{datetime.fromtimestamp(launched.stat().st_mtime):%Y%m%d-%H%M%S}" if launched.is_file() else ""
    return f"{task_name}-{Path(job.sweep.dir).name}{stamp}"


OmegaConf.register_new_resolver("run_group", run_group, replace=True)  # used by conf/logger/wandb.yaml


def run_id() -> str:
    """A run dir's name: the start time and 6 random hex digits, so two runs started in the same
    second (parallel jobs, a script's loop) never share a dir and overwrite each other's files."""
    return f"{datetime.now():%Y-%m-%d_%H-%M-%S}_{secrets.token_hex(3)}"


# Cached like Hydra's `now`: every read of hydra.run.dir / sweep.dir in one run gives the same name,
# and Hydra copies the cache to a multirun's jobs, so they share their sweep dir.
OmegaConf.register_new_resolver("run_id", run_id, use_cache=True, replace=True)  # used by conf/hydra/default.yaml


def device_count(devices) -> int | None:
    """How many devices Lightning's `devices` names: a count, a list of ids or "0,1"; None for -1/"auto" (all visible)."""
    if isinstance(devices, str) and "," in devices:
        return len([d for d in devices.split(",") if d.strip()])
    if isinstance(devices, str) and devices.strip().lstrip("-").isdigit():
        devices = int(devices)
    if isinstance(devices, int) and not isinstance(devices, bool):
        return devices if devices > 0 else None
    try:
        return len(list(devices))  # a list of device ids
    except TypeError:
        return None


def accumulation(effective_batch: int, batch_size: int, devices, num_nodes: int = 1) -> int:
    """trainer.accumulate_grad_batches such that data.batch_size x devices x num_nodes x it = effective_batch:
    one effective batch whatever the device count (conf/experiment/paper_pretrain.yaml)."""
    count = device_count(devices)
    if count is None:
        raise ValueError(
            f"trainer.devices={devices!r} does not say how many devices: effective_batch={effective_batch} needs the count to set "
            "trainer.accumulate_grad_batches; expected trainer.devices=<GPUs per node>, e.g. trainer.devices=8"
        )
    per_step = batch_size * count * num_nodes
    if per_step <= 0 or effective_batch % per_step:
        fits = [n for n in range(1, effective_batch // max(batch_size, 1) + 1) if effective_batch % (batch_size * n) == 0]
        raise ValueError(
            f"effective_batch={effective_batch} is not a multiple of data.batch_size={batch_size} x trainer.devices={count} x "
            f"trainer.num_nodes={num_nodes} = {per_step}; expected devices x nodes in {fits}, another data.batch_size, "
            "or trainer.accumulate_grad_batches=<n> set yourself"
        )
    return effective_batch // per_step


OmegaConf.register_new_resolver("accumulation", accumulation, replace=True)  # used by conf/experiment/paper_pretrain.yaml


def redact_secrets(value: Any) -> Any:
    """A copy of a (nested) config mapping with every secret-looking value replaced by '***'."""
    if isinstance(value, dict):
        return {k: ("***" if SECRET_KEY.search(str(k)) and v not in (None, "") else redact_secrets(v)) for k, v in value.items()}
    if isinstance(value, list):
        return [redact_secrets(v) for v in value]
    return value


def resolved_config(cfg: DictConfig) -> dict:
    """The fully resolved config as plain containers, secrets redacted: what gets logged and saved."""
    return redact_secrets(OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False))


def instantiate(config, **kwargs):
    """hydra.utils.instantiate, but a failure inside the target surfaces as the target's own error
    (e.g. the ValueError that names the bad value), not wrapped in an InstantiationException."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate as hydra_instantiate

    try:
        return hydra_instantiate(config, **kwargs)
    except InstantiationException as e:
        cause = e
        while isinstance(cause, InstantiationException) and cause.__cause__ is not None:
            cause = cause.__cause__
        if cause is e:
            raise
        raise cause from None


def instantiate_group(group: DictConfig | None, what: str) -> list:
    """Instantiate every `_target_` entry of a group such as `callbacks` or `logger`; None entries are off."""
    objects = []
    for name, conf in (group or {}).items():
        if conf is None:
            continue
        if not isinstance(conf, DictConfig) or "_target_" not in conf:
            raise ValueError(f"{what} entry {name!r} has no _target_; expected a mapping with a _target_ class path")
        log.info("instantiating %s <%s>", what, conf._target_)
        objects.append(instantiate(conf))
    return objects


def finish_wandb() -> None:
    """Close the W&B run of this job, so each job of a Hydra multirun gets its own run."""
    import sys

    wandb = sys.modules.get("wandb")
    if wandb is not None and wandb.run is not None:
        run = wandb.run
        offline = bool(getattr(run, "offline", False) or run.settings.mode == "offline")
        run_dir = Path(run.dir).parent  # .../wandb/offline-run-<time>-<id>
        wandb.finish()
        hint = f" (offline; upload with `wandb sync {shlex.quote(str(run_dir))}`)" if offline else ""
        log.info("W&B run %s: %s%s", run.id, run_dir if offline else run.url, hint)


class _DropLibraryTips(logging.Filter):
    """Lightning's advertising and hardware chatter, not progress or results."""

    NOISE = ("💡 Tip", "GPU available", "TPU available", "litlogger")

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(n in str(record.msg) for n in self.NOISE)


def quiet_libraries() -> None:
    """Keep runs quiet: progress, results and where files went, not library tips or deprecation noise."""
    import warnings

    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")  # lightning's own pytree use, every predict
    warnings.filterwarnings("ignore", message=r".*does not have many workers.*")  # in-memory prompts: workers cost more than they save
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # "Loading weights" bars for every model load
    os.environ.setdefault("WANDB_SILENT", "true")  # W&B's terminal notes (git root, offline URL, sync hints); finish_wandb says where the run went
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropLibraryTips) for f in logger.filters):
            logger.addFilter(_DropLibraryTips())


def task_wrapper(task: Callable[[DictConfig], dict]) -> Callable[[DictConfig], dict]:
    """Run a task quietly, stopping on SIGTERM; whatever happens, finish its W&B run."""

    @functools.wraps(task)
    def wrapped(cfg: DictConfig) -> dict:
        quiet_libraries()
        try:
            with stop_on_sigterm():
                return task(cfg)
        finally:
            finish_wandb()

    return wrapped


SIGTERM_EXIT = 143  # 128 + SIGTERM, as a shell reports a process that SIGTERM ended


@contextlib.contextmanager
def stop_on_sigterm():
    """SIGTERM (a scheduler's stop, `kill`) ends the run within seconds, with a non-zero exit status, as
    Ctrl-C does: finished cells, batches and checkpoints stay, and the same command resumes. Lightning
    chains this handler after its own while a Trainer runs."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        log.warning("SIGTERM: stopping; what finished is kept, and the same command resumes")
        raise SystemExit(SIGTERM_EXIT)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class PeakMemory:
    """Peak memory while the block runs: CUDA's allocator peak on a GPU, else the process's resident
    set sampled every 20 ms (in MB)."""

    def __init__(self, device: str = "cpu"):
        self.cuda = str(device).startswith("cuda")
        self.peak_mb = 0.0

    def __enter__(self) -> PeakMemory:
        import threading

        import torch

        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            return self
        import psutil

        process, self._stop = psutil.Process(), threading.Event()

        def sample():
            while not self._stop.is_set():
                self.peak_mb = max(self.peak_mb, process.memory_info().rss / 2**20)
                self._stop.wait(0.02)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        import torch

        if self.cuda:
            self.peak_mb = torch.cuda.max_memory_allocated() / 2**20
        else:
            self._stop.set()
            self._thread.join()


def versions() -> dict[str, str]:
    names = ["calibfuse", "torch", "transformers", "lightning", "hydra-core", "datasets", "wandb"]
    found = {}
    for name in names:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return found


def fsdp_strategy(wrap_layers: list[str], activation_checkpointing: bool = False, **kwargs):
    """Lightning's FSDPStrategy with decoder-layer classes given by import path (YAML cannot hold classes)."""
    import importlib

    from lightning.pytorch.strategies import FSDPStrategy

    classes = set()
    for path in wrap_layers:
        module_name, _, class_name = path.rpartition(".")
        try:
            classes.add(getattr(importlib.import_module(module_name), class_name))
        except (ImportError, AttributeError):
            log.warning("FSDP wrap layer %s not found in this transformers version; skipped", path)
    if not classes:
        raise ValueError(f"none of the FSDP wrap_layers {list(wrap_layers)} can be imported; expected class import paths")
    if activation_checkpointing:
        kwargs["activation_checkpointing_policy"] = classes
    return FSDPStrategy(auto_wrap_policy=classes, **kwargs)
