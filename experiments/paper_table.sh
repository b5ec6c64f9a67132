#!/usr/bin/env bash
# The paper's table (experiment=paper_table): Llama-2-7B chat calibration model on WildJailbreak,
# the four Llama-2-7B targets, RTP challenging, paper protocol, alpha 0..0.6, Detoxify, Llama-2-13B
# perplexity. Needs GPUs, HF_TOKEN (gated repos) and Detoxify's files:
#   DETOXIFY_CKPT=/models/toxic_original-c1212f89.ckpt DETOXIFY_CONFIG=/models/bert-base-uncased \
#       experiments/paper_table.sh                      # one node with 8 GPUs, stage after stage
#   SLURM=1 PARTITION=gpu experiments/paper_table.sh    # stage 1 as one job, then one SLURM job per target
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-outputs/experiments/paper_table}   # OUT=<dir>: where the runs and the report go
# A list of overrides as one override's value: Hydra's grammar wants each item quoted (it holds '=').
SCORER="evaluate_overrides=['prompts=rtp_challenging','protocol=paper','scorer=detoxify','scorer.device=cuda','reference_lm=llama2-13b','trainer=gpu','scorer.checkpoint=${DETOXIFY_CKPT:?set DETOXIFY_CKPT}','scorer.huggingface_config_path=${DETOXIFY_CONFIG:?set DETOXIFY_CONFIG}']"
if [ -z "${SLURM:-}" ]; then
  "$PY" -m calibfuse.pipeline experiment=paper_table "$SCORER" hydra.run.dir="$OUT" "$@"
else
  # Stage 1 once (8 GPUs, DDP), then per target: align + evaluate on one GPU each. Stage 1's 8 ranks each load the whole
  # 7B base on the host before cutting it: 100 GiB together (python -m calibfuse.plan experiment=paper_table), so mem_gb=160.
  "$PY" -m calibfuse.pipeline -m experiment=paper_table until=pretrain hydra/launcher=slurm \
      hydra.launcher.partition="${PARTITION:?set PARTITION}" hydra.launcher.gpus_per_node=8 hydra.launcher.tasks_per_node=8 \
      hydra.launcher.mem_gb=160 hydra.sweep.dir="${OUT}_stage1" "$@"
  "$PY" -m calibfuse.pipeline -m experiment=paper_table "$SCORER" hydra/launcher=slurm hydra.launcher.partition="$PARTITION" \
      targets=llama2-7b-chat-uncensored,llama2-7b-chat,medicine-chat,finance-chat \
      hydra.sweep.dir="$OUT" "$@"
  "$PY" -m calibfuse.report "runs=[$OUT]" alpha=0.3 hydra.run.dir="$OUT/report"
fi
