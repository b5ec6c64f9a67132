#!/usr/bin/env bash
# The paper's table rehearsed end to end on CPU (experiment=paper_table with its names mapped to local
# stand-ins of the same shapes: experiments/rehearsal/build_standins.py). What a first GPU run would hit:
#   1. stage 1 with strategy=ddp, the script started once per rank (torchrun, 2 CPU processes, gloo);
#   2. the SLURM path through submitit's local executor: stage 1 as one job, which finds step 1's model
#      (the same stage config, so the same key), then one job per target;
#   3. the first target's job stopped with SIGTERM mid-grid, after its first cell, and the sweep rerun: the
#      job resumes from the stage store and that cell, and its grid equals an uninterrupted run's (the same
#      target run whole beforehand, into a cell store of its own);
#   4. calibfuse.report over the sweep: the four-target table.
# Every run starts from empty stores in OUT; the stand-ins are built once and kept.
#     OUT=/tmp/rehearsal ALPHAS='[0.0,0.3]' experiments/rehearsal.sh   # 3 min 58 s on a shared 2-core machine (tests/test_rehearsal.py)
#     experiments/rehearsal.sh                                          # the paper's α 0 ... 0.6: 7 cells per target
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-$PWD/.venv/bin/python}
OUT=$(mkdir -p "${OUT:-outputs/rehearsal}" && cd "${OUT:-outputs/rehearsal}" && pwd)
ALPHAS=${ALPHAS:-[0.0,0.1,0.2,0.3,0.4,0.5,0.6]}
STANDINS=$OUT/standins
[ -f "$STANDINS/conf/experiment/paper_table_rehearsal.yaml" ] || "$PY" experiments/rehearsal/build_standins.py "$STANDINS"
rm -rf "$OUT"/{stages,cells,ddp,stage1,reference,sweep,report,first_attempt.log}
# Stage 1 as the torchrun run trains it, in every run: the later ones find its model by the same key.
PRETRAIN="pretrain_overrides=['experiment=paper_pretrain','base_model.name_or_path=$STANDINS/llama2-7b-chat','base_model.dtype=float32',\
'data.path=$STANDINS/wildjailbreak','data.num_workers=0','trainer=ddp','trainer.accelerator=cpu','trainer.devices=2','trainer.precision=32-true',\
'++trainer.max_steps=4','trainer.max_epochs=1','trainer.num_sanity_val_steps=0','logger=csv']"
COMMON=("hydra.searchpath=[file://$STANDINS/conf]" experiment=paper_table_rehearsal "alphas=$ALPHAS" "$PRETRAIN" stage_store="$OUT/stages")

fail() {  # fail MESSAGE [FILE]: the message, then the file's tail
  echo "rehearsal failed: $1" >&2
  [ -z "${2:-}" ] || tail -n 40 "$2" >&2 || true
  exit 1
}
alive() { local state; state=$(ps -o stat= -p "$1") && [[ $state != Z* ]]; }  # a zombie has ended
wait_for() {  # wait_for PATTERN LOG SECONDS PID: until a line of LOG matches, while PID runs
  local end=$((SECONDS + $3))
  until grep -qs -- "$1" "$2"; do
    alive "$4" || fail "the first attempt ended before a line matching '$1' in $2" "$OUT/first_attempt.log"
    ((SECONDS < end)) || fail "no line matching '$1' in $2 after $3 s" "$2"
    sleep 0.2
  done
}
brief() { sed "s/^.*\]\[[A-Z]*\] - /  /" | cut -c1-150; }  # log lines without their timestamp and logger

echo "== 1. stage 1 under strategy=ddp, one process per rank (torchrun, gloo)"
"$PY" -m torch.distributed.run --nproc_per_node=2 --master_port="${MASTER_PORT:-29531}" -m calibfuse.pipeline "${COMMON[@]}" until=pretrain \
    cell_store="$OUT/cells" hydra.run.dir="$OUT/ddp"

echo "== 2. the SLURM path (submitit, local executor): stage 1 as one job, then one job per target"
TARGETS=rehearsal-llama2-7b-chat-uncensored,rehearsal-llama2-7b-chat,rehearsal-medicine-chat,rehearsal-finance-chat
FIRST=${TARGETS%%,*}
mkdir -p "$OUT/reference"  # meanwhile, step 3's reference: the first target's grid uninterrupted, into a cell store of its own
"$PY" -m calibfuse.pipeline "${COMMON[@]}" targets="$FIRST" until=evaluate cell_store="$OUT/reference/cells" hydra.run.dir="$OUT/reference" \
    > "$OUT/reference/output.log" 2>&1 &
REFERENCE=$!
trap 'kill $(jobs -p) 2> /dev/null || true' EXIT  # on a failure, what this script started in the background
SLURM=("${COMMON[@]}" cell_store="$OUT/cells" hydra/launcher=submitit_local)
"$PY" -m calibfuse.pipeline -m "${SLURM[@]}" until=pretrain hydra.sweep.dir="$OUT/stage1"
grep -h "stage pretrain: " "$OUT/stage1/0/pipeline.log" | brief

