#!/usr/bin/env bash
# The one script to run on a GPU machine, sized for one device `run` call with
# a 560 s timeout: the steps get GPU_CHECK_SECONDS (default 470) in all, the
# build included (the machine's start is not). Each step has a time limit and a
# minimum; a step whose minimum does not fit in the time left is not started,
# and the table says so. Most valuable first:
#   step          limit  min  what
#   preflight        60   10  nvidia-smi, python and Python.h, nvcc, torch sees the GPU, triton
#   build           240   40  setup.py build_ext --inplace, DPS_FAST_CUDA=1 (CUDA must build),
#                             DPS_FAST_CUDA_ARCHS=90; skipped when both modules are newer than their sources
#   info             45    5  dps-fast info
#   cuda-tests      150   45  tests/test_backend_cuda.py (CUDA module vs pure PyTorch, >2^31 entries,
#                             no host sync, a side stream, one launch per step)
#   bench           120   40  dps-fast bench, 50M parameters, step and boundary rows -> bench.json
#   bench-bf16       60   20  the same step rows on bf16 parameters, fp32 and bf16 state -> bench-bf16.json
#   triton-tests    150   45  tests/test_backend_triton.py (never run on a GPU before)
#   memcheck        120   40  compute-sanitizer memcheck: benchmarks/sanitizer_cases.py memcheck
#   scaler-cost      45   15  benchmarks/grad_scaler_cost.py: host-synced vs sync-free GradScaler steps
#   racecheck        60   20  compute-sanitizer racecheck: benchmarks/sanitizer_cases.py racecheck
#   bench-large     100   45  dps-fast bench, 340M parameters (BERT-large sized) -> bench-large.json
# It ends with one short table (step, status, seconds, key figure) and the bench table
# (benchmarks/gpu_bench_table.py). Logs, summary.txt and the bench JSONs go to LOG_DIR; where
# $OUT is set (the device tool), summary.txt, the JSONs and gpu_check.tgz (every log) are copied
# there after every step.
#
# Usage, from anywhere:  bash benchmarks/gpu_check.sh [LOG_DIR]
# Environment: PYTHON (default python3), GPU_CHECK_SECONDS (470), GPU_CHECK_STEPS (comma-separated
#   steps to run, e.g. bench,memcheck; preflight always runs, and the build too when a selected
#   step needs the modules and they are missing or stale), DPS_FAST_CUDA_ARCHS (90), BENCH_ARGS
#   (extra `dps-fast bench` arguments).
# Exit status: 0 every step that ran passed, 1 a step failed or ran out of time, 2 no GPU here.
set -u -o pipefail

cd "$(dirname "$0")/.." || exit 1
LOG_DIR=${1:-/tmp/dps_gpu_check}
mkdir -p "$LOG_DIR"
PY=${PYTHON:-python3}
BUDGET=${GPU_CHECK_SECONDS:-470}
RESERVE=10  # kept for the tables and the archive at the end
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
START=$(date +%s)
FAILED=0
SUMMARY=()

STEPS=(preflight build info cuda-tests bench bench-bf16 triton-tests memcheck scaler-cost racecheck bench-large)
declare -A LIMIT=([preflight]=60 [build]=240 [info]=45 [cuda-tests]=150 [bench]=120 [bench-bf16]=60
                  [triton-tests]=150 [memcheck]=120 [scaler-cost]=45 [racecheck]=60 [bench-large]=100)
declare -A MIN=([preflight]=10 [build]=40 [info]=5 [cuda-tests]=45 [bench]=40 [bench-bf16]=20 [triton-tests]=45
                [memcheck]=40 [scaler-cost]=15 [racecheck]=20 [bench-large]=45)

declare -A SELECTED=()
if [[ -n "${GPU_CHECK_STEPS:-}" ]]; then
  IFS=, read -r -a wanted <<<"$GPU_CHECK_STEPS"
  for name in "${wanted[@]}"; do
    if [[ -z "${LIMIT[$name]:-}" ]]; then
      echo "GPU_CHECK_STEPS: unknown step '$name'; steps: ${STEPS[*]}" >&2
      exit 2
    fi
    SELECTED[$name]=1
  done
else
  for name in "${STEPS[@]}"; do SELECTED[$name]=1; done
fi
SELECTED[preflight]=1

row() {  # row STEP STATUS SECONDS KEY: one line of the summary table
  SUMMARY+=("$(printf '%-13s %-24s %7s  %s' "$1" "$2" "$3" "${4:0:80}")")
}

