"""Upload the offline W&B runs behind a sweep, a pipeline run or a report, wherever they were written:
the jobs' runs in the sweep, each pipeline's stage runs in the stage store (named in its pipeline.json)
and the report's run.

    python -m calibfuse.sync outputs/my_sweep            # wandb sync of every run found (needs WANDB_API_KEY)
    python -m calibfuse.sync outputs/my_sweep --list     # list them only
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

log = logging.getLogger(__name__)


def offline_runs(paths: list[str | Path]) -> list[Path]:
    """Every `offline-run-*` dir under `paths` and under the stage dirs their pipeline.json files name."""
    roots: list[Path] = []
    for path in map(Path, paths):
        if not path.is_dir():
            raise FileNotFoundError(f"{str(path)!r} is not a directory; expected a sweep, pipeline run or report dir")
        roots.append(path)
        for record in path.rglob("pipeline.json"):
            stages = json.loads(record.read_text(encoding="utf-8"))
            named = [stages.get("pretrain"), *(stages.get("alignments") or {}).values()]
            roots += [Path(p) if Path(p).name != "alignment" else Path(p).parent for p in named if p]
    runs = {run.resolve() for root in roots if root.is_dir() for run in root.rglob("offline-run-*") if run.is_dir()}
    return sorted(runs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m calibfuse.sync", description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", help="sweep, pipeline run or report dirs")
    parser.add_argument("--list", action="store_true", help="list the runs, upload nothing")
    args = parser.parse_args(argv)
    runs = offline_runs(args.paths)
    for run in runs:
        print(run)
    print(f"{len(runs)} offline W&B run(s)")
    if args.list or not runs:
        return 0
    cli = shutil.which("wandb", path=str(Path(sys.executable).parent)) or shutil.which("wandb")
    if cli is None:
        raise FileNotFoundError("the wandb command is not installed beside this Python; expected `pip install wandb`")
    return subprocess.run([cli, "sync", *map(str, runs)], check=False).returncode


if __name__ == "__main__":
    sys.exit(main())
