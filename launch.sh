#!/usr/bin/env bash
# segtrain launcher: one entry point for setup, demo, tests, packing and training.
#   ./launch.sh demo               synthetic VOC -> shards -> train -> evaluate -> figures (CPU, minutes)
#   ./launch.sh test [PYTEST ARGS] run the test suite (what CI runs)
#   ./launch.sh setup              create .venv and install (idempotent; every command does it first)
#   ./launch.sh pack ARGS          tools/pack.py ARGS (VOCdevkit -> webdataset shards + manifest)
#   ./launch.sh train [--gpus N | --cpu-procs N | --accelerate-config F] ARGS
#                                  accelerate launch segtrain/train.py ARGS with the matching config
#   ./launch.sh compare-losses [ARGS]  CE vs an imbalance-aware loss, same settings, then the report
#   ./launch.sh help               this text
#
# Paths given to a command mean what they mean where you stand: launch.sh never changes
# the working directory, and finds its own files through ROOT (the repository).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")" && pwd)
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's segtrain, wherever you run from
VENV="${SEGTRAIN_VENV:-$ROOT/.venv}"
PY="$VENV/bin/python"
# The torch/torchvision pair measured to work together (see the top of README.md); only
# installed when the venv cannot import a working pair already.
TORCH_PAIR="torch==2.14.1 torchvision==0.29.1"

log() { printf '[launch] %s\n' "$*" >&2; }

setup() {
  if [ ! -x "$PY" ]; then
    log "creating virtual environment in $VENV"
    python3 -m venv "$VENV"
    "$PY" -m pip install -q --upgrade pip
  fi
  # Users who bring their own torch keep it: only install the pair when the import fails
  # or the versions are older than segtrain needs (torch 2.6 / torchvision 0.21).
  if ! "$PY" -c "import sys, torch, torchvision
v = lambda m: tuple(int(x) for x in m.__version__.split('+')[0].split('.')[:2])
sys.exit(v(torch) < (2, 6) or v(torchvision) < (0, 21))" >/dev/null 2>&1; then
    log "installing $TORCH_PAIR (one time, a few GB with the CUDA wheels)"
    "$PY" -m pip install -q $TORCH_PAIR
  fi
  # Re-install the package only when its metadata changed (keeps repeated calls instant).
  local stamp="$VENV/.segtrain-setup" want
  want=$(cat "$ROOT/setup.cfg" "$ROOT/pyproject.toml" | sha256sum | cut -c1-16)
  if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    log "installing segtrain in editable mode with dev extras"
    "$PY" -m pip install -q -e "${ROOT}[dev]"
    echo "$want" > "$stamp"
  fi
}

# accelerate launch with the config that fits: one GPU (default), N GPUs (DDP), or N CPU
# processes (real DDP over gloo; see accelerate_configs/cpu_ddp.yaml for why it is spelled so).
# segtrain.launch is accelerate launch minus its traceback: the exit status is the training
# process's (2 for a user error, whose one-line message the first process prints).
train() {
  local acc=(--config_file "$ROOT/accelerate_configs/single_gpu.yaml") env=()
  while [ $# -gt 0 ]; do
    case "$1" in
      --gpus) acc=(--config_file "$ROOT/accelerate_configs/multi_gpu.yaml" --num_processes "$2"); shift 2 ;;
      --cpu-procs) env=(ACCELERATE_USE_CPU=1)
                   acc=(--multi_gpu --num_processes "$2" --num_machines 1 --mixed_precision no
                        --dynamo_backend no --main_process_port "${PORT:-29533}"); shift 2 ;;
      --accelerate-config) acc=(--config_file "$2"); shift 2 ;;
      *) break ;;
    esac
  done
  env ${env[@]+"${env[@]}"} "$PY" -m segtrain.launch "${acc[@]}" "$ROOT/segtrain/train.py" "$@"
}

SYNTHETIC="$ROOT/datasets/synthetic"
SYNTHETIC_SHARDS="$ROOT/shards/synthetic"
# The CPU recipe of the demo, sized to finish in minutes on any 2-core x86 CPU
# (docs/BENCHMARKS.md#demo-training): a ResNet-18 from random init (no download; a
# ResNet-50 step is ~10x slower on AVX2-only CPUs), crop 129, batch 8. Precision auto:
# the faster of fp32 and bf16 (each with channels_last on and off), timed on this CPU once
# and cached (segtrain/autotune.py; bf16 is not tried where it is emulated, AVX2-only CPUs);
# train.py prints which and the figures. Flags given after it override it.
CPU_RECIPE=(--backbone resnet18 --pretrained false --crop-size 129 --batch-size 8 --iterations 150
            --lr 0.02 --lr-schedule poly --mixed-precision auto --workers 2 --checkpoint-every 50)

