#!/usr/bin/env bash
# One call on a GPU machine: build the CUDA extension, run the whole test suite on CUDA (every kernel backend),
# compute-sanitizer memcheck + racecheck over the CUDA-backend tests, and the benchmark presets.
# Logs and JSON records go to $OUT (default bench/out/). Usage: bench/gpu_check.sh [build|test|sanitize|bench|all]...
# The same script is what a self-hosted GPU CI runner calls. PACK=1 bundles the logs into $OUT/logs.tar.gz.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
stages=("${@:-all}")
failed=()

want() { for s in "${stages[@]}"; do [[ $s == all || $s == "$1" ]] && return 0; done; return 1; }
step() {  # step NAME CMD...: run, log to $OUT/NAME.log, remember failures, keep going
  local name=$1; shift
  echo "== $name: $*"
  local t0=$SECONDS
  if "$@" >"$OUT/$name.log" 2>&1; then echo "   ok ($((SECONDS - t0)) s)"; else
    echo "   FAILED ($((SECONDS - t0)) s), tail of $OUT/$name.log:"; tail -n 25 "$OUT/$name.log"; failed+=("$name"); fi
}

nvidia-smi >"$OUT/nvidia-smi.log" 2>&1 || true
if want build; then
  step build env MAX_JOBS="${MAX_JOBS:-16}" "$PY" -m pip install --no-build-isolation --no-deps -v -e .
  step info "$PY" -m fusedclip info
fi
if want test; then
  step tests "$PY" -m pytest -q -rs -x --junitxml="$OUT/tests.xml"
fi
if want sanitize && command -v compute-sanitizer >/dev/null; then
  for tool in memcheck racecheck; do
    step "sanitize-$tool" compute-sanitizer --tool "$tool" --error-exitcode 1 --target-processes all \
      "$PY" -m pytest -q -x -k "cuda and not slow" tests/test_conformance.py tests/test_cuda_backend.py
  done
fi
if want bench; then
  gpu=$("$PY" -c "import torch; print(torch.cuda.get_device_name().replace(' ', '-'))" 2>/dev/null || echo gpu)
  for spec in "gpt2 float32" "many-small float32" "llama-1b bfloat16" "llama-7b bfloat16" "llama-7b float32" "huge float32"; do
    set -- $spec
    step "bench-$1-$2" "$PY" -m fusedclip bench --preset "$1" --dtype "$2" --device cuda --reps 20 \
      --out "$OUT/$gpu-$1-$2.json"
  done
fi
if [[ ${PACK:-0} == 1 ]]; then  # few files back (the device tool returns at most 8): logs in one archive
  (cd "$OUT" && tar czf logs.tar.gz --remove-files ./*.log ./*.xml 2>/dev/null)
fi
if ((${#failed[@]})); then echo "FAILED stages: ${failed[*]}"; exit 1; fi
echo "all stages passed; logs and records in $OUT"
