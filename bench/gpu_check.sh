#!/usr/bin/env bash
# The GPU check, in groups that each fit one 10-minute device call (the sum of a group's step time limits is at
# most BUDGET_S = 540 s, grace periods included; the dry run checks it):
#
#   group A  env, build (forced), backends, info, tests   the extension built for this GPU, then the whole suite
#   group B  env, build (reused), backends, sanitize-memcheck, sanitize-racecheck, sanitize-synccheck
#                                                           compute-sanitizer over the CUDA- and Triton-backend tests
#   group C  env, build (reused), backends, bench-*         the benchmark presets
#
# Usage: bench/gpu_check.sh [--dry-run] GROUP|STEP...      e.g. `bench/gpu_check.sh A`, `bench/gpu_check.sh tests`
#   --dry-run   print the commands, run none; check the groups' time budgets and the summary written from fake
#               logs (CI runs this: tests/test_gpu_check.py)
#   OUT         where results go (default bench/out; on the device the tool's $OUT), at most three files:
#               gpu_check.json (the summary, rewritten after every step, so it exists however the run ends),
#               gpu_check_logs.tar.gz (every log, the junit XML, the benchmark records: logs/records/*.json), and
#               after a build the extension _C*.so
#   PYTEST_ARGS narrows the tests step (e.g. "tests/test_plan.py -k capture"); MERGE=FILE keeps the stages of an
#               earlier summary that this run does not redo; PYTHON, MAX_JOBS, TORCH_CUDA_ARCH_LIST (default: this
#               GPU's arch only), CUDA_HOME as usual
#   T_ENV T_BUILD T_BACKENDS T_INFO T_TESTS T_SANITIZE T_BENCH   per-step time limits in seconds
#
# Lease plan (one group per device call; expected minutes, limits in brackets):
#   call 1: A   build ~2, tests ~3-4                            [9]  then fix what failed and re-run only that:
#                                                                     `bench/gpu_check.sh tests` with PYTEST_ARGS
#   call 2: B   build reused ~0.2 (~2 on a bare machine), three sanitizers ~1-1.5 each   [9]
#   call 3: C   build reused, six presets ~0.5 each              [9]
# A machine left idle comes back bare: B and C rebuild unless the extension is carried back. Carry it: put the
# _C*.so that call 1 returned into python/fusedclip/ and name that path in the device call's `carry`; the build
# step then only re-installs the package (seconds). Commit $OUT/gpu_check.json as bench/results/<gpu>/gpu_check.json
# (run B and C with MERGE=bench/results/<gpu>/gpu_check.json to add up one summary) with the benchmark records.
#
# Steps never stop the run: each runs under `timeout` (SIGINT first, so pytest still writes its junit XML), its
# status is recorded, and the summary is rewritten. The exit status is 1 if any step failed.
set -uo pipefail
SELF=$(cd "$(dirname "$0")" && pwd)/$(basename "$0")
case ${OUT:-} in /*) ;; "") OUT=$(dirname "$SELF")/out ;; *) OUT=$PWD/$OUT ;; esac
cd "$(dirname "$SELF")/.."
LOGS=${GPU_CHECK_LOGS:-}  # set for the steps by the run: a folder outside $OUT (few files go back: see OUT)
PY=${PYTHON:-python3}
BUDGET_S=540  # of a 600 s device call: the rest for the summaries, the archive and the tool's own overhead
GRACE_S=10  # after a step's limit: SIGINT (pytest writes its junit XML and stops), then SIGKILL GRACE_S later
SANITIZE_MARKERS="not slow and not profiler and not compile"  # the profiler's slot is compute-sanitizer's
SANITIZE_TESTS=(tests/test_cuda_backend.py tests/test_triton_backend.py)
BENCH=("gpt2 float32" "many-small float32" "llama-1b bfloat16" "llama-7b bfloat16" "llama-7b float32" "huge float32")

limit() {  # limit STEP: its time limit in seconds
  case $1 in
    env) echo "${T_ENV:-20}" ;;
    build) echo "${T_BUILD:-170}" ;;
    backends) echo "${T_BACKENDS:-20}" ;;
    info) echo "${T_INFO:-20}" ;;
    tests) echo "${T_TESTS:-260}" ;;
    sanitize-*) echo "${T_SANITIZE:-90}" ;;
    bench-*) echo "${T_BENCH:-40}" ;;
    *) echo 0 ;;
  esac
}

group_steps() {  # group_steps A|B|C: the steps of a group, in order
  case $1 in
    A) echo env build backends info tests ;;
    B) echo env build backends sanitize-memcheck sanitize-racecheck sanitize-synccheck ;;
    C) local s; echo -n "env build backends"; for s in "${BENCH[@]}"; do echo -n " bench-${s// /-}"; done; echo ;;
  esac
}

# ---- the steps ------------------------------------------------------------------------------------------------

PRINT=0
x() {  # x CMD...: run CMD, or print it (the dry run)
  if ((PRINT)); then echo "   $(printf '%q ' "$@")"; else "$@"; fi
}

find_cuda() {  # nvcc on PATH, else in $CUDA_HOME/bin or /usr/local/cuda*/bin; CUDA_HOME set to its toolkit
  local d nvcc
  for d in "${CUDA_HOME:-}" /usr/local/cuda /usr/local/cuda-*; do
    if [[ -n $d && -x $d/bin/nvcc ]]; then export CUDA_HOME=$d PATH=$d/bin:$PATH; return 0; fi
  done
  nvcc=$(command -v nvcc) || return 1
  d=$(dirname "$(dirname "$(readlink -f "$nvcc")")")
  [[ -f $d/include/cuda_runtime.h ]] && export CUDA_HOME=$d
  return 0
}

