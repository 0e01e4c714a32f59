#!/usr/bin/env bash
# The GPU check: what only a GPU can show about fusedclip, in ONE device call of at most 8 minutes (issue 26,
# design.md 6c). A lease is 15 minutes of device time in all: the machine's start (1-2 min), every call, idle time
# and transfers count.
#
# Before the lease, on this machine (no GPU; 8-15 min on 2 cores the first time, ~5 after a change to tests/ or the
# kernels (the launches are recorded again), seconds when nothing changed):
#   bash bench/gpu_check.sh prepare      makes the kit, bench/kit/ (bench/lease_kit.py): fusedclip._C and _host
#                                        built for sm_90 against PyPI's torch 2.11.0+cu130 under Python 3.12 (the
#                                        devices' Python; found with pyenv, PYTHON312 or on PATH), and a Triton
#                                        cache of every launch the device tests make, compiled for sm_90 with
#                                        triton 3.6 (launchers included)
#   bash bench/gpu_check.sh --dry-run    the plan and its time limits (at most 480 s in all), the kit checked
#                                        against the pins and the current sources, a summary from fake logs
#
# The device call (the device tool's `run`), exactly:
#   command:   bash bench/gpu_check.sh lease
#   carry:     ["bench/kit"]
#   timeout_s: 540
# Then copy $OUT/gpu_check.json to bench/results/<gpu>/gpu_check.json (the run prints <gpu>) and commit it with the
# benchmark records in gpu_check_logs.tar.gz (logs/records/*.json).
#
# The plan of `lease` (the default), in priority order; every step runs under its own `timeout`, a failure never
# stops the run, and $OUT/gpu_check.json is rewritten after every step:
#   step                      limit  expected  what
#   env                        25 s  0.2 min   nvidia-smi, versions, the sandbox (gVisor or Firecracker), and
#                                              whether compute-sanitizer and ncu work (each tried on a tiny kernel)
#   setup                      35 s  0.3 min   the kit compared with this machine, the extensions put in place, an
#                                              editable install that builds nothing, Triton cache lookups
#   backends                   20 s  0.2 min   cuda and triton available; `python -m fusedclip info`
#   tests                     180 s  2-3 min   every gpu-marked test and the cuda/triton conformance tests on CUDA
#                                              (tests/gpu_check_plugin.py), pytest-xdist -n 8, never the CPU suite
#   sanitize-memcheck          70 s  1 min     compute-sanitizer memcheck over a short selection of the CUDA- and
#                                              Triton-backend tests (skipped with the reason where it is refused)
#   bench-many-small-float32   35 s  0.4 min   the three presets, every implementation round robin
#   bench-gpt2-float32         35 s  0.4 min
#   bench-llama-7b-bfloat16    35 s  0.5 min
#   limits plus 5 s grace each: 475 s <= 480 s; expected about 5-6 min.
# A step starts only if the time spent so far plus its limit stays within 480 s; otherwise it is skipped (recorded).
# If the kit does not fit the device (another Python or torch, or changed sources), setup says why and a `build`
# step (150 s) follows it: later steps that no longer fit are then skipped, lowest priority first.
#
# Device time: start ~1.5 + this call ~6 (8 at most) + transfers: about 8-10 of the 15 minutes, which leaves
# one short call to re-run what failed:
#   bash bench/gpu_check.sh rerun [SUMMARY]   env, setup, backends, then only what failed in SUMMARY (default
#                                             bench/kit/previous.json: copy call 1's gpu_check.json there, it
#                                             travels with the kit): failed tests by id, memcheck, failed presets;
#                                             limits at most 240 s; its summary keeps SUMMARY's other stages,
#                                             test counts and records (what passes again counts as passed)
# Make it at once (the machine stays warm 30 s after a call) or, after a fix, only with 5 minutes or more left
# (a fresh machine needs 4 to start); else give the machine back.
#
# Other usage: bench/gpu_check.sh [--dry-run] STEP...   (e.g. `tests`, `sanitize-racecheck`, `bench-huge-float32`)
#   OUT         the results folder (default bench/out; on the device the tool's $OUT), two files: gpu_check.json
#               (the summary) and gpu_check_logs.tar.gz (every log, the junit XML, the benchmark records)
#   KIT         the kit (default bench/kit); PYTHON (default python3); JOBS pytest-xdist workers (default 8)
#   PYTEST_ARGS narrows the tests step (e.g. 'tests/test_plan.py -k capture'); MERGE=FILE keeps the stages of an
#               earlier summary that this run does not redo
#   T_ENV T_SETUP T_BUILD T_BACKENDS T_TESTS T_RERUN_TESTS T_SANITIZE T_BENCH   step limits in seconds
set -uo pipefail
SELF=$(cd "$(dirname "$0")" && pwd)/$(basename "$0")
case ${OUT:-} in /*) ;; "") OUT=$(dirname "$SELF")/out ;; *) OUT=$PWD/$OUT ;; esac
case ${KIT:-} in /*) ;; "") KIT=$(dirname "$SELF")/kit ;; *) KIT=$PWD/$KIT ;; esac
cd "$(dirname "$SELF")/.."
REPO=$PWD
LOGS=${GPU_CHECK_LOGS:-}  # set for the steps by the run: a folder outside $OUT (few files go back: see OUT)
PY=${PYTHON:-python3}
BUDGET_S=480  # one device call: 8 minutes of step limits, grace included
RERUN_BUDGET_S=240
GRACE_S=5  # after a step's limit: SIGINT (pytest writes its junit XML and stops), then SIGKILL GRACE_S later
JOBS=${JOBS:-8}
ARCH_LIST="9.0"  # H100 and H200
LEASE=(env setup backends tests sanitize-memcheck bench-many-small-float32 bench-gpt2-float32 bench-llama-7b-bfloat16)
PLUGIN=(-p gpu_check_plugin --gpu-check)  # tests/gpu_check_plugin.py: only the tests that exercise a GPU
SANITIZE_MARKERS="not slow and not profiler and not compile"  # the profiler's slot is compute-sanitizer's
SANITIZE_TESTS=(tests/test_cuda_backend.py tests/test_triton_backend.py)
# A short selection: every kernel (norms, scale, per-tensor, clamp, units) of both backends, odd and misaligned sizes.
SANITIZE_K="norms_match_reference or clip_matches_reference or scale_skips or clamp_matches_torch or late_tile \
or whole_tile or inside_each_view or misaligned_views_and_edge_sizes or alignment_gpu_configuration \
or clip_grad_norm_per_tensor or scale_units_matches_reference"
RERUN=0

limit() {  # limit STEP: its time limit in seconds
  case $1 in
    env) echo "${T_ENV:-25}" ;;
    setup) echo "${T_SETUP:-35}" ;;
    build) echo "${T_BUILD:-150}" ;;
    backends) echo "${T_BACKENDS:-20}" ;;
    tests) if ((RERUN)); then echo "${T_RERUN_TESTS:-120}"; else echo "${T_TESTS:-180}"; fi ;;
    sanitize-memcheck | sanitize-racecheck | sanitize-synccheck | sanitize-initcheck) echo "${T_SANITIZE:-70}" ;;
    bench-*-float32 | bench-*-bfloat16 | bench-*-float16 | bench-*-float64) echo "${T_BENCH:-35}" ;;
    *) echo 0 ;;
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

run_step() {  # run_step STEP: the step's commands (run under `timeout` by `step`)
  export PYTHONPATH="$REPO/tests${PYTHONPATH:+:$PYTHONPATH}"  # the pytest plugin; triton_preflight for setup
  case $1 in
    env) x nvidia-smi || true; x "$PY" bench/gpu_summary.py env --out "$LOGS/environment.json" ;;
    setup)
      # An editable install that builds nothing (the kit's extensions are copied in next), no network.
      x env FUSEDCLIP_SKIP_CUDA=1 FUSEDCLIP_SKIP_HOST_EXT=1 "$PY" -m pip install -q --no-build-isolation --no-deps \
        --no-index -e . || return 1
      x "$PY" bench/lease_kit.py setup --kit "$KIT" --report "$LOGS/kit.json" ;;  # exit 3: build it here
    build)
      if ! find_cuda && ((!PRINT)); then echo "nvcc not found on PATH, in CUDA_HOME or /usr/local/cuda*/bin" >&2; return 1; fi
      x env FUSEDCLIP_FORCE_CUDA=1 MAX_JOBS="${MAX_JOBS:-16}" TORCH_CUDA_ARCH_LIST="$ARCH_LIST" \
        CUDA_HOME="${CUDA_HOME:-}" "$PY" -m pip install --no-build-isolation --no-deps --no-index -v -e . ;;
    backends) x "$PY" bench/gpu_summary.py backends --out "$LOGS/backends.json" --info "$LOGS/info.json" ;;
    tests)
      local extra=() xdist=()
      eval "extra=(${PYTEST_ARGS:-})"  # shell words, quotes allowed: PYTEST_ARGS='tests/test_plan.py -k "a or b"'
      if ((PRINT)) || "$PY" -c "import xdist" 2>/dev/null; then
        xdist=(-n "$JOBS" --dist loadgroup)
      else
        echo "pytest-xdist is not installed: the tests run in one process"
      fi
      x "$PY" -m pytest "${PLUGIN[@]}" "${xdist[@]}" -q -rfEs -p no:cacheprovider --durations=25 \
        --junitxml="$LOGS/tests.xml" "${extra[@]}" ;;
    sanitize-*)
      local why
      if ((!PRINT)) && ! why=$("$PY" bench/gpu_summary.py tool-usable compute-sanitizer --logs "$LOGS"); then
        echo "skipped: $why" | tee "$LOGS/$1.skipped"
        return 0
      fi
      find_cuda || true
      x compute-sanitizer --tool "${1#sanitize-}" --error-exitcode 1 --target-processes all --print-limit 50 \
        "$PY" -m pytest "${PLUGIN[@]}" -q -rfEs -p no:cacheprovider -m "$SANITIZE_MARKERS" -k "$SANITIZE_K" \
        --junitxml="$LOGS/$1.xml" "${SANITIZE_TESTS[@]}" ;;
    bench-*)
      local preset=${1#bench-}
      x "$PY" -m fusedclip bench --preset "${preset%-*}" --dtype "${preset##*-}" --device cuda --reps 20 \
        --out "$LOGS/records/$preset.json" ;;
    *) echo "unknown step $1" >&2; return 2 ;;
  esac
}

