#!/usr/bin/env bash
# Multi-node training under SLURM: one `accelerate launch` per node (srun starts them), each
# starting one process per GPU of its node; together they form one DDP job.
#
#   sbatch examples/slurm.sh --data shards/voc-train_aug.json --run-dir /shared/runs/aug
#   sbatch examples/slurm.sh --config voc_aug.yaml --run-dir /shared/runs/aug
#
# Time limits and preemption: 120 s before the limit SLURM sends SIGUSR1 to this script, which
# passes it to srun, srun to the launchers, the launchers to the training processes. They finish
# their step, save a checkpoint and exit 75 (segtrain/preempt.py); the script then requeues the
# job (on a marker file, see below), which continues from that checkpoint: --resume auto (the newest
# checkpoint of --run-dir, or a fresh start), so the same command serves the first and every
# later start. A preemption (SIGTERM) stops it the same way, if the cluster's grace time allows
# a step and a checkpoint. The run is named after the job (name-id, kept by a requeue), so the
# default --run-dir runs/NAME-ID stays the same; a --run-dir or --name you pass wins.
#
# Everything after the script name goes to segtrain/train.py. --run-dir must be on a
# filesystem every node sees (checkpoints are renamed into place by the main process and
# --resume latest reads them from there); so must the shards named by --data.
# This is what tests/test_multinode.py runs on one machine (two "nodes" on 127.0.0.1, CPU).
#
#SBATCH --job-name=segtrain
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1          # one launcher per node; it starts the per-GPU processes
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=24:00:00
#SBATCH --output=%x-%j.out
#SBATCH --open-mode=append           # a requeued job appends to the same log
#SBATCH --requeue
#SBATCH --signal=B:USR1@120          # B: to this script only (it forwards the signal; see below)
set -euo pipefail

# sbatch runs a copy of this script from its spool folder: find the checkout from where
# the job was submitted (run sbatch from the repository root), or set SEGTRAIN_ROOT.
ROOT=${SEGTRAIN_ROOT:-$SLURM_SUBMIT_DIR}
PY=${SEGTRAIN_PYTHON:-$ROOT/.venv/bin/python}
GPUS_PER_NODE=${SLURM_GPUS_ON_NODE:-8}
# The first node of the allocation hosts the rendezvous.
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)  # reads all: no SIGPIPE under pipefail
MASTER_PORT=${MASTER_PORT:-29500}
NUM_PROCESSES=$((SLURM_NNODES * GPUS_PER_NODE))

# srun does not inherit --cpus-per-task from sbatch on Slurm 22.05-23.02: without it every
# launcher (and so every rank and its loader workers) is bound to one core. Both spellings:
# the flag, and SRUN_CPUS_PER_TASK, which srun reads on the versions that have it.
export SRUN_CPUS_PER_TASK=${SLURM_CPUS_PER_TASK:-1}
# No --mixed_precision for the launcher: segtrain's --mixed-precision (default auto: bf16 on GPUs
# that compute it natively, else fp16) is the precision training uses; pass it after the
# script name to choose another (--mixed-precision bf16|fp16|fp32).
# Requeue on a marker, not on srun's exit status: with --kill-on-bad-exit=1, srun counts the 75 of
# the first node to finish its stop as a bad exit and SIGTERMs the other nodes' tasks; a launcher
# whose processes already ended dies of that signal, and srun reports 143 (2+ nodes: every time
# in our trials). The marker cannot be lost that way: the main process writes it (atomically)
# only after the stop checkpoint's last barrier, when every rank has its state on disk, before
# anything that may block or fail at the end (segtrain/preempt.py, SEGTRAIN_STOP_MARKER). It
# sits in the submit folder (a filesystem the first node sees, where rank 0 and this script run).
# --kill-on-bad-exit stays: a crashed node must not leave the others waiting in a collective.
# To survive a dead process (the OOM killer) without a requeue, let torchrun restart the group:
# replace `--rdzv_backend static` below by `--rdzv_backend c10d --max_restarts 2` (it resumes
# from the newest checkpoint: --resume auto; tested with 2 processes on one machine).
export SEGTRAIN_STOP_MARKER=${SEGTRAIN_STOP_MARKER:-$ROOT/.segtrain-stopped-$SLURM_JOB_ID}
rm -f "$SEGTRAIN_STOP_MARKER"  # a requeued job starts without the last run's marker
# The stop flag and the collectives use the rendezvous store on MASTER_ADDR:MASTER_PORT and the
# backend's own sockets; gloo (CPU runs, and NCCL's bootstrap) binds to the address the host name
# resolves to, which on some clusters is 127.0.1.1 or a management network: set the interface
# that reaches the other nodes, e.g. GLOO_SOCKET_IFNAME=ib0 NCCL_SOCKET_IFNAME=ib0 (ip -br addr
# lists them), in the environment of sbatch; left unset, the libraries choose.
# srun runs in the background so that this shell can take SIGUSR1/SIGTERM and pass them on.
forward() { [ -n "${SRUN_PID:-}" ] && kill -s "$1" "$SRUN_PID" 2>/dev/null || true; }
trap 'forward USR1' USR1
trap 'forward TERM' TERM

# Single quotes: SLURM_NODEID is expanded by each task on its own node (0, 1, ...).
srun --kill-on-bad-exit=1 --cpus-per-task="$SRUN_CPUS_PER_TASK" bash -c '
  export PYTHONPATH="$5${PYTHONPATH:+:$PYTHONPATH}"
  exec "$0" -m segtrain.launch \
    --multi_gpu --num_machines "$1" --num_processes "$2" --machine_rank "$SLURM_NODEID" \
    --main_process_ip "$3" --main_process_port "$4" --rdzv_backend static --same_network \
    --dynamo_backend no \
    "$5/segtrain/train.py" "${@:6}"
' "$PY" "$SLURM_NNODES" "$NUM_PROCESSES" "$MASTER_ADDR" "$MASTER_PORT" "$ROOT" \
  --resume auto --name "$SLURM_JOB_NAME-$SLURM_JOB_ID" "$@" &
SRUN_PID=$!
# `wait` returns early when a trapped signal arrives: wait again until srun has really ended.
while :; do
  status=0
  wait "$SRUN_PID" || status=$?
  kill -0 "$SRUN_PID" 2>/dev/null || break
done
if [ -f "$SEGTRAIN_STOP_MARKER" ]; then  # stopped with a checkpoint before the last step
  echo "segtrain: stopped with a checkpoint in $(cat "$SEGTRAIN_STOP_MARKER"); requeueing job $SLURM_JOB_ID" >&2
  rm -f "$SEGTRAIN_STOP_MARKER"
  scontrol requeue "$SLURM_JOB_ID"
  exit 75  # segtrain.preempt.PREEMPTED_EXIT, whatever srun reported
fi
exit "$status"
