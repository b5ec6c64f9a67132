#!/usr/bin/env bash
# A Hydra multirun on the embedded models: 2 targets x 3 alpha values = 6 jobs, each its own W&B
# run, all in one W&B group (evaluate-embedded_multirun), then one report across them.
# Stages 1-2 are built by the first job that needs them and reused by the others.
#   experiments/embedded_multirun.sh            (add hydra/launcher=local_parallel to run 2 jobs at once)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
SWEEP=${OUT:-outputs/experiments/embedded_multirun}   # OUT=<dir>: where the jobs and the report go
"$PY" -m calibfuse.pipeline -m targets=smollm2-135m-instruct,gemma3-270m "alphas=[0.0],[0.3],[0.5]" \
    until=evaluate hydra.sweep.dir=$SWEEP "$@"
"$PY" -m calibfuse.report "runs=[$SWEEP]" alpha=0.3 hydra.run.dir=$SWEEP/report
