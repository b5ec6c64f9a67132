"""The evaluation grid's entry point: targets x methods x alpha (x seeds), scored for toxicity and
fluency, written as cells finish and logged to W&B (the logic: calibfuse.evaluation).

    python -m calibfuse.evaluate alignments.smollm2-135m-instruct=<align run>/alignment \\
        alignments.gemma3-270m=<align run to gemma>/alignment
    python -m calibfuse.evaluate ... protocol=rtp prompts=rtp_challenging scorer=detoxify
    python -m calibfuse.evaluate ... "methods=[fusion,none,word_filter,prompting]"
    python -m calibfuse.evaluate -m ... target_names=smollm2-135m-instruct,gemma3-270m "alphas=[0,0.3]"

The run dir gets `generations.jsonl`, `grid.csv`, `grid.json` and `grid.md` (one row per cell, every
metric with its 95 % bootstrap interval over prompts), rewritten as each cell finishes; finished
cells live in `cell_store` and are reused by any later run that needs them.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from calibfuse.evaluation.grid import evaluate
from calibfuse.evaluation.metrics import cell_metrics
from calibfuse.evaluation.runner import EvaluationModule

__all__ = ["EvaluationModule", "cell_metrics", "evaluate", "main"]


@hydra.main(version_base="1.3", config_path="../conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    evaluate(cfg)


if __name__ == "__main__":
    main()