# Re-entry: `gpu_check.sh --step NAME` runs one step's commands, so that `timeout` can run it as a process.
if [[ ${1:-} == --step ]]; then shift; run_step "$@"; exit $?; fi

# ---- prepare: the kit, on this machine ------------------------------------------------------------------------

find_python312() {  # a Python 3.12 interpreter: PYTHON312, python3.12 on PATH, pyenv's, uv's
  local p
  for p in "${PYTHON312:-}" python3.12 "$HOME"/.pyenv/versions/3.12*/bin/python3.12 \
    "$(uv python find 3.12 2>/dev/null)"; do
    [[ -n $p ]] || continue
    if "$p" -c 'import sys, venv; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then command -v "$p"; return 0; fi
  done
  return 1
}

prepare() {
  local cache py312 venv vpy work src parts t0=$SECONDS
  cache=${FUSEDCLIP_CI_CACHE:-$HOME/.cache/fusedclip-ci}
  if ! py312=$(find_python312); then
    echo "prepare: no Python 3.12 here (the devices run 3.12). Set PYTHON312, or install one: pyenv install 3.12," \
      "uv python install 3.12, or Debian/Ubuntu's python3.12 and python3.12-venv" >&2
    return 1
  fi
  venv=$cache/venv-py312-torch-2.11-cu130
  echo "== the venv: Python $("$py312" -c 'import platform; print(platform.python_version())'), the pins of" \
    ".ci/torch-2.11-cu130.txt ($venv)"
  bash .ci/torch-venv.sh "$py312" "$venv" || return 1
  vpy=$venv/bin/python
  mkdir -p "$KIT"
  parts=$("$vpy" bench/lease_kit.py stale --kit "$KIT") || return 1
  if [[ -z $parts ]]; then
    echo "== the kit is up to date: nothing to make"
    "$vpy" bench/lease_kit.py check --kit "$KIT"
    return $?
  fi
  echo "== to make: $parts"
  work=$cache/lease-work
  src=$work/src
  rm -rf "$work" && mkdir -p "$src"
  # A copy of the tree (tracked and untracked files, not the ignored ones): builds stay out of the checkout.
  git ls-files -z --cached --others --exclude-standard | xargs -0 -r sh -c 'for f; do [ -e "$f" ] && printf "%s\0" "$f"; done' sh \
    | tar --null -T - -cf - | tar -xf - -C "$src" || return 1
  if [[ $parts == *extension* ]]; then
    echo "== building fusedclip._C and _host for sm_$ARCH_LIST against torch 2.11.0+cu130, Python 3.12 (log: $work/build.log)"
    find_cuda || { echo "prepare: nvcc not found (set CUDA_HOME)" >&2; return 1; }
    (cd "$src" && env FUSEDCLIP_FORCE_CUDA=1 MAX_JOBS="$(nproc)" TORCH_CUDA_ARCH_LIST="$ARCH_LIST" \
      "$vpy" -m pip install --disable-pip-version-check --no-build-isolation --no-deps --no-index -v -e . \
      >"$work/build.log" 2>&1) || { tail -n 60 "$work/build.log" >&2; echo "prepare: the build failed" >&2; return 1; }
    (cd "$work" && "$vpy" "$REPO/.ci/check_cuda_extension.py" "$(ls "$src"/python/fusedclip/_C.cpython-312-*.so)" \
      "$ARCH_LIST") || return 1
    rm -f "$KIT"/_C.*.so "$KIT"/_host.*.so
    cp "$src"/python/fusedclip/_C.cpython-312-*.so "$src"/python/fusedclip/_host.cpython-312-*.so "$KIT"/ || return 1
    strip --strip-debug "$KIT"/_C.*.so "$KIT"/_host.*.so  # debug info only: 14 MB less to carry
  else
    (cd "$src" && FUSEDCLIP_SKIP_CUDA=1 FUSEDCLIP_SKIP_HOST_EXT=1 "$vpy" -m pip install -q \
      --disable-pip-version-check --no-build-isolation --no-deps --no-index -e .) || return 1
    cp "$KIT"/_C.cpython-312-*.so "$KIT"/_host.cpython-312-*.so "$src"/python/fusedclip/ 2>/dev/null
  fi
  if [[ $parts == *triton* ]]; then
    echo "== recording the device tests' Triton launches on CPU (the interpreter; log: $work/record.log)"
    (cd "$src" && PYTHONPATH="$src/tests" "$vpy" -m pytest "${PLUGIN[@]}" --record-launches "$KIT/launches.json" \
      -q -p no:cacheprovider >"$work/record.log" 2>&1)
    tail -n 3 "$work/record.log"
    [[ -s $KIT/launches.json ]] || { echo "prepare: no launch was recorded (see $work/record.log)" >&2; return 1; }
    echo "== compiling them for sm_90 into $KIT/triton-cache (variants already there are cache hits)"
    [[ $parts == *triton-cache* ]] && rm -rf "$KIT/triton-cache"
    (cd "$src" && "$vpy" "$REPO/bench/lease_kit.py" compile --kit "$KIT" --records "$KIT/launches.json" \
      --workers "$(nproc)") || return 1
  fi
  "$vpy" bench/lease_kit.py manifest --kit "$KIT" --arch-list "$ARCH_LIST" >/dev/null || return 1
  "$vpy" bench/lease_kit.py check --kit "$KIT" || return 1
  echo "== kit ready in $((SECONDS - t0)) s: $(du -sh "$KIT" | cut -f1) in $KIT"
}

