#!/usr/bin/env bash
# The README main job: the whole method on the embedded models, offline, on a CPU.
# Stage 1 (SmolLM2 cut to 3 layers, trained on the shipped non-toxic corpus) -> stage 2 (aligned
# with SmolLM2-135M-Instruct and Gemma-3-270M) -> the grid (alpha 0, .1, .3, .5 on the shipped
# challenge set, paper protocol) -> the table and plots. W&B runs are offline, group "*-embedded_demo".
#   experiments/embedded_demo.sh [more pipeline overrides]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
"$PY" -m calibfuse.pipeline experiment=embedded_demo hydra.run.dir="${OUT:-outputs/experiments/embedded_demo}" "$@"
