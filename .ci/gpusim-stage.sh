#!/usr/bin/env bash
# CI stage: fusedclip's CUDA kernels executed in a GPU simulator (GPGPU-Sim) on a CPU-only machine, every result
# compared with a float64 reference (tests/gpusim). A simulator result, not a GPU result: see tests/gpusim/README.md.
#
#   1. the simulator kit (../shared/gpusim: GPGPU-Sim with fixes and a CUDA 11.8 toolchain), with our own fixes
#      to the simulator (tests/gpusim/gpgpu-sim-*.patch) on top of the kit's, set up into $FUSEDCLIP_CI_CACHE/gpusim
#      (about 3-6 min once per machine; then cached), and the kit's check.sh;
#   2. csrc/kernels + tests/gpusim/sim_abi.cu built by nvcc 11.8 for sm_70 into one shared library (cached by the
#      sources' hash), warnings as errors;
#   3. pytest over tests/gpusim inside the simulator, at once: in functional mode (every case, one process per core)
#      and in a process of its own in performance mode (the sim_perf cases, blocks concurrent on 8 simulated SMs);
#      beside them, the Triton kernels (tests/gpusim/triton_sim.py: compiled for sm_70, their Triton cache kept in
#      $FUSEDCLIP_CI_CACHE/gpusim-triton, then run in functional mode);
#   4. what ran: cases, launches, seconds in the simulator, simulated cycles.
#
# Environment: FUSEDCLIP_CI_CACHE (default ~/.cache/fusedclip-ci), FUSEDCLIP_GPUSIM_KIT (default: ../shared/gpusim
# beside the checkout, else /work/shared/gpusim), PYTHON (default python3, with fusedclip and pytest installed).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
PY=${PYTHON:-python3}
CACHE=${FUSEDCLIP_CI_CACHE:-$HOME/.cache/fusedclip-ci}
PREFIX=$CACHE/gpusim
T0=$SECONDS

step() { printf '\n=== [gpusim +%ss] %s\n' "$((SECONDS - T0))" "$*"; }
die() {
  printf '\n!!! [gpusim] FAILED: %s\n' "$*" >&2
  exit 1
}

KIT=""
for k in "${FUSEDCLIP_GPUSIM_KIT:-}" "$REPO/../shared/gpusim" /work/shared/gpusim; do
  if [ -n "$k" ] && [ -f "$k/setup.sh" ]; then KIT=$(cd "$k" && pwd); break; fi
done
if [ -z "$KIT" ]; then
  # Not this project's to provide: without the kit the stage cannot run. Said loudly, and not a failure.
  printf '\n!!! [gpusim] NOT RUN: no simulator kit (looked for setup.sh in $FUSEDCLIP_GPUSIM_KIT, %s, %s)\n' \
    "$REPO/../shared/gpusim" /work/shared/gpusim >&2
  exit 0
fi

step "simulator kit $KIT -> $PREFIX"
# The kit's fixes, and ours on top (tests/gpusim/README.md says what each fixes).
mkdir -p "$CACHE"
PATCH=$CACHE/gpusim-fixes.patch
cat "$KIT/gpgpu-sim-fixes.patch" tests/gpusim/gpgpu-sim-*.patch >"$PATCH"
bash "$KIT/setup.sh" "$PREFIX" "" "$PATCH" >"$CACHE/gpusim-setup.log" 2>&1 || {
  tail -n 40 "$CACHE/gpusim-setup.log" >&2
  die "the kit's setup.sh failed (log: $CACHE/gpusim-setup.log)"
}
tail -n 1 "$CACHE/gpusim-setup.log"
bash "$KIT/check.sh" "$PREFIX" || die "the kit's check.sh: this simulator build gives wrong answers"

"$PY" -c 'import xdist' 2>/dev/null || "$PY" -m pip install --quiet --disable-pip-version-check pytest-xdist==3.8.0

step "the kernels for sm_70 (nvcc 11.8) with the test ABI"
SOURCES=(csrc/kernels/fusedclip_kernels.h csrc/kernels/common.cuh csrc/kernels/norm.cu csrc/kernels/elementwise.cu
  tests/gpusim/sim_abi.cu)
NVCC_FLAGS=(-ccbin g++-11 -std=c++17 -O3 -arch=sm_70 --cudart shared --cudadevrt none -shared -Xcompiler=-fPIC
  -Xcompiler=-Wall,-Wextra,-Werror --Werror=all-warnings -Icsrc/kernels)
key=$( (cat "${SOURCES[@]}"; echo "${NVCC_FLAGS[*]}") | sha256sum | cut -c1-16)
LIB=$CACHE/gpusim-lib/$key/libfusedclip_sim.so
if [ -f "$LIB" ]; then
  echo "cached: $LIB"
else
  rm -rf "$CACHE/gpusim-lib"
  mkdir -p "$(dirname "$LIB")"
  PATH="$PREFIX/cuda11/bin:$PATH" nvcc "${NVCC_FLAGS[@]}" csrc/kernels/norm.cu csrc/kernels/elementwise.cu \
    tests/gpusim/sim_abi.cu -o "$LIB.tmp" || die "nvcc 11.8 could not build the kernels for sm_70"
  mv "$LIB.tmp" "$LIB"
  echo "built $LIB"
fi

