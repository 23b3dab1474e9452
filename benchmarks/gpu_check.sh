#!/usr/bin/env bash
# One-shot GPU check for parallax's CUDA kernels, sized for a fresh H200 machine (torch with
# CUDA, nvcc, ninja, pytest; no internet) and one device call (< 10 minutes, all together):
#   1. build parallax._C in place (setup.py, sm_90a only to save time)
#   2. the CUDA kernel tests (tests/test_kernels_cuda.py: every kernel, the paged attention
#      kernel against its float64 oracle and torch reference, bad metadata, opcheck)
#   3. compute-sanitizer memcheck on a small case per kernel, if the tool is there
#   4. kernel timings vs torch (the paged kernel vs its torch reference first) and the
#      end-to-end decode benchmark: one table
#   5. a summary table: each section's result and time, the test count, the paged rows
# Run from the repository root:  bash benchmarks/gpu_check.sh
# GPU_CHECK_BUDGET (seconds, default 540) bounds the whole run: each section's timeout is
# cut to what is left, and sections that no longer fit are skipped (and reported).
# Logs go to $OUT (if set) or ./gpu_check_logs. Exits non-zero if any section failed.
set -euo pipefail

cd "$(dirname "$0")/.."
LOG_DIR="${OUT:-$PWD/gpu_check_logs}"
mkdir -p "$LOG_DIR"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export MAX_JOBS="${MAX_JOBS:-16}"
PY="${PYTHON:-python3}"
DEADLINE=$((SECONDS + ${GPU_CHECK_BUDGET:-540}))
FAILED=()
SUMMARY=()

section() { printf '\n===== %s  [%s] =====\n' "$1" "$(date +%T)"; }
# run NAME SECONDS CMD...: run with a timeout (cut to the budget left), log to
# $LOG_DIR/NAME.log, record the result, go on
run() {
  local name=$1 secs=$2; shift 2
  local left=$((DEADLINE - SECONDS - 5))
  if [ "$left" -lt 20 ]; then
    echo "!! $name skipped: the budget is spent"
    FAILED+=("$name"); SUMMARY+=("$(printf '%-10s %-8s %5s s' "$name" skipped 0)")
    return 0
  fi
  [ "$secs" -gt "$left" ] && secs=$left
  local rc=0 t0=$SECONDS
  timeout --kill-after=10 "$secs" "$@" 2>&1 | tee "$LOG_DIR/$name.log" || rc=$?
  local status=ok
  if [ "$rc" -ne 0 ]; then
    status="rc=$rc"
    [ "$rc" -eq 124 ] && status="timeout"
    echo "!! $name failed (exit $rc; 124 = timed out after ${secs}s)"
    FAILED+=("$name")
  fi
  SUMMARY+=("$(printf '%-10s %-8s %5d s' "$name" "$status" $((SECONDS - t0)))")
  return 0
}

section "environment"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv || true
"$PY" -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'gpu', torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)" || true
command -v nvcc >/dev/null && nvcc --version | tail -1 || echo "nvcc: not found"
command -v ninja >/dev/null && echo "ninja $(ninja --version)" || echo "ninja: not found"

section "build parallax._C (setup.py build_ext --inplace, sm_90a)"
rm -f src/parallax/_C*.so
PARALLAX_CUDA_ARCHS="${PARALLAX_CUDA_ARCHS:-90a}" run build 240 "$PY" setup.py -q build_ext --inplace
ls -l src/parallax/_C*.so 2>/dev/null || echo "no prebuilt extension: parallax.ops will try a JIT build"
run import 240 "$PY" -c "import parallax.ops as o; from parallax.ops import cuda as C; ok = C.load_extension(); print('extension loaded:', ok, C.load_error() or ''); print('active backend:', o.active_backend()); print('paged attention runs on:', o.kernel_report()['ops']['paged_attention_with_kvcache']); assert ok"

section "CUDA kernel tests"
run tests 200 "$PY" -m pytest tests/test_kernels_cuda.py -q --maxfail=20 -p no:cacheprovider -o addopts="" \
  --timeout=180

section "compute-sanitizer memcheck (small case)"
if command -v compute-sanitizer >/dev/null; then
  run memcheck 90 compute-sanitizer --tool memcheck --error-exitcode 1 --target-processes all \
    "$PY" benchmarks/bench_kernels.py --sanitize-case
else
  echo "compute-sanitizer not found: skipped"
fi

section "benchmarks (kernels vs torch, end-to-end decode)"
run bench 180 "$PY" benchmarks/bench_kernels.py

section "summary"
printf '%-10s %-8s %7s\n' section result time
printf '%s\n' "${SUMMARY[@]}"
[ -f "$LOG_DIR/tests.log" ] && { grep -E "passed|failed|error" "$LOG_DIR/tests.log" | tail -1 || true; }
if [ -f "$LOG_DIR/bench.log" ]; then
  grep -E "^op |^paged_attention" "$LOG_DIR/bench.log" || true
fi
if [ "${#FAILED[@]}" -ne 0 ]; then
  echo "FAILED sections: ${FAILED[*]} (logs in $LOG_DIR)"
  exit 1
fi
echo "all sections passed (logs in $LOG_DIR)"