# Copies of what the device tool brings back, fresh after every step.
save() {
  printf '%s\n' "${SUMMARY[@]}" >"$LOG_DIR/summary.txt"
  if [[ -n "${OUT:-}" && -d "$OUT" ]]; then
    tar czf "$OUT/gpu_check.tgz" -C "$LOG_DIR" . 2>/dev/null
    cp "$LOG_DIR"/summary.txt "$LOG_DIR"/*.json "$OUT"/ 2>/dev/null
  fi
}

# The key figure of a step's log: the last line matching the pattern, else the last line;
# pattern @rows: the rows a bench ran and how many failed (from its progress lines).
key_of() {
  local log=$1 pattern=$2 line=""
  if [[ "$pattern" == @rows ]] && grep -q '^bench \[' "$log"; then
    echo "$(($(grep -c '^bench \[' "$log") - 1)) rows run, $(grep -c ': FAILED (' "$log") failed"
    return
  fi
  [[ -n "$pattern" ]] && line=$(grep -E "$pattern" "$log" | tail -n 1)
  [[ -z "$line" ]] && line=$(grep -v '^\s*$' "$log" | tail -n 1)
  echo "$line" | sed 's/^[ =]*//; s/[ =]*$//'
}

# run_step NAME KEY_PATTERN COMMAND...: run within the step's limit and the time left, log to
# LOG_DIR/NAME.log, show the log's tail, and add a row to the summary table.
run_step() {
  local name=$1 pattern=$2
  shift 2
  local left=$((START + BUDGET - RESERVE - $(date +%s)))
  if ((left < MIN[$name])); then
    row "$name" "not started" "-" "needs ${MIN[$name]} s, ${left} s left (GPU_CHECK_STEPS=$name to run it)"
    return
  fi
  local limit=${LIMIT[$name]}
  ((limit > left)) && limit=$left
  echo
  echo "=== $name (limit ${limit} s, $((left)) s left): $*"
  local t0 rc status
  t0=$(date +%s)
  timeout --signal=INT --kill-after=10 "$limit" "$@" >"$LOG_DIR/$name.log" 2>&1
  rc=$?
  tail -n 20 "$LOG_DIR/$name.log"
  if ((rc == 0)); then
    status=ok
  elif ((rc == 124 || rc == 130 || rc == 137)); then  # 137: still running after --kill-after
    status="TIMEOUT (${limit} s)"
    FAILED=1
  else
    status="FAILED (rc $rc)"
    FAILED=1
  fi
  row "$name" "$status" "$(($(date +%s) - t0))" "$(key_of "$LOG_DIR/$name.log" "$pattern")"
  save
}

