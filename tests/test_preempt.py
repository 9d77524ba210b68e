"""Preemption in one process: the stop flag, its signals and ``--resume auto``'s choice; the
requeue in examples/slurm.sh. Stops of real jobs (every process, one rank or one launcher
signalled, exit 75, one checkpoint, a bit-equal resume) are test_multinode.py's cluster harness."""
import os
import signal
import subprocess
import time

import pytest

from conftest import REPO
from segtrain import preempt
from segtrain.config import parse_config
from segtrain.files import ConfigError
from segtrain.checkpoints import RunDir, resolve_resume
from segtrain.plan import plan_run

ITERATIONS = 12


def run_args(data, run_dir, *extra):
    # One epoch of 12 steps (48 images, global batch 4); the only scheduled checkpoint is the last.
    return ["--data", str(data), "--run-dir", str(run_dir), "--backbone", "resnet18", "--pretrained", "false",
            "--crop-size", "33", "--batch-size", "4", "--iterations", str(ITERATIONS), "--workers", "1",
            "--lr-schedule", "step", "--step-size", "4", "--step-gamma", "0.5", "--log-every", "1",
            "--checkpoint-every", "1000", "--val-every", "1000", "--seed", "3", "--mixed-precision", "no",
            "--tracker", "none", *extra]


# ----------------------------------------------------------------------------- one process, no training

def test_resume_auto_is_the_newest_complete_checkpoint_or_a_fresh_start(tmp_path):
    assert resolve_resume("auto", RunDir(tmp_path)) is None
    for name in ("step_0000003", "step_0000010", ".step_0000012.tmp"):  # a save cut short leaves a temp folder
        (tmp_path / "checkpoints" / name).mkdir(parents=True)
    assert resolve_resume("auto", RunDir(tmp_path)) == tmp_path / "checkpoints" / "step_0000010"


def test_resume_auto_restarts_a_run_stopped_before_its_first_checkpoint(packed_shards, tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "train/loss": 3.0}\n')
    with pytest.raises(ConfigError, match="already holds a run"):
        plan_run(parse_config(run_args(packed_shards["train"], tmp_path)))
    plan = plan_run(parse_config(run_args(packed_shards["train"], tmp_path, "--resume", "auto")))
    assert plan.resume_from is None


def test_a_signal_raises_the_flag_and_close_restores_the_handlers():
    before = signal.getsignal(signal.SIGUSR1)
    stopper = preempt.StopOnSignal("TERM+USR1", world_size=1)
    assert not stopper.should_stop()
    os.kill(os.getpid(), signal.SIGUSR1)
    assert stopper.should_stop() and stopper.stopped and stopper.signum == signal.SIGUSR1
    stopper.close()
    assert signal.getsignal(signal.SIGUSR1) is before
    untouched = preempt.StopOnSignal("none", world_size=1)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL and not untouched.should_stop()
    untouched.close()


def test_copies_of_one_signal_stop_cleanly_and_a_later_repeat_stops_at_once(monkeypatch):
    """SLURM signals every process and the launchers forward their own copy: copies that arrive
    together are one request; the same signal again after the grace period kills at once."""
    killed = []
    monkeypatch.setattr(preempt.os, "kill", lambda pid, sig: killed.append(sig))
    clock = iter([100.0, 100.01, 100.02, 100.0 + preempt.REPEAT_GRACE_S + 1])
    monkeypatch.setattr(preempt.time, "monotonic", lambda: next(clock))
    stopper = preempt.StopOnSignal("TERM+USR1", world_size=1)
    try:
        for _ in range(3):  # SLURM's copy, the batch shell's, segtrain.launch's
            stopper._handle(signal.SIGTERM, None)
        assert killed == [] and stopper.should_stop()
        stopper._handle(signal.SIGTERM, None)  # a person insisting
        assert killed == [signal.SIGTERM]
    finally:
        stopper.close()


def test_stop_signals_setting_is_checked():
    with pytest.raises(ConfigError, match="stop_signals: must be one of TERM\\+USR1, TERM, USR1, none"):
        parse_config(["--stop-signals", "KILL"])