# ---- arguments and the plan of the run ------------------------------------------------------------------------

DRY=0
mode=""
steps=()
rerun_from=""
for arg in "$@"; do
  case $arg in
    --dry-run) DRY=1 ;;
    -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    lease|prepare|rerun) mode=$arg ;;
    *)
      if [[ $mode == rerun && -z $rerun_from ]]; then rerun_from=$arg; continue; fi
      if [[ $(limit "$arg") == 0 ]]; then
        echo "unknown step or mode '$arg' (modes: lease, rerun, prepare; see --help)" >&2; exit 2
      fi
      steps+=("$arg") ;;
  esac
done
if [[ $mode == prepare ]]; then
  ((DRY)) && { "$PY" bench/lease_kit.py check --kit "$KIT"; exit $?; }
  prepare; exit $?
fi
[[ -z $mode && ${#steps[@]} -eq 0 ]] && mode=lease
budget=$BUDGET_S
MERGE=${MERGE:-}
case $mode in
  lease) steps=("${LEASE[@]}") ;;
  rerun)
    RERUN=1
    budget=$RERUN_BUDGET_S
    rerun_from=${rerun_from:-$KIT/previous.json}
    if ! plan=$("$PY" bench/gpu_summary.py rerun-plan "$rerun_from"); then
      echo "rerun: cannot read the summary $rerun_from" >&2; exit 2
    fi
    read -ra failed_steps <<<"$(sed -n 's/^steps: //p' <<<"$plan")"
    PYTEST_ARGS=$(sed -n 's/^tests: //p' <<<"$plan")
    export PYTEST_ARGS
    MERGE=${MERGE:-$rerun_from}
    steps=(env setup backends "${failed_steps[@]}")
    echo "re-running what failed in $rerun_from: ${failed_steps[*]:-nothing}" ;;
  *) # named steps: env and setup first, as every other step needs them
    named=("${steps[@]}")
    steps=(env setup)
    for s in "${named[@]}"; do [[ " ${steps[*]} " == *" $s "* ]] || steps+=("$s"); done ;;
