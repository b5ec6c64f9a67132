"""The grid to every configured Lightning logger: flat `<target>/<metric>` scalars per cell; to W&B
also the grid and sample generations as tables, and each metric against alpha as a line plot."""

from __future__ import annotations

import math


def log_grid(loggers: list, grid: list[dict], samples: list[dict], names: list[str], config: dict, note: str | None, knobs: dict | None = None) -> None:
    """`knobs`: the setting's knobs (a pipeline's, or a multirun job's overrides), logged as flat
    `knob/<name>` config keys, so W&B's grouping and parallel-coordinates views can use them."""
    flat = {f"knob/{k}": v for k, v in (knobs or {}).items()}
    for logger in loggers:
        logger.log_hyperparams({**config, **flat})
        for step, row in enumerate(grid):
            values = {n: row.get(n) for n in (*names, "toxicity_change", "perplexity_ratio")}
            logger.log_metrics(
                {f"{row['target']}/{n}": v for n, v in values.items() if v is not None and not math.isnan(v)} | {"alpha": row["alpha"]}, step=step
            )
        if type(logger).__name__ == "WandbLogger":
            import wandb

            run = logger.experiment
            columns = list(dict.fromkeys(k for row in grid for k in row))  # the target alone has no paired columns
            table = wandb.Table(columns=columns, data=[[row.get(c) for c in columns] for row in grid])
            payload = {"grid": table, "samples": wandb.Table(columns=list(samples[0]), data=[list(s.values()) for s in samples])}
            for name in names:
                payload[f"plots/{name}_vs_alpha"] = wandb.plot.line(table, "alpha", name, stroke="target", title=f"{name} vs alpha")
            run.log(payload)
            if note:
                run.summary["scorer_note"] = note
        logger.finalize("success")
