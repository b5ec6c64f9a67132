"""Which process does what when a launcher runs one process per rank (Lightning's `strategy=ddp`
re-running the script, SLURM, torchrun): rank 0 builds and records every stage; the other ranks
take part in a distributed stage's training and wait for the rest, never holding a stage's lock."""

from __future__ import annotations

import os
import time
from pathlib import Path

from omegaconf import DictConfig


def launched_rank() -> int:
    """This process's global rank when a launcher started one process per rank (Lightning's `ddp`
    re-running the script, SLURM, torchrun); 0 otherwise."""
    for variable in ("RANK", "SLURM_PROCID", "LOCAL_RANK"):
        value = os.environ.get(variable, "")
        if value.isdigit():
            return int(value)
    return 0


def distributed(cfg: DictConfig) -> bool:
    """Whether a stage's trainer runs one process per rank (its other ranks must take part)."""
    strategy = (cfg.get("trainer") or {}).get("strategy")
    name = str(strategy.get("_target_", "") if isinstance(strategy, DictConfig) else strategy).lower()
    return any(kind in name for kind in ("ddp", "fsdp", "deepspeed")) and "spawn" not in name


def wait_for_rank_zero(stage: str, directory: Path, poll_seconds: float = 2.0) -> Path:
    """A non-zero rank's wait for a single-process stage that rank 0 builds: no lock is taken, so
    rank 0 is never blocked by it; rank 0 ending first (this process reparented) ends the wait."""
    parent = os.getppid()
    while not (directory / "stage.json").is_file():
        if os.getppid() != parent:
            raise RuntimeError(f"rank 0 ended before it finished stage {stage} in {directory}; rerun the command")
        time.sleep(poll_seconds)
    return directory


def leave_process_group() -> None:
    """After a distributed stage every rank leaves its process group: the next stage may run on rank 0
    alone, and a live group would make its metrics wait for ranks that are not taking part."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
