#!/usr/bin/env bash
# Download, where pip can reach the package index, the wheels bench/gpu_check.sh needs on
# the GPU machine (which has torch, torchvision, timm, accelerate, numpy, pyyaml, but no
# network): webdataset with braceexpand, and segment-anything. They land in
# bench/wheels/ (git-ignored; about 0.2 MB), which the device call carries.
# Versions: the ones installed in the environment that runs this (one version of each).
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DEST=$REPO/bench/wheels
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif "$REPO/.venv/bin/python" -c "" 2>/dev/null; then PY=$REPO/.venv/bin/python
else PY=python3
fi
specs=()
for name in webdataset braceexpand segment-anything; do
  version=$("$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name" 2>/dev/null || true)
  specs+=("$name${version:+==$version}")
done
rm -rf "$DEST" && mkdir -p "$DEST"
# Pure-Python wheels; the platform flags are those of the GPU image (CPython 3.12, x86-64).
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d "$DEST" "${specs[@]}"
ls -l "$DEST"
