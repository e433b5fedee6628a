#!/usr/bin/env bash
# The GPU check: what a lent GPU runs first, in one command of about 6 minutes on an H200 (budget and
# arithmetic: benchmarks/README.md, "On a lent GPU").
#
#   here, once:  ../shared/device/fetch-wheels.sh --quant    (the wheels the GPU image lacks, into .whl)
#   there:       bash benchmarks/gpu_check.sh                 (device tool: carry [".whl"], timeout_s 600)
#   rerun the stages without results, in a later call:
#                bash benchmarks/gpu_check.sh --resume benchmarks/results/gpu-check-X.json [--stages a,b]
#   CPU (CI):    bash benchmarks/gpu_check.sh --cpu-smoke      (every stage at tiny shapes, 1-2 minutes)
#
# Each stage runs in its own process under its own timeout: an out-of-memory or a crash is that stage's
# result and the later stages still run. $OUT receives two files only: gpu_check.json (rewritten after every
# stage) and gpu_check.log (every stage's output). Work files go to $GPU_CHECK_WORK. Exit status 0 when every
# stage that was asked for has status ok.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
# tiny shapes gain nothing from intra-op threads, and on a busy CPU (CI, shared machines) threads that wait
# for each other make every op up to 10x slower
[[ " $* " == *" --cpu-smoke "* ]] && export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
PY=${PYTHON:-python3}
OUT=${OUT:-${TMPDIR:-/tmp}/gpu-check-out}
WORK=${GPU_CHECK_WORK:-${TMPDIR:-/tmp}/gpu-check-work}
mkdir -p "$OUT" "$WORK" || exit 2
LOG="$OUT/gpu_check.log"
if compgen -G ".whl/*.whl" >/dev/null; then
  echo "installing the carried wheels: $(cd .whl && ls | tr '\n' ' ')" | tee -a "$LOG"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$WORK/site" \
    .whl/*.whl >>"$LOG" 2>&1 || { echo "gpu_check: the wheel install failed, see $LOG" >&2; exit 3; }
  export PYTHONPATH="$WORK/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
run=("$PY" benchmarks/gpu_check.py)
opts=(--out "$OUT" --work "$WORK" "$@")
# plan: fails at once, naming them, when packages are missing; else "plan deadline S", "plan stage NAME LIMIT"
plan=$("${run[@]}" plan "${opts[@]}") || exit $?
deadline=$(awk '$1 == "plan" && $2 == "deadline" {print $3}' <<<"$plan")
while read -r name limit; do
  [[ -n "$name" ]] || continue
  left=$(( deadline - SECONDS - 15 ))         # the table still gets printed inside the device call
  (( limit > left )) && limit=$left
  if (( limit < 20 )); then
    "${run[@]}" record "$name" --skip "no time left in this call: rerun it with --resume and --stages $name" \
      "${opts[@]}" </dev/null | tee -a "$LOG"
    continue
  fi
  echo "---- $name (limit ${limit} s)" | tee -a "$LOG"
  start=$(date +%s.%N)
  # stdin from /dev/null: the loop reads the plan from stdin
  timeout -k 10 "$limit" "${run[@]}" stage "$name" --limit "$limit" "${opts[@]}" </dev/null >>"$LOG" 2>&1
  rc=$?
  "${run[@]}" record "$name" --rc "$rc" --started "$start" --limit "$limit" "${opts[@]}" </dev/null | tee -a "$LOG"
done <<<"$(awk '$1 == "plan" && $2 == "stage" {print $3, $4}' <<<"$plan")"
"${run[@]}" table "${opts[@]}" | tee -a "$LOG"
exit "${PIPESTATUS[0]}"