# run MODE PYTEST_ARGS...: pytest over tests/gpusim in a fresh temporary folder (the simulator writes there), its
# output in $STATS_DIR/MODE.out, its exit status in $STATS_DIR/MODE.rc
run() {
  local mode=$1
  shift
  local w
  w=$(mktemp -d)
  cp "$PREFIX"/config/* "$w/"
  if [ "$mode" = performance ]; then
    sed -i -e 's/^-gpgpu_ptx_sim_mode 1/-gpgpu_ptx_sim_mode 0/' -e 's/^-gpgpu_n_clusters .*/-gpgpu_n_clusters 8/' \
      "$w/gpgpusim.config"
  fi
  local rc=0
  (
    cd "$w"
    # shellcheck disable=SC1091
    source "$PREFIX/runenv.sh"
    [ "$mode" = performance ] && export PTX_SIM_MODE_FUNC=0
    PYTORCH_BIN=$LIB FUSEDCLIP_GPUSIM_LIB=$LIB FUSEDCLIP_GPUSIM_STATS=$STATS_DIR/$mode \
      FUSEDCLIP_GPUSIM_LOG=$w/gpusim.log \
      "$PY" -m pytest -q -p no:cacheprovider --rootdir "$REPO" -c "$REPO/pyproject.toml" \
      --junitxml "$STATS_DIR/$mode.xml" "$@" "$REPO/tests/gpusim"
  ) >"$STATS_DIR/$mode.out" 2>&1 || rc=$?
  if [ "$rc" -ne 0 ]; then
    local log
    for log in "$w"/gpusim.log*; do
      echo "--- last 30 lines of the simulator's log $log"
      tail -n 30 "$log" || true
    done >>"$STATS_DIR/$mode.out"
  fi
  echo "$rc" >"$STATS_DIR/$mode.rc"
  rm -rf "$w"
}

# run_triton: the Triton kernels (compile, then run in a simulated process of their own), output and exit status
# in $STATS_DIR/triton.{out,rc}
run_triton() {
  local rc=0
  TRITON_CACHE_DIR=$CACHE/gpusim-triton FUSEDCLIP_GPUSIM_STATS=$STATS_DIR/triton \
    "$PY" tests/gpusim/triton_sim.py "$PREFIX" >"$STATS_DIR/triton.out" 2>&1 || rc=$?
  echo "$rc" >"$STATS_DIR/triton.rc"
}

STATS_DIR=$(mktemp -d)
JOBS=$(nproc 2>/dev/null || echo 2)
# All at once: each simulated process spends its first seconds parsing the kernels' PTX on one core.
step "in parallel: functional mode, every case ($JOBS processes); performance mode (blocks concurrent on 8 simulated SMs), the sim_perf cases; the Triton kernels"
run performance -m sim_perf &
run_triton &
run functional -n "$JOBS"
wait
for mode in functional performance triton; do
  printf -- '--- %s\n' "$([ "$mode" = triton ] && echo "the Triton kernels" || echo "$mode mode")"
  grep -v '^GPGPU-Sim' "$STATS_DIR/$mode.out" | tail -n 60
done
for mode in functional performance; do
  [ "$(cat "$STATS_DIR/$mode.rc")" = 0 ] || die "the $mode-mode simulator run failed (pytest exit $(cat "$STATS_DIR/$mode.rc"))"
done
[ "$(cat "$STATS_DIR/triton.rc")" = 0 ] || die "the Triton kernels' simulator run failed (exit $(cat "$STATS_DIR/triton.rc"))"

step "what ran"
"$PY" - "$STATS_DIR" <<'EOF' || die "the first launches of the simulated processes disagree"
import glob, json, sys, xml.etree.ElementTree as ET
d = sys.argv[1]
for mode in ("functional", "performance"):
    runs = [json.load(open(f)) for f in sorted(glob.glob(f"{d}/{mode}/*.json"))]
    suite = ET.parse(f"{d}/{mode}.xml").getroot().find("testsuite")
    n, skip = int(suite.get("tests")), int(suite.get("skipped"))
    bad = int(suite.get("failures")) + int(suite.get("errors"))
    kernels = {}
    for r in runs:
        for k, v in r["by_kernel"].items():
            kernels[k] = kernels.get(k, 0) + v
    kinds = ", ".join(f"{k} {v}" for k, v in sorted(kernels.items()))
    cycles = sum(r["cycles"] for r in runs)
    print(f"gpusim {mode}: {n - bad - skip} cases passed, {bad} failed, {skip} skipped, in {len(runs)} simulated "
          f"process(es); {sum(r['launches'] for r in runs)} kernel launches ({kinds}) taking "
          f"{sum(r['launch_seconds'] for r in runs):.0f} CPU s"
          + (f", {cycles:,} simulated GPU cycles" if cycles else "")
          + f"; loading the kernels {max(r['load_seconds'] for r in runs):.0f} s per process")
    costly = sorted((c for r in runs for c in r["costliest"]), key=lambda c: -c[1])[:5]
    print("  costliest: " + ", ".join(f"{name} {sec:.1f} s" for name, sec in costly))
t = json.load(open(f"{d}/triton/run.json"))
kinds = ", ".join(f"{k} {v}" for k, v in sorted(t["by_kernel"].items()))
print(f"gpusim triton: {t['cases'] - t['failed']} cases passed, {t['failed']} failed, in 1 simulated process; "
      f"{t['launches']} kernel launches ({kinds}) of {t['variants']} variants compiled for sm_70, taking "
      f"{t['launch_seconds']:.0f} CPU s; loading the kernels {t['load_seconds']:.0f} s")
print("  costliest: " + ", ".join(f"{name} {sec:.1f} s" for name, sec in t["costliest"]))
# Every CUDA process launched the same probe first (tests/gpusim/conftest.py): the same bits in each.
bits = {json.load(open(f))["probe_total_bits"] for mode in ("functional", "performance")
        for f in glob.glob(f"{d}/{mode}/*.json")}
print(f"the first launch of each process: {'the same bits' if len(bits) == 1 else 'DIFFERENT bits'} ({bits})")
sys.exit(len(bits) != 1)
EOF
rm -rf "$STATS_DIR"
step "done (${SECONDS}s in all)"
