#!/usr/bin/env bash
# Download, where pip can reach the package index, the wheels bench/gpu_check.sh needs on
# the GPU machine, which has no network. They land in bench/wheels/ (git-ignored; about
# 17 MB, matplotlib and fonttools most of it), which the device call carries; gpu_check.sh
# installs them only when one of the modules is missing there, behind what the image has.
# Versions: the ones installed in the environment that runs this (one version of each).
#
# PACKAGES: every distribution that bench/gpu_check.py imports (through segtrain and bench/
# too) beyond IMAGE_HAS, with the dependencies they need at run time: webdataset (+
# braceexpand) for the shards, segment-anything for the sam section, matplotlib (+ its
# dependencies) which segtrain.sam imports through segtrain.visualize, tqdm and pyyaml.
# tests/test_gpu_check.py checks these two lists against the imports.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DEST=$REPO/bench/wheels
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif "$REPO/.venv/bin/python" -c "" 2>/dev/null; then PY=$REPO/.venv/bin/python
else PY=python3
fi
specs=()
PACKAGES=(webdataset braceexpand segment-anything matplotlib contourpy cycler fonttools kiwisolver pyparsing
          python-dateutil tzdata six packaging tqdm pyyaml)
IMAGE_HAS=(torch torchvision numpy pillow timm accelerate psutil)  # a CUDA torch image's own, with their dependencies (psutil: accelerate's, used by segtrain.launch)
for name in "${PACKAGES[@]}"; do
  version=$("$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name" 2>/dev/null || true)
  specs+=("$name${version:+==$version}")
done
rm -rf "$DEST" && mkdir -p "$DEST"
# The platform flags are those of the GPU image (CPython 3.12, x86-64); pip matches each
# manylinux tag exactly, so the compiled wheels (matplotlib, contourpy, kiwisolver, fonttools,
# pyyaml) need the tags their projects publish.
platforms=()
for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
           manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$tag")
done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d "$DEST" "${specs[@]}"
ls -l "$DEST"
