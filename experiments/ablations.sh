#!/usr/bin/env bash
# One ablation (docs/method.md lists them) as a Hydra multirun of the pipeline, then its report:
#   experiments/ablations.sh layers        # calibration layers 1 / 3 / 6
#   experiments/ablations.sh negatives     # K = 1 / 10 / 50
#   experiments/ablations.sh layer_norm    # LN on / off
#   experiments/ablations.sh context       # calibration context: full vs last_token (the reference's)
#   experiments/ablations.sh alignment     # learned A vs identity
#   experiments/ablations.sh embeddings    # input vs output embeddings
#   experiments/ablations.sh matching      # shared vocabulary: exact vs normalized
#   experiments/ablations.sh scale         # fusion variant: LN(h_c A) at unit RMS vs at the target's RMS
#   experiments/ablations.sh fusion_head   # fusion variant: stage 2's A vs A trained on the fused LM loss
#   experiments/ablations.sh head_init     # fusion head: A from stage 2 vs from a hidden-state fit on paired text
#   experiments/ablations.sh head_scale    # fusion head: unit-RMS LN(h_c A) vs a learned gain
#   experiments/ablations.sh head_norm     # fusion head: parameter-free LayerNorm vs its weight and bias trained
#   experiments/ablations.sh head_contrast # fusion head: the fused LM loss vs LM-Steer's contrast (sign-flipped likelihood on toxic text)
#   experiments/ablations.sh seeds         # training seeds 1 / 2 / 3
#   experiments/ablations.sh alpha         # alpha 0 ... 1 (one job)
# Each job is a W&B run in the group "<stage>-ablation_<name>"; unchanged stages are reused.
# OUT=<dir> sets the output folder. Extra arguments go to the pipeline (e.g. hydra/launcher=local_parallel, "targets=[gemma3-270m]").
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
NAME=${1:?usage: experiments/ablations.sh NAME [overrides], NAME from conf/experiment/ablation_*.yaml}
shift
SWEEP=${OUT:-outputs/experiments/ablation_$NAME}   # OUT=<dir>: where the multirun and its report go
MODE=-m
[ "$NAME" = alpha ] && MODE=
"$PY" -m calibfuse.pipeline $MODE experiment=ablation_$NAME until=evaluate hydra.sweep.dir=$SWEEP hydra.run.dir=$SWEEP "$@"
"$PY" -m calibfuse.report "runs=[$SWEEP]" alpha=0.3 hydra.run.dir=$SWEEP/report