build_forced() {  # a build that fails loudly: FUSEDCLIP_FORCE_CUDA, the torch already installed, no network
  if ! find_cuda && ((!PRINT)); then echo "nvcc not found on PATH, in CUDA_HOME or in /usr/local/cuda*/bin" >&2; return 1; fi
  echo "   CUDA_HOME=${CUDA_HOME:-unset}, nvcc $(command -v nvcc || echo missing)"
  local arch=${TORCH_CUDA_ARCH_LIST:-}
  if [[ -z $arch ]]; then
    if ((PRINT)); then arch="<this GPU's arch>"; else
      arch=$("$PY" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())') || return 1
    fi
  fi
  x env FUSEDCLIP_FORCE_CUDA=1 MAX_JOBS="${MAX_JOBS:-16}" TORCH_CUDA_ARCH_LIST="$arch" CUDA_HOME="${CUDA_HOME:-}" \
    "$PY" -m pip install --no-build-isolation --no-deps -v -e . || return 1
  ((PRINT)) || cp python/fusedclip/_C*.so "$OUT"/ || true  # for the next device call to carry
}

build_reused() {  # the extension this machine already has, or one carried in, else a forced build
  local check=("$PY" bench/gpu_summary.py backends --out "$LOGS/backends.json")
  if ((PRINT)); then
    echo "   # nothing, if the extension already loads:"; x "${check[@]}"
    echo "   # else, if a _C*.so was carried into python/fusedclip/, re-install around it:"
    x env FUSEDCLIP_SKIP_CUDA=1 "$PY" -m pip install --no-build-isolation --no-deps -e .
    echo "   # else the forced build:"; build_forced; return 0
  fi
  if "${check[@]}"; then echo "extension loads: no build"; return 0; fi
  if compgen -G "python/fusedclip/_C*.so" >/dev/null; then
    echo "re-installing the package around the carried $(ls python/fusedclip/_C*.so)"
    FUSEDCLIP_SKIP_CUDA=1 "$PY" -m pip install --no-build-isolation --no-deps -e . && "${check[@]}" && return 0
  fi
  build_forced
}

run_step() {  # run_step STEP [forced]: the step's commands (run under `timeout` by `step`)
  case $1 in
    env) x nvidia-smi || true; x "$PY" bench/gpu_summary.py env --out "$LOGS/environment.json" ;;
    build) if [[ ${2:-} == forced ]]; then build_forced; else build_reused; fi ;;
    backends) x "$PY" bench/gpu_summary.py backends --out "$LOGS/backends.json" ;;
    info) x "$PY" -m fusedclip info ;;
    tests)
      local extra=()
      eval "extra=(${PYTEST_ARGS:-})"  # shell words, quotes allowed: PYTEST_ARGS='tests/test_plan.py -k "a or b"'
      x "$PY" -m pytest -q -rfEs -p no:cacheprovider --junitxml="$LOGS/tests.xml" "${extra[@]}" ;;
    sanitize-*)
      find_cuda || true
      x compute-sanitizer --tool "${1#sanitize-}" --error-exitcode 1 --target-processes all --print-limit 50 \
        "$PY" -m pytest -q -rfEs -p no:cacheprovider -m "$SANITIZE_MARKERS" --junitxml="$LOGS/$1.xml" \
        "${SANITIZE_TESTS[@]}" ;;
    bench-*)
      local preset=${1#bench-}
      x "$PY" -m fusedclip bench --preset "${preset%-*}" --dtype "${preset##*-}" --device cuda --reps 20 \
        --out "$LOGS/records/$preset.json" ;;
    *) echo "unknown step $1" >&2; return 2 ;;
  esac
}