esac

fits_problems=0
greedy() {  # greedy STEP...: "kept... (total s); skipped: ..." as the run decides, each step fitting or skipped
  local s total=0 kept=() dropped=()
  for s in "$@"; do
    if ((total + $(limit "$s") + GRACE_S <= budget)); then total=$((total + $(limit "$s") + GRACE_S)); kept+=("$s")
    else dropped+=("$s"); fi
  done
  echo "${kept[*]} ($total s); skipped: ${dropped[*]:-none}"
}

check_plan() {  # the dry run: the plan's limits, and what the device does when the kit does not fit it
  local s total=0 with_build=()
  for s in "${steps[@]}"; do total=$((total + $(limit "$s") + GRACE_S)); done
  echo "plan: ${steps[*]}"
  echo "time limits (each plus ${GRACE_S} s grace) add up to $total s (budget $budget s)"
  if ((RERUN)); then
    echo "what fits: $(greedy "${steps[@]}")"
  elif ((total > budget)); then
    echo "the plan is over budget: $total s > $budget s" >&2; fits_problems=1
  fi
  for s in "${steps[@]}"; do with_build+=("$s"); [[ $s == setup ]] && with_build+=(build); done
  [[ " ${steps[*]} " == *" setup "* ]] && echo "if the kit does not fit the device: $(greedy "${with_build[@]}")"
}

