#!/usr/bin/env bash
# The one script to run on a GPU machine (about 6 minutes on one H100; every
# step has a time limit and the whole run stops starting steps after
# GPU_CHECK_SECONDS, default 450). Steps, most valuable first:
#   0. preflight: python, its headers (the build needs Python.h), nvcc, torch, triton
#   1. build in place: pip install --no-build-isolation --no-deps -e . (DPS_FAST_CUDA=1: CUDA must build)
#   2. dps-fast info
#   3. GPU tests: tests/test_backend_cuda.py (CUDA module vs pure PyTorch, >2^31 entries, no host sync
#      (GradScaler included), one launch per step, masked norms)
#   4. the throughput benchmark: python -m dps_fast bench (50M parameters, step and boundary rows)
#   5. compute-sanitizer memcheck on a small DPSAdamW run (every kernel of the module, odd sizes)
#   6. benchmarks/grad_scaler_cost.py: GradScaler's host-synced path vs DPSAdamW's sync-free one
#   7. GPU tests of the Triton backend: tests/test_backend_triton.py
#   8. compute-sanitizer racecheck on the selection (shared-memory histograms)
# and prints a short table last. Logs and bench.json go to LOG_DIR; where $OUT is set (the
# device tool), they are also packed into $OUT/gpu_check.tgz after every step (the tool
# brings back at most 8 files).
#
# Usage, from anywhere:  bash benchmarks/gpu_check.sh [LOG_DIR]
# Environment: PYTHON (default python3), GPU_CHECK_SECONDS, BENCH_ARGS (extra `dps_fast bench` arguments).
set -u -o pipefail

cd "$(dirname "$0")/.." || exit 1
OUT_DIR=${1:-/tmp/dps_gpu_check}
mkdir -p "$OUT_DIR"
PY=${PYTHON:-python3}
BUDGET=${GPU_CHECK_SECONDS:-450}
START=$(date +%s)
SUMMARY=()
FAILED=0

# run_step NAME LIMIT_SECONDS COMMAND...: run with a time limit, log to OUT_DIR/NAME.log,
# show the log's tail, and add a summary row (status, seconds, the log's last line).
run_step() {
  local name=$1 limit=$2
  shift 2
  local left=$((START + BUDGET - $(date +%s)))
  if ((left < 20)); then
    SUMMARY+=("$(printf '%-18s %-22s %6s  %s' "$name" "skipped (time)" "-" "")")
    return
  fi
  ((limit > left)) && limit=$left
  echo
  echo "=== $name (limit ${limit}s): $*"
  local t0 rc status
  t0=$(date +%s)
  timeout --signal=INT --kill-after=15 "$limit" "$@" >"$OUT_DIR/$name.log" 2>&1
  rc=$?
  tail -n 25 "$OUT_DIR/$name.log"
  if ((rc == 0)); then
    status=ok
  elif ((rc == 124 || rc == 130 || rc == 137)); then  # 137: still running after --kill-after
    status="TIMEOUT"
    FAILED=1
  else
    status="FAILED (rc $rc)"
    FAILED=1
  fi
  local last
  last=$(grep -v '^\s*$' "$OUT_DIR/$name.log" | tail -n 1 | cut -c1-70)
  SUMMARY+=("$(printf '%-18s %-22s %6s  %s' "$name" "$status" "$(($(date +%s) - t0))" "$last")")
  save_logs
}

# Where the device tool collects files ($OUT), keep one archive of the logs, fresh after every step.
save_logs() {
  if [[ -n "${OUT:-}" && -d "$OUT" ]]; then
    tar czf "$OUT/gpu_check.tgz" -C "$OUT_DIR" . 2>/dev/null
  fi
}

