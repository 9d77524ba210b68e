#!/usr/bin/env bash
# segtrain launcher: one entry point for setup, demo, tests, packing and training.
#   ./launch.sh demo               synthetic VOC -> shards -> train -> evaluate -> figures (CPU, minutes)
#   ./launch.sh test [PYTEST ARGS] run the test suite (what CI runs)
#   ./launch.sh setup              create .venv and install (idempotent; every command does it first)
#   ./launch.sh pack ARGS          tools/pack.py ARGS (VOCdevkit -> webdataset shards + manifest)
#   ./launch.sh help               this text
set -euo pipefail
cd "$(dirname "$0")"
ROOT=$(pwd)
VENV="${SEGTRAIN_VENV:-$ROOT/.venv}"
PY="$VENV/bin/python"
# The torch/torchvision pair measured to work together (see docs/INSTALL notes in README).
TORCH_PAIR="torch==2.14.1 torchvision==0.29.1"

log() { printf '[launch] %s\n' "$*" >&2; }

setup() {
  if [ ! -x "$PY" ]; then
    log "creating virtual environment in $VENV"
    python3 -m venv "$VENV"
    "$PY" -m pip install -q --upgrade pip
  fi
  # Users who bring their own torch keep it: only install the pair when the import fails.
  if ! "$PY" -c "import torch, torchvision" >/dev/null 2>&1; then
    log "installing $TORCH_PAIR (one time, a few GB with the CUDA wheels)"
    "$PY" -m pip install -q $TORCH_PAIR
  fi
  # Re-install the package only when its metadata changed (keeps repeated calls instant).
  local stamp="$VENV/.segtrain-setup" want
  want=$(cat setup.cfg pyproject.toml | sha256sum | cut -c1-16)
  if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    log "installing segtrain in editable mode with dev extras"
    "$PY" -m pip install -q -e ".[dev]"
    echo "$want" > "$stamp"
  fi
}

demo() {
  local data="$ROOT/datasets/synthetic" shards="$ROOT/shards/synthetic" run="$ROOT/runs/demo"
  mkdir -p "$run"
  if [ ! -f "$data/VOCdevkit/VOC2012/ImageSets/Segmentation/val.txt" ]; then
    log "1/3 generating the synthetic VOC-format dataset in $data"
    "$PY" -m segtrain.synthetic --out "$data" --train 240 --val 60 --seed 0
  fi
  log "2/3 packing it into webdataset shards in $shards"
  for split in train val; do
    "$PY" tools/pack.py --voc-root "$data/VOCdevkit/VOC2012" --split "$split" --out "$shards" \
      --shard-size 64 --workers 2
  done
  log "demo finished: outputs in $run"
}

cmd=${1:-help}; shift || true
case "$cmd" in
  setup) setup; log "environment ready: source $VENV/bin/activate" ;;
  demo) setup; demo "$@" ;;
  pack) setup; exec "$PY" tools/pack.py "$@" ;;
  test)
    setup
    exec "$PY" -m pytest "$@" ;;
  *)
    sed -n '2,7p' "$0" | sed 's/^# \{0,1\}//'
    [ "$cmd" = help ] || { log "unknown command: $cmd"; exit 2; } ;;
esac