LOGS=$(mktemp -d)/logs
trap 'rm -rf "$(dirname "$LOGS")"' EXIT
export GPU_CHECK_LOGS=$LOGS OUT
mkdir -p "$LOGS/records" "$OUT"
# The earlier summary as it was when the call began: the summary is rewritten after every step, and a re-run's
# counts are added to the earlier ones once (MERGE may name $OUT/gpu_check.json itself).
if [[ -n $MERGE && -f $MERGE ]]; then
  cp "$MERGE" "$(dirname "$LOGS")/merge.json" && MERGE=$(dirname "$LOGS")/merge.json
fi
[[ -d $KIT/triton-cache ]] && export TRITON_CACHE_DIR=$KIT/triton-cache  # the kit's compiled kernels
failed=()

summarize() {
  "$PY" bench/gpu_summary.py summarize --logs "$LOGS" --out "$OUT/gpu_check.json" --kit "$KIT" \
    ${MERGE:+--merge "$MERGE"} || echo "could not write the summary" >&2
  tar czf "$OUT/gpu_check_logs.tar.gz" -C "$(dirname "$LOGS")" logs 2>/dev/null || echo "could not bundle the logs" >&2
}

T0=$SECONDS
step() {  # step NAME: run it under its time limit if it still fits the budget, record its status, rewrite the summary
  local name=$1 secs rc t0 lim spent
  lim=$(limit "$name")
  spent=$((SECONDS - T0))
  echo "== $name (limit ${lim} s)"
  if ((DRY)); then
    echo "   timeout -s INT -k $GRACE_S $lim $SELF --step $name, which runs:"
    (PRINT=1 run_step "$name")
    printf '%s\t0\t0\t%s\n' "$name" "$lim" >>"$LOGS/status.tsv"
    return 0
  fi
  if ((spent + lim + GRACE_S > budget)); then
    echo "   SKIPPED: $spent s spent, its limit would end past the $budget s budget"
    printf '%s\t-1\t0\t%s\n' "$name" "$lim" >>"$LOGS/status.tsv"
    summarize >/dev/null
    return 0
  fi
  t0=$(date +%s.%N)
  timeout -s INT -k "$GRACE_S" "$lim" "$SELF" --step "$name" >"$LOGS/$name.log" 2>&1
  rc=$?
  secs=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$secs" "$lim" >>"$LOGS/status.tsv"
  if ((rc == 0)); then echo "   ok ($secs s)"
  elif [[ $name == setup && $rc == 3 ]]; then echo "   the kit's extension does not fit here: it is built next ($secs s)"
  else
    if ((rc == 124 || rc == 137)); then echo "   TIMED OUT after $secs s"; else echo "   FAILED, exit $rc ($secs s)"; fi
    tail -n 25 "$LOGS/$name.log" | sed 's/^/   | /'
    failed+=("$name")
  fi
  summarize >/dev/null
  return "$rc"
}

