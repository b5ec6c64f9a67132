"""The grid to every configured Lightning logger: one flat scalar per cell and metric, keyed by what
the cell is (`<target>/<method>/alpha=<α>/<metric>`, plus `/seed=<s>` when a grid runs several seeds), so
a run's summary holds every cell of its own grid and no cell overwrites another; to W&B also the grid and
sample generations as tables, and each metric against alpha as a line plot."""

from __future__ import annotations

import math

from calibfuse.evaluation.results import scalar_columns


def metric_prefix(row: dict, several_seeds: bool) -> str:
    """Where a cell's scalars live: `<target>/<method>/alpha=<α>`, and `/seed=<s>` when the grid has several seeds."""
    return f"{row['target']}/{row['method']}/alpha={row['alpha']:g}" + (f"/seed={row['seed']}" if several_seeds else "")


def log_grid(loggers: list, grid: list[dict], samples: list[dict], names: list[str], config: dict, note: str | None, knobs: dict | None = None) -> None:
    """`knobs`: the setting's knobs (a pipeline's, or a multirun job's overrides), logged as flat
    `knob/<name>` config keys, so W&B's grouping and parallel-coordinates views can use them."""
    flat = {f"knob/{k}": v for k, v in (knobs or {}).items()}
    several_seeds = len({row["seed"] for row in grid}) > 1
    for logger in loggers:
        logger.log_hyperparams({**config, **flat})
        for step, row in enumerate(grid):
            values = {n: row.get(n) for n in (*names, "toxicity_change", "perplexity_ratio")}
            prefix = metric_prefix(row, several_seeds)
            logger.log_metrics({f"{prefix}/{n}": v for n, v in values.items() if v is not None and not math.isnan(v)}, step=step)
        if type(logger).__name__ == "WandbLogger":
            import wandb

            run = logger.experiment
            rows = [scalar_columns(row) for row in grid]
            columns = list(dict.fromkeys(k for row in rows for k in row))  # the target alone has no paired columns
            table = wandb.Table(columns=columns, data=[[row.get(c) for c in columns] for row in rows])
            payload = {"grid": table, "samples": wandb.Table(columns=list(samples[0]), data=[list(s.values()) for s in samples])}
            for name in names:
                payload[f"plots/{name}_vs_alpha"] = wandb.plot.line(table, "alpha", name, stroke="target", title=f"{name} vs alpha")
            run.log(payload)
            if note:
                run.summary["scorer_note"] = note
        logger.finalize("success")