# The built-in synthetic VOC-format dataset, generated once, packed into shards.
prepare_synthetic() {
  if [ ! -f "$SYNTHETIC/VOCdevkit/VOC2012/ImageSets/Segmentation/val.txt" ]; then
    log "generating the synthetic VOC-format dataset in $SYNTHETIC"
    "$PY" -m segtrain.synthetic --out "$SYNTHETIC" --train 240 --val 60 --seed 0
  fi
  log "packing it into webdataset shards in $SYNTHETIC_SHARDS"
  for split in train val; do
    "$PY" "$ROOT/tools/pack.py" --voc-root "$SYNTHETIC/VOCdevkit/VOC2012" --split "$split" \
      --out "$SYNTHETIC_SHARDS" --shard-size 64 --workers 2
  done
}

# CE and an imbalance-aware loss, otherwise identical, then the comparison report.
#   ./launch.sh compare-losses [--proposed LOSS_SPEC] [train flags, e.g. --data shards/voc-train.json]
compare_losses() {
  # focal: the only loss that raised both mIoU and rare-class IoU over CE in
  # bench/imbalance_bench.py (docs/BENCHMARKS.md#losses-on-imbalanced-data).
  local proposed=focal out="$ROOT/runs/compare-losses"
  if [ "${1:-}" = --proposed ]; then proposed=$2; shift 2; fi
  # Both runs in one wandb group (offline without credentials), side by side in the dashboard;
  # --tracker none after the command turns wandb off.
  local group="compare-losses-$(date +%Y%m%d-%H%M%S)"
  prepare_synthetic
  local runs=()
  for loss in ce "$proposed"; do
    local run="$out/${loss//+/_plus_}"
    log "training with --loss $loss -> $run"
    rm -rf "$run"
    "$PY" "$ROOT/segtrain/train.py" --data "$SYNTHETIC_SHARDS/voc-train.json" "${CPU_RECIPE[@]}" \
      --run-dir "$run" --name "compare-$loss" --loss "$loss" --tracker wandb --group "$group" --tags compare-losses "$@"
    runs+=("$run")
  done
  "$PY" -m segtrain.report "${runs[@]}" --out "$out/report"
}

demo() {
  local run="$ROOT/runs/demo" shards="$SYNTHETIC_SHARDS" t0=$SECONDS
  log "1-2/5 synthetic VOC-format data and shards"
  prepare_synthetic
  # The full 150 steps where they fit the training budget; fewer on a CPU too slow for them
  # (timed here, not assumed: CPUs differ ~10x). segtrain.budget says what it measured.
  local steps
  # The promise is 5 minutes; aim at 270 s for what is left of it after data and packing.
  steps=$("$PY" -m segtrain.budget --seconds $(( ${DEMO_SECONDS:-270} - (SECONDS - t0) )) --max-steps 150 --min-steps 60 \
          --backbone resnet18 --crop-size 129 --batch-size 8 --mixed-precision auto)
  log "3/5 training DeepLabV3+ ResNet-18 from scratch on CPU (crop 129, batch 8, $steps steps, wandb offline)"
  log "    precision auto: the faster setting timed on this CPU (cached); 'precision:' below gives the figures"
  rm -rf "$run"
  "$PY" "$ROOT/segtrain/train.py" --data "$shards/voc-train.json" "${CPU_RECIPE[@]}" --iterations "$steps" \
    --run-dir "$run" --name demo --tracker wandb
  log "4/5 evaluating best.pt on the val split"
  "$PY" -m segtrain.evaluate --checkpoint "$run/best.pt" --data "$shards/voc-val.json" \
    --out "$run/eval_val.json" --mixed-precision auto --wandb
  log "5/5 figures and report"
  "$PY" -m segtrain.visualize dataset --data "$shards/voc-train.json" --out "$run/dataset.png"
  "$PY" -m segtrain.report "$run" --out "$run/report"
  cat <<EOT

demo finished in $((SECONDS - t0)) s. Everything is in $run:
  dataset.png               20 training images covering all classes, with ground truth
  report/report.md          the run report:
  report/curves.png           val mIoU per epoch and training loss
  report/predictions.png      RGB | ground truth | prediction on 5 val images
  report/class_balance.png    class imbalance of the training data
  eval_val.json             val metrics of best.pt (mIoU, pixel acc, per-class IoU)
  best.pt, final.pt         weights + config (torch.load(..., weights_only=True))
  metrics.jsonl, config.yaml, checkpoints/   the run record (resume: --resume latest)
  wandb/                    offline wandb run, training then evaluation (upload: wandb sync $run/wandb/offline-run-*)
EOT
}

cmd=${1:-help}; shift || true
case "$cmd" in
  setup) setup; log "environment ready: source $VENV/bin/activate" ;;
  demo) setup; demo "$@" ;;
  pack) setup; exec "$PY" "$ROOT/tools/pack.py" "$@" ;;
  train) setup; train "$@" ;;
  compare-losses) setup; compare_losses "$@" ;;
  test)
    setup
    [ $# -gt 0 ] || set -- "$ROOT/tests"
    exec "$PY" -m pytest --rootdir "$ROOT" -c "$ROOT/setup.cfg" "$@" ;;
  *)
    sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'
    [ "$cmd" = help ] || { log "unknown command: $cmd"; exit 2; } ;;
esac