# Re-entry: `gpu_check.sh --step NAME` runs one step's commands, so that `timeout` can run it as a process.
if [[ ${1:-} == --step ]]; then shift; run_step "$@"; exit $?; fi

# ---- arguments and the plan of the run ------------------------------------------------------------------------

DRY=0
selected=()
for arg in "$@"; do
  case $arg in
    --dry-run) DRY=1 ;;
    -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    A|B|C) read -ra more <<<"$(group_steps "$arg")"; selected+=("${more[@]}") ;;
    all) for g in A B C; do read -ra more <<<"$(group_steps "$g")"; selected+=("${more[@]}"); done ;;
    *)
      if [[ $(limit "$arg") == 0 ]]; then echo "unknown group or step '$arg' (groups: A B C; see --help)" >&2; exit 2; fi
      selected+=("$arg") ;;
  esac
done
if ((${#selected[@]} == 0)); then echo "name a group (A, B or C) or steps; see --help" >&2; exit 2; fi

# Each step once, in order; env always first; a build in every run (forced when group A or `build` was asked
# for by name, else reused), since every other step needs the extension.
forced=0
for arg in "$@"; do [[ $arg == A || $arg == all || $arg == build ]] && forced=1; done
steps=(env build)
for s in "${selected[@]}"; do
  [[ " ${steps[*]} " == *" $s "* ]] || steps+=("$s")
done

budget_problems=0
check_budgets() {  # every group must end well inside one 10-minute call
  local g s total
  for g in A B C; do
    total=0
    for s in $(group_steps "$g"); do total=$((total + $(limit "$s") + GRACE_S)); done
    echo "group $g: time limits (each plus ${GRACE_S} s grace) add up to $total s (budget $BUDGET_S s)"
    if ((total > BUDGET_S)); then echo "group $g is over budget" >&2; budget_problems=1; fi
  done
}

LOGS=$(mktemp -d)/logs
trap 'rm -rf "$(dirname "$LOGS")"' EXIT
export GPU_CHECK_LOGS=$LOGS OUT
mkdir -p "$LOGS/records" "$OUT"
failed=()

summarize() {
  "$PY" bench/gpu_summary.py summarize --logs "$LOGS" --out "$OUT/gpu_check.json" ${MERGE:+--merge "$MERGE"} ||
    echo "could not write the summary" >&2
  tar czf "$OUT/gpu_check_logs.tar.gz" -C "$(dirname "$LOGS")" logs 2>/dev/null || echo "could not bundle the logs" >&2
}

step() {  # step NAME: run it under its time limit, record its status, rewrite the summary
  local name=$1 secs rc t0 mode=""
  local lim
  lim=$(limit "$name")
  [[ $name == build && $forced == 1 ]] && mode=forced
  echo "== $name${mode:+ ($mode)} (limit ${lim} s)"
  if ((DRY)); then
    echo "   timeout -s INT -k $GRACE_S $lim $SELF --step $name $mode, which runs:"
    (PRINT=1 run_step "$name" "$mode")
    printf '%s\t0\t0\t%s\n' "$name" "$lim" >>"$LOGS/status.tsv"
    return
  fi
  t0=$(date +%s.%N)
  timeout -s INT -k "$GRACE_S" "$lim" "$SELF" --step "$name" $mode >"$LOGS/$name.log" 2>&1
  rc=$?
  secs=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$secs" "$lim" >>"$LOGS/status.tsv"
  if ((rc == 0)); then echo "   ok ($secs s)"; else
    if ((rc == 124 || rc == 137)); then echo "   TIMED OUT after $secs s"; else echo "   FAILED, exit $rc ($secs s)"; fi
    tail -n 25 "$LOGS/$name.log" | sed 's/^/   | /'
    failed+=("$name")
  fi
  summarize >/dev/null
}

echo "steps: ${steps[*]}"
check_budgets
for s in "${steps[@]}"; do step "$s"; done

if ((DRY)); then
  "$PY" bench/gpu_summary.py fake-logs --logs "$LOGS" "${steps[@]}" || exit 1
  summarize
  "$PY" bench/gpu_summary.py validate "$OUT/gpu_check.json" || { echo "dry run: the summary is malformed" >&2; exit 1; }
  ((budget_problems)) && exit 1
  echo "dry run ok: ${#steps[@]} steps, summary $OUT/gpu_check.json"
  exit 0
fi
summarize
gpu=$("$PY" bench/gpu_summary.py gpu-name --logs "$LOGS" 2>/dev/null || echo unknown-gpu)
echo "summary: $OUT/gpu_check.json (commit it as bench/results/$gpu/gpu_check.json), logs: $OUT/gpu_check_logs.tar.gz"
if ((${#failed[@]})); then echo "FAILED steps: ${failed[*]}"; exit 1; fi
echo "all steps passed"