echo "== 3. the first target's job stopped with SIGTERM mid-grid, then the sweep over all four: that job resumes"
wait "$REFERENCE" || fail "the uninterrupted run of $FIRST failed" "$OUT/reference/output.log"
read -r -a CELLS <<< "$("$PY" -c 'import csv, sys; print(*(r["cell"] for r in csv.DictReader(open(sys.argv[1]))))' "$OUT/reference/evaluate/grid.csv")"
((${#CELLS[@]} > 1)) || fail "$FIRST's grid has ${#CELLS[@]} cell: a job stopped mid-grid needs two or more (ALPHAS)"
echo "  uninterrupted: $FIRST's ${#CELLS[@]} cells into $OUT/reference/cells"
# The second cell's lock held here, as a parallel job computing that cell would hold it: the job writes its
# first cell, then waits, so the signal lands mid-grid however fast the machine is.
mkdir -p "$OUT/cells/${CELLS[1]}"
exec {HELD}> "$OUT/cells/${CELLS[1]}/.lock"
flock "$HELD"
"$PY" -m calibfuse.pipeline -m "${SLURM[@]}" targets="$FIRST" hydra.sweep.dir="$OUT/sweep" {HELD}>&- > "$OUT/first_attempt.log" 2>&1 &
LAUNCHER=$!
LOG=$OUT/sweep/0/pipeline.log
wait_for "cell ${CELLS[0]}: toxicity" "$LOG" 600 "$LAUNCHER"
JOB=$(cd "$OUT/sweep/.submitit" && ls -d [0-9]*)  # the local executor's job id: its controller's pid, which passes signals on as SLURM does
SENT=$EPOCHREALTIME
kill -TERM "$JOB"
while alive "$JOB"; do
  (($(date +%s) - ${SENT%.*} < 60)) || fail "job $JOB still runs 60 s after SIGTERM" "$LOG"
  sleep 0.1
done
ENDED=$EPOCHREALTIME
grep -q "SIGTERM: stopping" "$LOG" || fail "job $JOB ended without its SIGTERM message" "$LOG"
WRITTEN=$(grep -c "^.* - cell .*: toxicity " "$LOG")
((WRITTEN < ${#CELLS[@]})) || fail "job $JOB wrote all ${#CELLS[@]} cells before the signal" "$LOG"
echo "  job $JOB: SIGTERM after $WRITTEN of ${#CELLS[@]} cells of $FIRST"
"$PY" - "$LOG" "$SENT" "$ENDED" <<'EOF'
import datetime, sys

line = next(line for line in open(sys.argv[1]) if "SIGTERM: stopping" in line)
stopping = datetime.datetime.strptime(line[1:24], "%Y-%m-%d %H:%M:%S,%f").timestamp()  # the log's local time
sent, ended = map(float, sys.argv[2:])
print(f"  it logged 'SIGTERM: stopping' {max(stopping - sent, 0):.1f} s after the signal, and its process had ended {ended - sent:.1f} s after it")
EOF
if wait "$LAUNCHER"; then fail "the launcher reported the stopped job as a success" "$OUT/first_attempt.log"; fi
grep -q UncompletedJobError "$OUT/first_attempt.log" || fail "the launcher did not report the stopped job" "$OUT/first_attempt.log"
echo "  the launcher: UncompletedJobError ($OUT/first_attempt.log)"
exec {HELD}>&-  # the second cell is free again
"$PY" -m calibfuse.pipeline -m "${SLURM[@]}" targets=$TARGETS hydra.sweep.dir="$OUT/sweep"
echo "  $FIRST's job resumed:"
sed -n '/SIGTERM: stopping/,$p' "$LOG" | grep "stage .*: reusing\|: reused from\|: generating" | brief
"$PY" - "$OUT/reference/evaluate" "$OUT/sweep/0/evaluate" <<'EOF' || fail "the resumed grid differs from the uninterrupted one"
import csv, sys
from pathlib import Path

SPEED = ("generation_seconds", "tokens_per_second", "peak_memory_mb")  # how fast the machine was, not what was computed
reference, resumed = (Path(d) for d in sys.argv[1:])
grids = [list(csv.DictReader((d / "grid.csv").open())) for d in (reference, resumed)]
columns = [c for c in grids[0][0] if c not in (*SPEED, "setting") and not c.endswith("_seconds")]  # setting: each run's own label; *_seconds: how long a measurement took
if [len(g) for g in grids] != [len(grids[0])] * 2:
    sys.exit(f"  cells: {len(grids[0])} uninterrupted, {len(grids[1])} resumed")
differ = [f"  {a['cell']} {c}: {a[c]} uninterrupted, {b[c]} resumed" for a, b in zip(*grids) for c in columns if a[c] != b.get(c)]
if (reference / "generations.jsonl").read_bytes() != (resumed / "generations.jsonl").read_bytes():
    differ.append("  generations.jsonl differs")
if differ:
    sys.exit("\n".join(differ))
print(f"  resumed = uninterrupted: grid.csv's {len(grids[0])} cells x {len(columns)} columns (left out: {', '.join(SPEED)}, other *_seconds, setting), generations.jsonl")
EOF

echo "== 4. the paper-style table over the sweep"
"$PY" -m calibfuse.report "runs=[$OUT/sweep]" alpha=0.3 hydra.run.dir="$OUT/report"
echo "rehearsal: $((SECONDS / 60)) min $((SECONDS % 60)) s"
