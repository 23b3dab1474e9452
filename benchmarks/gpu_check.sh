#!/usr/bin/env bash
# One-shot GPU check for parallax's CUDA kernels, sized for a fresh H200 machine (torch with
# CUDA, nvcc, ninja, pytest; no internet) and < 8 minutes:
#   1. build parallax._C in place (setup.py, sm_90a only to save time)
#   2. the CUDA kernel tests (tests/test_kernels_cuda.py)
#   3. compute-sanitizer memcheck on a small case, if the tool is there
#   4. kernel timings vs torch and the end-to-end decode benchmark (one table)
# Run from the repository root:  bash benchmarks/gpu_check.sh
# Logs go to $OUT (if set) or ./gpu_check_logs. Exits non-zero if any section failed.
set -euo pipefail

cd "$(dirname "$0")/.."
LOG_DIR="${OUT:-$PWD/gpu_check_logs}"
mkdir -p "$LOG_DIR"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export MAX_JOBS="${MAX_JOBS:-16}"
PY="${PYTHON:-python3}"
FAILED=()

section() { printf '\n===== %s  [%s] =====\n' "$1" "$(date +%T)"; }
# run NAME SECONDS CMD...: run with a timeout, log to $LOG_DIR/NAME.log, record failure, go on
run() {
  local name=$1 secs=$2; shift 2
  local rc=0
  timeout --kill-after=10 "$secs" "$@" 2>&1 | tee "$LOG_DIR/$name.log" || rc=$?
  if [ "$rc" -ne 0 ]; then
    echo "!! $name failed (exit $rc; 124 = timed out after ${secs}s)"
    FAILED+=("$name")
  fi
  return 0
}

section "environment"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv || true
"$PY" -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'gpu', torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)" || true
command -v nvcc >/dev/null && nvcc --version | tail -1 || echo "nvcc: not found"
command -v ninja >/dev/null && echo "ninja $(ninja --version)" || echo "ninja: not found"

section "build parallax._C (setup.py build_ext --inplace, sm_90a)"
rm -f src/parallax/_C*.so
PARALLAX_CUDA_ARCHS="${PARALLAX_CUDA_ARCHS:-90a}" run build 300 "$PY" setup.py -q build_ext --inplace
ls -l src/parallax/_C*.so 2>/dev/null || echo "no prebuilt extension: parallax.ops will try a JIT build"
run import 300 "$PY" -c "import parallax.ops as o; from parallax.ops import cuda as C; ok = C.load_extension(); print('extension loaded:', ok, C.load_error() or ''); print('active backend:', o.active_backend()); assert ok"

section "CUDA kernel tests"
run tests 300 "$PY" -m pytest tests/test_kernels_cuda.py -q -x -p no:cacheprovider -o addopts="" --timeout=280

section "compute-sanitizer memcheck (small case)"
if command -v compute-sanitizer >/dev/null; then
  run memcheck 150 compute-sanitizer --tool memcheck --error-exitcode 1 --target-processes all \
    "$PY" benchmarks/bench_kernels.py --sanitize-case
else
  echo "compute-sanitizer not found: skipped"
fi

section "benchmarks (kernels vs torch, end-to-end decode)"
run bench 240 "$PY" benchmarks/bench_kernels.py

section "summary"
if [ "${#FAILED[@]}" -ne 0 ]; then
  echo "FAILED sections: ${FAILED[*]} (logs in $LOG_DIR)"
  exit 1
fi
echo "all sections passed (logs in $LOG_DIR)"
