#!/usr/bin/env bash
# CI stage: fusedclip's CUDA extension against the torch the GPU machines run, on a CPU-only machine.
#
# PyPI's torch==2.11.0 is the CUDA 13.0 build. In a venv of its own (pinned by .ci/torch-2.11-cu130.txt, cached
# under $FUSEDCLIP_CI_CACHE and reused while the pins are unchanged) this stage:
#   1. builds fusedclip._C with setup.py (pip install --no-build-isolation) and with CMake (target fusedclip_C),
#      against the plain CUDA 13 toolkit, with CUDA_HOME the only CUDA setting;
#   2. loads each build: every op it defines has a CUDA kernel, build_info() lists the archs;
#   3. runs the CPU test suite under torch 2.11 (the extension loads and reports "no CUDA device"), which also
#      checks both builds' SASS (128-bit global loads/stores, no local memory).
# The builds happen in a copy of the tree, so no build output lands in the checkout.
#
# Environment: FUSEDCLIP_CI_CACHE (default ~/.cache/fusedclip-ci), PYTHON (default python3), CUDA_HOME (default:
# found as setup.py finds it).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
PY=${PYTHON:-python3}
CACHE=${FUSEDCLIP_CI_CACHE:-$HOME/.cache/fusedclip-ci}
VENV=$CACHE/venv-torch-2.11-cu130
WORK=$CACHE/work
JOBS=$(nproc 2>/dev/null || echo 2)
T0=$SECONDS

step() { printf '\n=== [torch-cuda-build +%ss] %s\n' "$((SECONDS - T0))" "$*"; }
die() {
  printf '\n!!! [torch-cuda-build] FAILED: %s\n' "$*" >&2
  exit 1
}
trap 'printf "\n!!! [torch-cuda-build] FAILED (exit %s) at line %s: %s\n" "$?" "$LINENO" "$BASH_COMMAND" >&2' ERR
# The last lines of a log, then fail.
fail_with_log() {
  echo "--- last 80 lines of $1" >&2
  tail -n 80 "$1" >&2
  die "$2 (full log: $1)"
}

step "CUDA toolkit"
if [ -z "${CUDA_HOME:-}" ]; then
  found=$("$PY" - <<'EOF'
import importlib.util
spec = importlib.util.spec_from_file_location("fusedclip_setup", "setup.py")
setup = importlib.util.module_from_spec(spec)
spec.loader.exec_module(setup)
home, why = setup.find_cuda_home()
print(home or "", why, sep="\t")
EOF
  )
  CUDA_HOME=${found%%$'\t'*}
  echo "setup.py's find_cuda_home: ${found#*$'\t'}"
fi
[ -n "$CUDA_HOME" ] || die "no CUDA toolkit found: set CUDA_HOME to a CUDA 13 toolkit (nvcc and the runtime)"
"$CUDA_HOME/bin/nvcc" --version | tail -n 2
"$CUDA_HOME/bin/nvcc" --version | grep -q "release 13\." \
  || die "$CUDA_HOME/bin/nvcc is not CUDA 13 (torch 2.11.0 is built with CUDA 13.0)"
# CUDA_HOME is the only CUDA setting the builds see.
export CUDA_HOME
unset CUDA_PATH CUDACXX CUDAARCHS TORCH_CUDA_ARCH_LIST
echo "CUDA_HOME=$CUDA_HOME"

step "venv with torch 2.11.0+cu130 ($VENV)"
bash .ci/torch-venv.sh "$PY" "$VENV"

step "copying the tree to $WORK/src (builds stay out of the checkout)"
rm -rf "$WORK"
mkdir -p "$WORK/src"
git -C "$REPO" ls-files -z --cached --others --exclude-standard \
  | (cd "$REPO" && xargs -0 -r sh -c 'for f; do [ -e "$f" ] && printf "%s\0" "$f"; done' sh) \
  | (cd "$REPO" && tar --null -T - -cf -) | tar -xf - -C "$WORK/src"
[ -f "$WORK/src/setup.py" ] || die "copying the tree failed"
SRC=$WORK/src

