"""Paper-style tables and plots from evaluation runs.

    python -m calibfuse.report "runs=[outputs/evaluate/multiruns/<date_time>]"
    python -m calibfuse.report "runs=[outputs/pipeline/runs/<a>,outputs/pipeline/runs/<b>]" alpha=0.5
    python -m calibfuse.report "runs=[...]" scorer@held_out_scorer=profanity_check   # recheck the verdict by a second scorer

Reads every grid.json under the given run, multirun or pipeline dirs and writes, in the run dir:
table.md and table.tex (per target: toxicity and perplexity, base = alpha 0 vs fused at `alpha`,
with 95 % intervals), grid.md (every cell), and PNG plots: toxicity vs alpha, perplexity vs alpha
(a line per target, intervals shaded) and the toxicity-perplexity trade-off; the Pareto frontier
(frontier.md, pareto.png), every setting's paired change against the target alone (paired.png) and
the goal's verdict (goal.md, calibfuse.reporting.verdict: chosen on half the prompts, confirmed on the other),
and every setting's paired change on prompt subsets by the prompt's own toxicity (subsets.md,
calibfuse.reporting.subsets; `subsets.edges=[0.5]`: toxic and non-toxic prompts; `subsets=null`: off).
"""

from __future__ import annotations

import logging

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig

from calibfuse.reporting.report import build_report, log_summary, plain, printable

log = logging.getLogger(__name__)


@hydra.main(version_base="1.3", config_path="../conf", config_name="report")
def main(cfg: DictConfig) -> None:
    goal, confirm = plain(cfg.get("goal")), plain(cfg.get("confirm"))
    held_out = instantiate(cfg.held_out_scorer) if cfg.get("held_out_scorer") else None
    subsets = plain(cfg.get("subsets"))
    report = build_report(list(cfg.runs), cfg.paths.output_dir, cfg.alpha, goal, confirm, cfg.bootstrap_resamples, held_out, subsets)
    log_summary(report, cfg.get("logger"))
    print(f"\n{printable(report)}\n\nplots and LaTeX: {report['out_dir']}")


if __name__ == "__main__":
    main()