if ((DRY)); then
  check_plan
  kit_ok=0
  if [[ " ${steps[*]} " == *" setup "* ]]; then "$PY" bench/lease_kit.py check --kit "$KIT" || kit_ok=1; fi
fi
i=0
while ((i < ${#steps[@]})); do
  s=${steps[i]}
  step "$s"
  rc=$?
  if [[ $s == setup && $rc == 3 && " ${steps[*]} " != *" build "* ]]; then
    steps=("${steps[@]:0:i+1}" build "${steps[@]:i+1}")
  fi
  i=$((i + 1))
done

if ((DRY)); then
  "$PY" bench/gpu_summary.py fake-logs --logs "$LOGS" "${steps[@]}" || exit 1
  summarize
  "$PY" bench/gpu_summary.py validate "$OUT/gpu_check.json" || { echo "dry run: the summary is malformed" >&2; exit 1; }
  ((fits_problems)) && exit 1
  if ((kit_ok)); then echo "dry run: the kit is not ready for a lease (see above)" >&2; exit 1; fi
  echo "dry run ok: ${#steps[@]} steps, summary $OUT/gpu_check.json"
  exit 0
fi
summarize
gpu=$("$PY" bench/gpu_summary.py gpu-name --logs "$LOGS" 2>/dev/null || echo unknown-gpu)
echo "summary: $OUT/gpu_check.json (commit it as bench/results/$gpu/gpu_check.json), logs: $OUT/gpu_check_logs.tar.gz"
if ((${#failed[@]})); then echo "FAILED steps: ${failed[*]}"; exit 1; fi
echo "all steps passed"