PREFLIGHT=$(
  cat <<'EOF'
import os, sys, sysconfig
header = os.path.join(sysconfig.get_paths()["include"], "Python.h")
print(f"python {sys.version.split()[0]} at {sys.executable}; Python.h {'found' if os.path.exists(header) else 'MISSING'} ({header})")
import torch
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, GPU {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'}")
try:
    import triton
    print(f"triton {triton.__version__}")
except ImportError as error:
    print(f"triton: {error}")
sys.exit(0 if os.path.exists(header) else 1)
EOF
)

nvidia-smi -L 2>&1 | tee "$OUT_DIR/gpu.txt"

run_step preflight 60 bash -c 'command -v nvcc && nvcc --version | tail -n 2; "$0" -c "$1"' "$PY" "$PREFLIGHT"
run_step build 240 env DPS_FAST_CUDA=1 "$PY" -m pip install --no-build-isolation --no-deps -v -e .
run_step info 60 "$PY" -m dps_fast info
run_step cuda-tests 200 "$PY" -m pytest -q -rs -p no:cacheprovider tests/test_backend_cuda.py
# shellcheck disable=SC2086  # BENCH_ARGS is a list of arguments
run_step bench 200 "$PY" -m dps_fast bench --device cuda --sections step,boundary --scale 0.1654 \
  --no-progress --json "$OUT_DIR/bench.json" ${BENCH_ARGS:-}

# Without the caching allocator every tensor is its own allocation, so an
# access past a tensor's end is outside any allocation and memcheck sees it.
SANITIZER_CASE=$(
  cat <<'EOF'
import torch
from dps_fast import DPSAdamW
from dps_fast.backends import cuda
assert cuda.unavailable_reason(torch.device("cuda")) is None, cuda.unavailable_reason(torch.device("cuda"))
for dtype in (torch.float32, torch.bfloat16):
    for masked in ("grad", "freeze"):
        shapes = [(0,), (1,), (7,), (4097,), (33, 17), (2 * 16384 + 5,)]
        params = [torch.nn.Parameter(torch.randn(s, device="cuda").to(dtype)) for s in shapes]
        opt = DPSAdamW(params, stage_steps=2, masked=masked, backend="cuda")
        for step in range(5):  # explore, explore, boundary + exploit, exploit, explore
            for p in params:
                p.grad = torch.randn_like(p)
            opt.clip_grad_norm_(1.0)  # masked norms in the exploitation steps
            opt.step()
scores = [torch.rand(n, device="cuda") for n in (0, 1, 7, 31, 33, 4097, 3 * 65536 + 5)]
scores.append(torch.zeros(4099, device="cuda")[3:])  # unaligned view, all tied
cuda.select_masks(scores, 0.3)
torch.cuda.synchronize()
print("sanitizer case done")
EOF
)
SELECT_CASE=$(
  cat <<'EOF'
import torch
from dps_fast.backends import cuda
scores = [torch.randint(0, 3, (n,), device="cuda").float() for n in (1, 4097, 65536 + 7)]
cuda.select_masks(scores, 0.3)
torch.cuda.synchronize()
print("racecheck case done")
EOF
)
if command -v compute-sanitizer >/dev/null; then
  run_step memcheck 150 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck \
    --report-api-errors no --error-exitcode 1 "$PY" -c "$SANITIZER_CASE"
else
  SUMMARY+=("$(printf '%-18s %-22s %6s  %s' memcheck "skipped" "-" "compute-sanitizer not found")")
fi
run_step scaler-cost 60 "$PY" benchmarks/grad_scaler_cost.py --device cuda

run_step triton-tests 200 "$PY" -m pytest -q -rs -p no:cacheprovider tests/test_backend_triton.py
if command -v compute-sanitizer >/dev/null; then
  run_step racecheck 90 compute-sanitizer --tool racecheck --report-api-errors no --error-exitcode 1 \
    "$PY" -c "$SELECT_CASE"
fi

echo
echo "=== gpu_check summary: $(head -n 1 "$OUT_DIR/gpu.txt" 2>/dev/null), $(($(date +%s) - START)) s; logs in $OUT_DIR"
printf '%-18s %-22s %6s  %s\n' step status seconds "last log line"
printf '%s\n' "${SUMMARY[@]}"
if [[ -f "$OUT_DIR/bench.json" ]]; then
  "$PY" - "$OUT_DIR/bench.json" <<'EOF'
import json, sys
result = json.load(open(sys.argv[1]))
rows = [r for r in result["rows"] if r["device"].startswith("cuda")]
fused = next((r for r in rows if r["method"] == "AdamW fused" and "median_s" in r), None)
if fused is None:
    sys.exit("bench: no fused AdamW row")
info = next(iter(result["devices"].values()))
print(f"\nbench: {info['name']}, {info['params'] / 1e6:.1f}M parameters; time / fused AdamW step "
      f"({fused['median_s'] * 1e3:.3f} ms); targets for the cuda backend: explore <= 1.3, exploit <= 1.05, "
      "boundary <= 3")
phases = [("step", "explore"), ("step", "exploit"), ("step", "exploit freeze"), ("boundary", "select")]
print(f"{'backend':<10}" + "".join(f"{p:>16}" for _, p in phases))
for backend in sorted({r["backend"] for r in rows if r.get("backend")}):
    cells = []
    for section, phase in phases:
        row = next((r for r in rows if r.get("backend") == backend and r["section"] == section
                    and r["phase"] == phase), None)
        if row is None or "median_s" not in row:
            cells.append("-" if row is None else row.get("error", "failed")[:14])
        else:  # the bench's paired ratio when it has one
            cells.append(f"{row.get('vs_fused') or row['median_s'] / fused['median_s']:.3f}x")
    print(f"{backend:<10}" + "".join(f"{c:>16}" for c in cells))
EOF
fi
save_logs
exit $FAILED
