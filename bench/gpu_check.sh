#!/usr/bin/env bash
# segtrain on one GPU, every figure from one command (issue 12):
#
#   bench/gpu_check.sh OUT_DIR [--cpu] [--sections a,b] [--budget SECONDS]
#
# Writes OUT_DIR/gpu_check.md (tables), OUT_DIR/gpu_check.json (figures) and
# OUT_DIR/gpu_check.log (everything printed). On a machine without network, the
# packages the image lacks (webdataset + braceexpand, segment-anything, matplotlib, ...) are
# installed from bench/wheels/ (made beforehand by bench/gpu_wheels.sh) into a temporary folder.
# Python: $PYTHON, else the repository's .venv, else python3. See docs/BENCHMARKS.md.
set -uo pipefail
if [ $# -lt 1 ] || [[ "$1" == -* ]]; then
  echo "usage: bench/gpu_check.sh OUT_DIR [--cpu] [--sections a,b] [--budget SECONDS]" >&2
  exit 2
fi
OUT_DIR=$1; shift
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
mkdir -p "$OUT_DIR" || exit 2
OUT_DIR=$(cd "$OUT_DIR" && pwd)

if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif "$REPO/.venv/bin/python" -c "" 2>/dev/null; then PY=$REPO/.venv/bin/python
else PY=python3
fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
: "${SEGTRAIN_COMMIT:=$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)}"
export SEGTRAIN_COMMIT

run() {
  echo "bench/gpu_check.sh: $(date -u '+%Y-%m-%d %H:%M:%S UTC'), python $PY, commit $SEGTRAIN_COMMIT"
  # What gpu_check imports beyond the image's torch, torchvision, numpy, pillow, timm, accelerate
  # (bench/gpu_wheels.sh's PACKAGES: the distributions of these modules and their dependencies).
  missing=$("$PY" -c "
import importlib.util as u
print(' '.join(m for m in 'webdataset braceexpand segment_anything matplotlib tqdm yaml'.split() if not u.find_spec(m)))")
  if [ -n "$missing" ]; then
    if compgen -G "$REPO/bench/wheels/*.whl" >/dev/null; then
      SITE=${TMPDIR:-/tmp}/segtrain-gpu-check-site
      echo "missing: $missing; installing bench/wheels/*.whl into $SITE, behind the image's packages (no network needed)"
      "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
        "$REPO"/bench/wheels/*.whl && export PYTHONPATH="$PYTHONPATH:$SITE"
    else
      echo "warning: $missing missing and bench/wheels/ holds no wheels (run bench/gpu_wheels.sh where pip" \
           "works, and carry bench/wheels): the sections that import them will fail" >&2
    fi
  fi
  command -v nvidia-smi >/dev/null && nvidia-smi
  "$PY" "$REPO/bench/gpu_check.py" --out "$OUT_DIR" "$@"
}
run "$@" 2>&1 | tee "$OUT_DIR/gpu_check.log"
exit "${PIPESTATUS[0]}"
