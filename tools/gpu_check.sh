#!/usr/bin/env bash
# One prepared GPU check (issue 15 item 4), sized for < 8 minutes on an H200:
#   1. build pyfusion._C with the CUDA kernels (PYFUSION_CUDA=ON, no network: tools/dev_build.sh into the tree);
#   2. the GPU tests (pytest -m gpu) and the Triton kernel tests compiled on the GPU;
#   3. the GPU benchmarks (correlation, assignment, partial linear, partial conv), each writing
#      bench/results/<name>_gpu.md with the GPU named.
# Every step has a time limit, and the whole run a budget (GPU_CHECK_BUDGET seconds, default 470): a step that
# cannot get at least its minimum time is skipped, and the script says so. Results and the log are also copied to
# $OUT when that is set (the device machine returns only what is written there).
# Usage: tools/gpu_check.sh [--quick]   (--quick: the benchmarks' small modes)
# Exit status: 0 if every step that ran passed, 1 otherwise (2 if no GPU is visible: nothing GPU-side could run).
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
py="${PYTHON:-python}"
budget="${GPU_CHECK_BUDGET:-470}"
quick=""
if [[ "${1:-}" == "--quick" ]]; then quick="--quick"; fi
start=$(date +%s)
log_dir="$(mktemp -d)"
log="$log_dir/gpu_check.log"
failed=()
skipped=()
exec > >(tee -a "$log") 2>&1

elapsed() { echo $(( $(date +%s) - start )); }

# step NAME LIMIT MIN -- command...: runs with min(LIMIT, budget left) seconds, or skips when less than MIN is left.
step() {
  local name="$1" limit="$2" min="$3"
  shift 3
  local left=$(( budget - $(elapsed) ))
  if (( left < min )); then
    echo "== SKIP $name: ${left}s of the ${budget}s budget left, it needs at least ${min}s"
    skipped+=("$name (budget)")
    return 0
  fi
  (( limit > left )) && limit=$left
  echo "== $name (limit ${limit}s, at $(elapsed)s)"
  local t0 rc=0
  t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" || rc=$?
  if (( rc == 0 )); then
    echo "== $name: ok in $(( $(date +%s) - t0 ))s"
  else
    if (( rc == 124 || rc == 137 )); then
      echo "== $name: TIMED OUT after ${limit}s"
    else
      echo "== $name: FAILED (exit $rc) after $(( $(date +%s) - t0 ))s"
    fi
    failed+=("$name")
  fi
}

copy_out() {
  if [[ -n "${OUT:-}" ]]; then
    mkdir -p "$OUT/bench/results"
    cp -f bench/results/*_gpu.md "$OUT/bench/results/" 2>/dev/null || true
    cp -f "$log" "$OUT/gpu_check.log" 2>/dev/null || true
  fi
}

echo "== gpu_check: $(date -u +%Y-%m-%dT%H:%M:%SZ), repository $root, commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
else
  echo "nvidia-smi not found"
fi
"$py" - <<'EOF' || true
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
try:
    import triton
    print("triton", triton.__version__)
except Exception as exc:  # noqa: BLE001
    print("triton not importable:", exc)
EOF
if ! "$py" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "== SKIP everything GPU-side: torch sees no CUDA GPU on this machine (build, GPU tests and benchmarks need one)"
  copy_out
  exit 2
fi

# 1. Build with CUDA (cmake + ninja + pybind11 from the environment; no pip, no network).
step "build (PYFUSION_CUDA=ON)" 240 60 env PYTHON="$py" tools/dev_build.sh -DPYFUSION_CUDA=ON
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET
step "extension sees the GPU" 30 5 "$py" -c "
from pyfusion import _ext
info = _ext.build_info()
print(info)
assert info.get('cuda_compiled') and info.get('cuda_device_count', 0) > 0, 'CUDA kernels not usable: %s' % info
"

# 2. Tests. One Triton config in the tests (PYFUSION_TRITON_AUTOTUNE=0): each autotuned config is a compile; the
# benchmarks below run the autotuned set and check every configuration they time against float64.
step "GPU tests (pytest -m gpu)" 150 30 env PYFUSION_TRITON_AUTOTUNE=0 "$py" -m pytest -q -m gpu -p no:cacheprovider tests
step "Triton kernel tests on the GPU" 120 30 env PYFUSION_TRITON_AUTOTUNE=0 "$py" -m pytest -q -p no:cacheprovider \
  tests/test_kernels_triton.py tests/test_kernels_cuda.py tests/test_kernels_assignment.py

# 3. Benchmarks (each checks its results against a float64 / CPU reference before timing).
mkdir -p bench/results
step "bench: correlation" 60 20 "$py" bench/bench_correlation_gpu.py $quick --out bench/results/correlation_gpu.md
step "bench: assignment" 90 20 "$py" bench/bench_assignment_gpu.py $quick --out bench/results/assignment_gpu.md
step "bench: partial linear" 150 30 "$py" bench/bench_partial_linear_gpu.py $quick \
  --out bench/results/partial_linear_gpu.md
step "bench: partial conv" 120 30 "$py" bench/bench_partial_conv_gpu.py $quick --out bench/results/partial_conv_gpu.md

echo "== done in $(elapsed)s"
if (( ${#skipped[@]} > 0 )); then printf '== skipped: %s\n' "${skipped[@]}"; fi
copy_out
if (( ${#failed[@]} > 0 )); then
  printf '== FAILED: %s\n' "${failed[@]}"
  exit 1
fi
echo "== all steps passed"
