"""Paper-style tables and plots from evaluation runs.

    python -m calibfuse.report "runs=[outputs/evaluate/multiruns/<date_time>]"
    python -m calibfuse.report "runs=[outputs/pipeline/runs/<a>,outputs/pipeline/runs/<b>]" alpha=0.5

Reads every grid.json under the given run, multirun or pipeline dirs and writes, in the run dir:
table.md and table.tex (per target: toxicity and perplexity, base = alpha 0 vs fused at `alpha`,
with 95 % intervals), grid.md (every cell), and PNG plots: toxicity vs alpha, perplexity vs alpha
(a line per target, intervals shaded) and the toxicity-perplexity trade-off; the Pareto frontier
(frontier.md, pareto.png), every setting's paired change against the target alone (paired.png) and
the goal's verdict (goal.md, calibfuse.reporting.verdict: chosen on half the prompts, confirmed on the other).
"""

from __future__ import annotations

import logging

import hydra
from omegaconf import DictConfig, OmegaConf

from calibfuse.reporting.report import build_report, log_summary, printable

log = logging.getLogger(__name__)


@hydra.main(version_base="1.3", config_path="../conf", config_name="report")
def main(cfg: DictConfig) -> None:
    goal = OmegaConf.to_container(cfg.goal) if cfg.get("goal") else None
    confirm = OmegaConf.to_container(cfg.confirm) if cfg.get("confirm") else None
    report = build_report(list(cfg.runs), cfg.paths.output_dir, cfg.alpha, goal, confirm, cfg.bootstrap_resamples)
    log_summary(report, cfg.get("logger"))
    print(f"\n{printable(report)}\n\nplots and LaTeX: {report['out_dir']}")


if __name__ == "__main__":
    main()