# ----------------------------------------------------------------------------- examples/slurm.sh

FAKE_SRUN = """#!/usr/bin/env bash
# Stands in for srun: records its arguments, stops with the given status on SIGUSR1 (as the
# training does after its checkpoint), or ends by itself with status $FAKE_STATUS.
printf '%s\\n' "$@" > "$FAKE_DIR/srun_args"
# Two nodes under --kill-on-bad-exit: the marker is written, yet srun reports 143 (issue 23).
trap 'echo USR1 > "$FAKE_DIR/srun_signal"; echo ckpt > "$SEGTRAIN_STOP_MARKER"; exit 143' USR1
for _ in $(seq "$FAKE_TICKS"); do sleep 0.1; done
exit "$FAKE_STATUS"
"""
FAKE_SCONTROL = """#!/usr/bin/env bash
if [ "$1" = requeue ]; then echo "$2" >> "$FAKE_DIR/requeued"; else echo node1; fi
"""


@pytest.mark.parametrize("case", ["signalled", "finished"])
def test_slurm_script_forwards_the_signal_and_requeues_only_a_stopped_run(case, tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = os.environ | {"PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_DIR": str(tmp_path), "FAKE_STATUS": "0",
                        "FAKE_TICKS": "200" if case == "signalled" else "5",
                        "SLURM_SUBMIT_DIR": str(REPO), "SLURM_JOB_NODELIST": "node1", "SLURM_NNODES": "1",
                        "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "segtrain",
                        "SEGTRAIN_STOP_MARKER": str(tmp_path / "stopped")}
    (tmp_path / "stopped").write_text("from the job's last run\n")  # a requeued job's old marker: not a new stop
    script = subprocess.Popen(["bash", str(REPO / "examples" / "slurm.sh"), "--run-dir", "runs/x"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 20
    while not (tmp_path / "srun_args").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    if case == "signalled":  # what `#SBATCH --signal=B:USR1@120` does
        script.send_signal(signal.SIGUSR1)
    script.communicate(timeout=30)
    args = (tmp_path / "srun_args").read_text().split("\n")
    assert args[args.index("--resume") + 1] == "auto" and args[args.index("--name") + 1] == "segtrain-4242"
    assert args.index("--resume") < args.index("--run-dir")  # the user's flags come last and win
    if case == "signalled":
        assert script.returncode == preempt.PREEMPTED_EXIT
        assert (tmp_path / "srun_signal").read_text().strip() == "USR1"
        assert (tmp_path / "requeued").read_text().split() == ["4242"]
        assert not (tmp_path / "stopped").exists()  # removed: the requeued job starts without it
    else:
        assert script.returncode == 0 and not (tmp_path / "requeued").exists()


def test_ranks_agree_through_the_store_on_one_step_whoever_got_the_signal(monkeypatch):
    """Rank 1 alone is signalled at the end of step 3: both ranks stop after step 4, rank 0 names
    rank 1's signal; a restart round (TORCHELASTIC_RESTART_COUNT) does not see the old request."""
    import torch.distributed as dist

    store = dist.TCPStore("127.0.0.1", 0, 1, True)
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    ranks = [preempt.StopOnSignal("TERM+USR1", world_size=2, store=store) for _ in range(2)]
    try:
        ranks[0].key = ranks[1].key  # one run: the same key on both ranks (made in the same order there)
        assert not ranks[0].should_stop(3)  # rank 0 read before rank 1 proposed
        ranks[1]._handle(signal.SIGUSR1, None)
        assert not ranks[1].should_stop(3)
        assert [r.should_stop(4) for r in ranks] == [True, True]
        assert ranks[0].signum == signal.SIGUSR1
        monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
        fresh = preempt.StopOnSignal("TERM+USR1", world_size=2, store=store)
        fresh.key = fresh.key.replace(fresh.key.rsplit("/", 1)[1], ranks[1].key.rsplit("/", 1)[1])
        assert "round1" in fresh.key and not fresh.should_stop(4)
        fresh.close()
    finally:
        for r in reversed(ranks):
            r.close()