finish() {  # the tables, the archive, and the exit status
  local code=$1
  {
    echo
    echo "=== gpu_check: ${GPU_NAME:-no GPU}, $(($(date +%s) - START)) s of $BUDGET; logs in $LOG_DIR"
    printf '%-13s %-24s %7s  %s\n' step status seconds "key figure"
    printf '%s\n' "${SUMMARY[@]}"
    local jsons=()
    for f in bench bench-bf16 bench-large; do [[ -f "$LOG_DIR/$f.json" ]] && jsons+=("$LOG_DIR/$f.json"); done
    if ((${#jsons[@]})); then
      echo
      "$PY" benchmarks/gpu_bench_table.py "${jsons[@]}"
    fi
  } | tee "$LOG_DIR/tables.txt"
  save
  [[ -n "${OUT:-}" && -d "$OUT" ]] && cp "$LOG_DIR/tables.txt" "$OUT/" 2>/dev/null
  exit "$code"
}

# ----- preflight: is there a GPU, and what the build needs -----------------------------------
PREFLIGHT=$(
  cat <<'EOF'
import os, sys, sysconfig
header = os.path.join(sysconfig.get_paths()["include"], "Python.h")
print(f"python {sys.version.split()[0]} at {sys.executable}; Python.h {'found' if os.path.exists(header) else 'MISSING'}")
import torch
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}; torch sees GPU: {gpu}")
try:
    import triton
    print(f"triton {triton.__version__}")
except ImportError as error:
    print(f"triton: {error}")
sys.exit(0 if gpu and os.path.exists(header) else 1)
EOF
)
SANITIZER=""
for candidate in "$(command -v compute-sanitizer)" "${CUDA_HOME:+$CUDA_HOME/bin/compute-sanitizer}" \
  "${CUDA_HOME:+$CUDA_HOME/compute-sanitizer/compute-sanitizer}" /usr/local/cuda/bin/compute-sanitizer \
  /usr/local/cuda/compute-sanitizer/compute-sanitizer; do
  if [[ -n "$candidate" && -x "$candidate" ]]; then SANITIZER=$candidate; break; fi
done
SANITIZER_LOOKED="PATH, \$CUDA_HOME, /usr/local/cuda"

t0=$(date +%s)
{
  echo "nvidia-smi: $(command -v nvidia-smi >/dev/null && nvidia-smi -L 2>&1 | head -n 1 || echo 'not found')"
  echo "nvcc: $(command -v nvcc || ls /usr/local/cuda/bin/nvcc 2>/dev/null || echo 'not found') $(nvcc --version 2>/dev/null | tail -n 1)"
  echo "compute-sanitizer: ${SANITIZER:-not found (looked in $SANITIZER_LOOKED)}"
  timeout 60 "$PY" -c "$PREFLIGHT"
} >"$LOG_DIR/preflight.log" 2>&1
rc=$?
cat "$LOG_DIR/preflight.log"
GPU_NAME=$(grep -o "torch sees GPU: .*" "$LOG_DIR/preflight.log" | cut -d' ' -f4-)
if [[ -z "$GPU_NAME" || "$GPU_NAME" == None ]]; then
  GPU_NAME=""
  why=$(grep -E "^nvidia-smi|torch sees GPU|No module named" "$LOG_DIR/preflight.log" | sed 's/^torch .*; //' \
    | paste -sd ';' | sed 's/;/; /g')
  row preflight "NO GPU" "$(($(date +%s) - t0))" "$why"
  for name in "${STEPS[@]:1}"; do
    [[ -n "${SELECTED[$name]:-}" ]] && row "$name" "not started" "-" "no GPU here"
  done
  finish 2
fi
if ((rc != 0)); then
  row preflight "FAILED (rc $rc)" "$(($(date +%s) - t0))" "$(key_of "$LOG_DIR/preflight.log" "MISSING|Error")"
  FAILED=1
else
  row preflight ok "$(($(date +%s) - t0))" "$GPU_NAME, $(grep -o '^torch [^,]*' "$LOG_DIR/preflight.log")"
fi
save

# ----- build -----------------------------------------------------------------------------------
SUFFIX=$("$PY" -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')
modules_fresh() {  # both modules exist and are newer than every source they are built from
  local module
  for module in dps_fast/_cpu_kernels$SUFFIX dps_fast/_cuda_kernels$SUFFIX; do
    [[ -f "$module" ]] || return 1
    [[ -z "$(find csrc CMakeLists.txt setup.py dps_fast/toolchain.py -newer "$module" -print -quit)" ]] || return 1
  done
}
CHECK_MODULES='import dps_fast._cpu_kernels, dps_fast._cuda_kernels as m; print("modules import; cuda sm", m.archs)'
if modules_fresh; then
  [[ -n "${SELECTED[build]:-}" ]] && row build "skipped" "-" "both modules newer than their sources"
elif [[ -n "${SELECTED[build]:-}" || ${#SELECTED[@]} -gt 1 ]]; then
  run_step build "modules import|Error|error:" bash -c 'env DPS_FAST_CUDA=1 DPS_FAST_CUDA_ARCHS="${DPS_FAST_CUDA_ARCHS:-90}" \
    "$0" setup.py build_ext --inplace && "$0" -c "$1"' "$PY" "$CHECK_MODULES"
fi

# ----- the checks ------------------------------------------------------------------------------
PYTEST=("$PY" -m pytest -q -rfEs -p no:cacheprovider -o faulthandler_timeout=120)
"$PY" -c "import pytest_timeout" 2>/dev/null && PYTEST+=(--timeout=120)
TESTS_KEY="[0-9]+ (passed|failed|error|skipped)|no tests ran"
BENCH=("$PY" -m dps_fast bench --device cuda --sections step,boundary --seconds 0.5 --no-progress)
sanitize() {  # sanitize STEP TOOL: compute-sanitizer on benchmarks/sanitizer_cases.py, or a row saying why not
  local name=$1 tool=$2
  if [[ -z "$SANITIZER" ]]; then
    row "$name" "skipped" "-" "compute-sanitizer not found (looked in $SANITIZER_LOOKED)"
    return
  fi
  run_step "$name" "ERROR SUMMARY|RACECHECK SUMMARY|cases: " env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
    "$SANITIZER" --tool "$tool" --report-api-errors no --error-exitcode 1 "$PY" benchmarks/sanitizer_cases.py "$tool"
}

for name in "${STEPS[@]:2}"; do
  [[ -n "${SELECTED[$name]:-}" ]] || continue
  case $name in
    info) run_step info "auto' picks" "$PY" -m dps_fast info ;;
    cuda-tests) run_step cuda-tests "$TESTS_KEY" "${PYTEST[@]}" tests/test_backend_cuda.py ;;
    triton-tests) run_step triton-tests "$TESTS_KEY" "${PYTEST[@]}" tests/test_backend_triton.py ;;
    # shellcheck disable=SC2086  # BENCH_ARGS is a list of arguments
    bench) run_step bench @rows "${BENCH[@]}" --scale 0.1654 --json "$LOG_DIR/bench.json" ${BENCH_ARGS:-} ;;
    # shellcheck disable=SC2086  # bf16 parameters, a dps_fast row per state format (issue 20)
    bench-bf16) run_step bench-bf16 @rows "${BENCH[@]}" --scale 0.1654 --dtype bf16 --state-dtype fp32,bf16 \
      --rounding stochastic --sections step --json "$LOG_DIR/bench-bf16.json" ${BENCH_ARGS:-} ;;
    # shellcheck disable=SC2086
    bench-large) run_step bench-large @rows "${BENCH[@]}" --scale 1.108 --json "$LOG_DIR/bench-large.json" \
      ${BENCH_ARGS:-} ;;
    memcheck) sanitize memcheck memcheck ;;
    racecheck) sanitize racecheck racecheck ;;
    scaler-cost) run_step scaler-cost "median paired ratio" "$PY" benchmarks/grad_scaler_cost.py --device cuda ;;
  esac
done
finish $FAILED
