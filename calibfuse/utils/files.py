"""Plumbing shared by the entry points: instantiating Hydra groups, secrets, W&B runs, manifests."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


@contextlib.contextmanager
def file_lock(path: str | Path, enabled: bool = True):
    """An exclusive lock on `path` while the block runs: parallel jobs that need the same artifact
    wait for the one building it instead of building it twice."""
    if not enabled:
        yield
        return
    from filelock import FileLock, Timeout

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(path))
    try:
        lock.acquire(timeout=0)
    except Timeout:  # another run builds what this one needs: say what it waits for, then wait
        log.info("waiting for %s held by another run (it builds what this run needs; this run goes on when it ends)", path)
        started = time.monotonic()
        lock.acquire()
        log.info("acquired %s after %.0f s", path, time.monotonic() - started)
    try:
        yield
    finally:
        lock.release()


@contextlib.contextmanager
def atomic_path(path: str | Path):
    """Yield a private temporary path beside `path`; on success it replaces `path` in one rename, so
    readers (and parallel jobs) never see a half-written file or directory. On failure it is removed."""
    import shutil

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.partial")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()


def write_text(path: str | Path, text: str) -> Path:
    """Write a text file atomically: an interrupted run never leaves half a file. A failed write (a full
    disk, a read-only dir) is an OSError that names the file."""
    try:
        with atomic_path(path) as tmp:
            tmp.write_text(text, encoding="utf-8")
    except OSError as error:
        raise OSError(error.errno, f"cannot write {path} ({error.strerror or error}){write_hint(error)}") from error
    return Path(path)


def write_hint(error: OSError) -> str:
    """What to do about a failed write, for the errors a user can act on."""
    if error.errno == errno.ENOSPC:
        return "; the disk is full: free space there, or point the output elsewhere"
    if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "; expected a writable directory"
    return ""


def write_json(path: str | Path, obj: Any) -> Path:
    """Write JSON atomically (temp file + rename): an interrupted run never leaves half a manifest."""
    return write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, read in blocks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def sha256_json(obj: Any) -> str:
    """Hex sha256 of a JSON-able object with sorted keys: the one content hash of configs and cell keys."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


DEFAULT_CACHE_DIR = "~/.cache/calibfuse"


def default_cache_dir() -> str:
    """`$CALIBFUSE_CACHE_DIR`, else ~/.cache/calibfuse: the same place the configs' `paths.cache_dir` names."""
    return os.environ.get("CALIBFUSE_CACHE_DIR") or DEFAULT_CACHE_DIR