step "setup.py build: pip install --no-build-isolation (MAX_JOBS=$JOBS)"
t=$SECONDS
(cd "$SRC" && MAX_JOBS=$JOBS "$VENV/bin/python" -m pip install --disable-pip-version-check --no-cache-dir \
  --no-build-isolation --no-deps --no-index -v . >"$WORK/setup-build.log" 2>&1) \
  || fail_with_log "$WORK/setup-build.log" "setup.py build"
grep -m1 "fusedclip: building the CUDA extension" "$WORK/setup-build.log" \
  || fail_with_log "$WORK/setup-build.log" "setup.py did not build the CUDA extension"
if grep -E "ptxas +(warning|error)" "$WORK/setup-build.log"; then
  fail_with_log "$WORK/setup-build.log" "ptxas reported spills or local memory in the setup.py build"
fi
SETUP_SO=$(cd "$WORK" && "$VENV/bin/python" -c \
  'import importlib.util; print(importlib.util.find_spec("fusedclip._C").origin)')
echo "built $SETUP_SO ($((SECONDS - t))s)"
(cd "$WORK" && "$VENV/bin/python" "$REPO/.ci/check_cuda_extension.py" "$SETUP_SO" "8.0;9.0+PTX") \
  || die "the setup.py build of fusedclip._C failed its check"

step "CMake build: target fusedclip_C"
t=$SECONDS
prefix=$("$VENV/bin/python" -c 'import torch; print(torch.utils.cmake_prefix_path)')
cmake -S "$SRC" -B "$WORK/cmake" -DCMAKE_PREFIX_PATH="$prefix" -DPython3_EXECUTABLE="$VENV/bin/python" \
  >"$WORK/cmake-configure.log" 2>&1 || fail_with_log "$WORK/cmake-configure.log" "cmake configure"
grep "fusedclip:" "$WORK/cmake-configure.log"
grep -q "building the torch extension target fusedclip_C" "$WORK/cmake-configure.log" \
  || fail_with_log "$WORK/cmake-configure.log" "CMake did not define fusedclip_C"
cmake --build "$WORK/cmake" --target fusedclip_C -j "$JOBS" >"$WORK/cmake-build.log" 2>&1 \
  || fail_with_log "$WORK/cmake-build.log" "cmake --build --target fusedclip_C"
CMAKE_SO=$(ls "$WORK"/cmake/_C.*.so)
echo "built $CMAKE_SO ($((SECONDS - t))s)"
(cd "$WORK" && "$VENV/bin/python" "$REPO/.ci/check_cuda_extension.py" "$CMAKE_SO" "80;90") \
  || die "the CMake build of fusedclip._C failed its check"

step "the CPU test suite under torch 2.11.0+cu130"
(cd "$WORK" && "$VENV/bin/python" -c 'import fusedclip, fusedclip.backends as b
print("fusedclip from", fusedclip.__file__)
print("cuda backend:", b.unavailable_reasons().get("cuda"))')
# The kernels' own nvcc builds (CMake kernels target, per-dtype SASS probes) do not involve torch: the torch 2.13
# run covers them. Both extension builds above get their SASS checked here (test_built_extension_*). torchtitan, the
# MoE tests' second oracle, is not in this venv: there they check against their float64 reference alone.
rc=0
(cd "$SRC" && FUSEDCLIP_EXTENSION_FILES="$CMAKE_SO" FUSEDCLIP_TEST_WITHOUT_TORCHTITAN=1 "$VENV/bin/pytest" -q \
  --deselect tests/test_cuda_build.py::test_kernels_compile_for_sm80_sm90_without_warnings \
  --deselect tests/test_cuda_build.py::test_built_kernels_use_128bit_global_memory_and_no_local_memory \
  -k "not test_each_dtype_hot_loop_uses_128bit_global_memory") || rc=$?
[ "$rc" -eq 0 ] || die "the test suite failed under torch 2.11 (pytest exit $rc)"
step "done: both builds of fusedclip._C load under torch 2.11.0+cu130 and the suite passes (${SECONDS}s in all)"
