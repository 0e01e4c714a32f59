#!/usr/bin/env bash
# A venv with exactly the pins of .ci/torch-2.11-cu130.txt (PyPI's torch 2.11.0+cu130, the GPU machines' torch),
# made with a given Python and reused while the pins and that Python's version are unchanged.
#
# usage: .ci/torch-venv.sh PYTHON VENV
#   Used by .ci/torch-cuda-build.sh (CI's Python) and by `bench/gpu_check.sh prepare` (Python 3.12, the devices').
#   The wheels are kept in $FUSEDCLIP_CI_CACHE/wheels (default ~/.cache/fusedclip-ci/wheels) for every Python:
#   pip installs from that folder only the ones that fit the venv's Python.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ $# -ne 2 ]; then
  echo "usage: $0 PYTHON VENV" >&2
  exit 2
fi
PY=$1
VENV=$2
CACHE=${FUSEDCLIP_CI_CACHE:-$HOME/.cache/fusedclip-ci}
LOCK=.ci/torch-2.11-cu130.txt
WHEELS=$CACHE/wheels
die() {
  printf '\n!!! [torch-venv] FAILED: %s\n' "$*" >&2
  exit 1
}

key=$( (cat "$LOCK"; "$PY" -c 'import sys; print(sys.version)') | sha256sum | cut -c1-16)
if [ -x "$VENV/bin/python" ] && [ "$(cat "$VENV/.pins" 2>/dev/null)" = "$key" ]; then
  echo "reusing $VENV: $LOCK and the Python version are unchanged"
else
  rm -rf "$VENV"
  mkdir -p "$WHEELS"
  echo "downloading the pinned wheels into $WHEELS (kept between runs; wheels already there are not fetched again)"
  t=$SECONDS
  "$PY" -m pip download --quiet --disable-pip-version-check --no-cache-dir --no-deps --only-binary=:all: \
    -d "$WHEELS" -r "$LOCK" || die "pip download of $LOCK failed"
  echo "wheels: $(du -sh "$WHEELS" | cut -f1) in $(ls "$WHEELS" | wc -l) files ($((SECONDS - t))s)"
  echo "installing them into $VENV (--no-deps: exactly the pins)"
  t=$SECONDS
  "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-cache-dir --no-deps --no-index \
    --find-links "$WHEELS" -r "$LOCK" || die "installing $LOCK into $VENV failed"
  echo "installed: $(du -sh "$VENV" | cut -f1) ($((SECONDS - t))s)"
  # Nothing may be missing but what the lock leaves out on purpose (torch's CUDA extras import does not load).
  missing=$("$VENV/bin/python" -m pip check --disable-pip-version-check 2>&1 \
    | grep -v -E '^torch 2\.11\.0 requires (cuda-toolkit|cuda-bindings)' | grep -v '^No broken requirements' || true)
  [ -z "$missing" ] || die "the venv misses requirements that $LOCK should pin:"$'\n'"$missing"
  echo "$key" > "$VENV/.pins"
fi
"$VENV/bin/python" - <<'EOF' || die "torch 2.11.0+cu130 does not import in $VENV"
import sys
import torch
print(f"Python {sys.version.split()[0]}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"GPU visible: {torch.cuda.is_available()}")
assert torch.__version__.startswith("2.11.0"), torch.__version__
assert (torch.version.cuda or "").startswith("13."), torch.version.cuda
EOF
