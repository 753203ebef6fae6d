#!/usr/bin/env bash
# Developer build: compile pyfusion._C into the source tree (pyfusion/_C*.so, git-ignored), so that
# `PYTHONPATH=$PWD python -m pytest` runs against this checkout without a pip install.
# Usage: tools/dev_build.sh [extra cmake args, e.g. -DPYFUSION_CUDA=OFF]
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
build="$root/build/dev"
py="${PYTHON:-python}"
cmake -S "$root" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
  -Dpybind11_DIR="$("$py" -m pybind11 --cmakedir)" -DPython_EXECUTABLE="$(command -v "$py")" "$@" >/dev/null
cmake --build "$build"
cp -f "$build"/_C*.so "$root/pyfusion/"
echo "built $(ls "$root"/pyfusion/_C*.so)"
