"""The evaluation grid, split along its seams: `cells` (keys and the store), `runner` (one cell through
Lightning's predict loop), `metrics` (the registry), `results` (grid files), `loggers` (W&B) and
`grid` (the loop over targets x methods x strengths x seeds)."""

from calibfuse.evaluation.grid import evaluate
from calibfuse.evaluation.metrics import METRICS, cell_metrics
from calibfuse.evaluation.runner import EvaluationModule

__all__ = ["METRICS", "EvaluationModule", "cell_metrics", "evaluate"]
