#!/usr/bin/env bash
# The paper's table rehearsed end to end on CPU (experiment=paper_table with its names mapped to local
# stand-ins of the same shapes: experiments/rehearsal/build_standins.py). What a first GPU run would hit:
#   1. stage 1 with strategy=ddp, the script started once per rank (torchrun, 2 CPU processes, gloo);
#   2. the SLURM path through submitit's local executor: stage 1 as one job, then one job per target;
#   3. one job killed (SIGKILL) and the sweep rerun: it resumes from the stage store and the finished cells;
#   4. calibfuse.report over the sweep: the four-target table.
#     experiments/rehearsal.sh                     # ~4 min on 2 CPU cores
#     OUT=/tmp/rehearsal ALPHAS='[0.0,0.3]' experiments/rehearsal.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-$PWD/.venv/bin/python}
OUT=$(mkdir -p "${OUT:-outputs/rehearsal}" && cd "${OUT:-outputs/rehearsal}" && pwd)
ALPHAS=${ALPHAS:-[0.0,0.1,0.2,0.3,0.4,0.5,0.6]}
STANDINS=$OUT/standins
[ -f "$STANDINS/conf/experiment/paper_table_rehearsal.yaml" ] || "$PY" experiments/rehearsal/build_standins.py "$STANDINS"
COMMON=("hydra.searchpath=[file://$STANDINS/conf]" experiment=paper_table_rehearsal "alphas=$ALPHAS"
        stage_store="$OUT/stages" cell_store="$OUT/cells")

echo "== 1. stage 1 under strategy=ddp, one process per rank (torchrun, gloo)"
"$PY" -m torch.distributed.run --nproc_per_node=2 --master_port="${MASTER_PORT:-29531}" -m calibfuse.pipeline "${COMMON[@]}" until=pretrain \
    "pretrain_overrides=['experiment=paper_pretrain','base_model.name_or_path=$STANDINS/llama2-7b-chat','base_model.dtype=float32','data.path=$STANDINS/wildjailbreak','data.num_workers=0','trainer=ddp','trainer.accelerator=cpu','trainer.devices=2','trainer.precision=32-true','++trainer.max_steps=4','trainer.max_epochs=1','trainer.num_sanity_val_steps=0','logger=csv']" \
    hydra.run.dir="$OUT/ddp"

echo "== 2. the SLURM path (submitit, local executor): stage 1 as one job, then one job per target"
SLURM=("${COMMON[@]}" hydra/launcher=submitit_local)
"$PY" -m calibfuse.pipeline -m "${SLURM[@]}" until=pretrain hydra.sweep.dir="$OUT/stage1"
TARGETS=rehearsal-llama2-7b-chat-uncensored,rehearsal-llama2-7b-chat,rehearsal-medicine-chat,rehearsal-finance-chat

echo "== 3. the first target's job killed while its grid runs, then the sweep over all four: that job resumes"
"$PY" -m calibfuse.pipeline -m "${SLURM[@]}" targets="${TARGETS%%,*}" hydra.sweep.dir="$OUT/sweep" > "$OUT/first_attempt.log" 2>&1 &
LAUNCHER=$!
for _ in $(seq 1 1200); do  # until its grid is done: the job is then writing its report, seconds from its end
  grep -qs "grid (paper protocol" "$OUT"/sweep/0/pipeline.log && break
  sleep 0.25
done
pkill -9 -f "submitit.core._submit.*$OUT/sweep" || true   # the job dies as on a lost node
wait "$LAUNCHER" || echo "(the first attempt failed as it should: $OUT/first_attempt.log)"
"$PY" -m calibfuse.pipeline -m "${SLURM[@]}" targets=$TARGETS hydra.sweep.dir="$OUT/sweep"
grep -h "stage .*: reusing\|reused from" "$OUT"/sweep/*/pipeline.log | sed "s/^.*INFO\] - /  /" | head -8

echo "== 4. the paper-style table over the sweep"
"$PY" -m calibfuse.report "runs=[$OUT/sweep]" alpha=0.3 hydra.run.dir="$OUT/report"
