"""Clusters played on one machine (tests/cluster_harness.py): N "nodes" of segtrain.launch with
--num_machines N on 127.0.0.1 (CPU + gloo) train into ONE run directory; stop signals to every
process, one rank or one launcher requeue with one checkpoint and resume bit-equal; a dead rank
is one line, or a restart that ends equal; a user error is one line; --compile compiles on 2
processes; examples/slurm.sh gives every rank its CPUs."""
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from cluster_harness import Job, metrics_steps, wait_for_step
from segtrain.model import load_checkpoint
from segtrain.preempt import PREEMPTED_EXIT

REPO = Path(__file__).resolve().parents[1]


def test_slurm_script_gives_every_rank_its_cpus_and_names_no_precision(tmp_path):
    """examples/slurm.sh with stand-ins for srun and scontrol: srun repeats --cpus-per-task (not
    inherited on Slurm 22.05-23.02), and the launcher is given no precision (segtrain's decides)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text('#!/usr/bin/env bash\nprintf "%s\\0" "SRUN_CPUS_PER_TASK=$SRUN_CPUS_PER_TASK" "$@" '
                                  f'> {tmp_path}/srun.args\n')
    (bin_dir / "scontrol").write_text("#!/usr/bin/env bash\nprintf 'node1\\nnode2\\n'\n")
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    env = os.environ | {"PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_SUBMIT_DIR": str(REPO),
                        "SLURM_JOB_NODELIST": "node[1-2]", "SLURM_NNODES": "2", "SLURM_GPUS_ON_NODE": "4",
                        "SLURM_CPUS_PER_TASK": "32", "SLURM_JOB_ID": "123", "SLURM_JOB_NAME": "voc"}
    proc = subprocess.run(["bash", str(REPO / "examples" / "slurm.sh"), "--data", "x.json"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    args = (tmp_path / "srun.args").read_text().split("\0")
    assert args[0] == "SRUN_CPUS_PER_TASK=32" and "--cpus-per-task=32" in args
    script = args[args.index("-c") + 1]
    assert "--mixed_precision" not in script and "segtrain.launch" in script
    assert args[args.index("-c") + 2:args.index("-c") + 7] == [f"{REPO}/.venv/bin/python", "2", "8", "node1", "29500"]


@pytest.mark.slow
def test_compile_on_two_processes_compiles_graphs_and_overlays_go_to_the_main_process(launch_ddp, tmp_path):
    """--compile on 2 processes: the inner module is compiled, so dynamo compiles graphs (the DDP
    wrapper compiled gives 0: dynamo graph-breaks at DDP's forward), the line says so, and DDP
    still keeps the ranks' parameters equal. The validation overlays reach rank 0 only."""
    proc = launch_ddp(REPO / "tests" / "ddp_cluster_worker.py", tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"cluster{r}.json").read_text()) for r in (0, 1)]
    for rank in ranks:
        assert rank["world"] == 2 and rank["compiled"] and rank["graphs"] > 0, rank
        assert rank["line"].startswith(f"compile: {rank['graphs']} graph(s) compiled"), rank
    assert ranks[0]["checksum"] == ranks[1]["checksum"]
    assert ranks[0]["overlays"] == ["00", "01", "02"] and ranks[1]["overlays"] == []


# ----------------------------------------------------------------------------- the cluster harness
# N "nodes" of segtrain.launch on 127.0.0.1, signals to every process of the job, srun's
# --kill-on-bad-exit, kill -9 of a rank (tests/cluster_harness.py). 2 processes in all, so
# every run here trains the same batches as the uninterrupted one.

STOPS = int(os.environ.get("SEGTRAIN_CLUSTER_STOPS", "2"))  # per layout; the 10: set it to 10
CLUSTER_ITERATIONS = 4 * STOPS + 4  # room for every stop before the last step (a stop there is the end)


def cluster_args(packed_shards, run_dir: Path, *extra: str) -> list[str]:
    return ["--data", str(packed_shards["train"]), "--run-dir", str(run_dir), "--backbone", "resnet18",
            "--pretrained", "false", "--crop-size", "33", "--batch-size", "4", "--iterations",
            str(CLUSTER_ITERATIONS), "--workers", "1", "--log-every", "1", "--checkpoint-every", "2",
            "--keep-checkpoints", "1", "--val-every", "1000", "--seed", "3", "--mixed-precision", "no",
            "--tracker", "none", "--resume", "auto", *extra]


def same_final_weights(a: Path, b: Path) -> None:
    x, _ = load_checkpoint(a / "final.pt")
    y, _ = load_checkpoint(b / "final.pt")
    for p, q in zip(x.state_dict().values(), y.state_dict().values()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def losses(run_dir: Path) -> dict:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in records if "train/loss" in r}


@pytest.fixture(scope="module")
def uninterrupted_cluster_run(packed_shards, tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("cluster")
    outcome = Job(cluster_args(packed_shards, work / "run"), nodes=1, procs=2, cwd=work).wait()
    assert outcome.statuses == [0], str(outcome)
    return work / "run"


# Who gets the stop signal, stop after stop: SLURM's preemption, time limit or scancel signal every
# process of the job; `scancel --signal` or a node-local action may reach one rank only; srun and
# a batch shell forward theirs to the launcher alone.
STOP_TARGETS = {1: ("every process", "one rank"), 2: ("every process", "one launcher")}


def send_stop(job: Job, target: str) -> int:
    """SIGTERM to ``target``; the number of processes signalled."""
    if target == "every process":
        return job.signal_all(signal.SIGTERM)
    os.kill(job.rank_pid(1) if target == "one rank" else job.nodes[0].pid, signal.SIGTERM)
    return 1


@pytest.mark.slow
@pytest.mark.timeout(300 + 150 * STOPS)  # ~1 min per stop on 2 shared cores; 10 stops outlast the default
@pytest.mark.parametrize("nodes", [1, 2])
def test_every_stop_requeues_with_one_checkpoint_and_the_run_is_bit_equal(nodes, packed_shards, tmp_path,
                                                                          uninterrupted_cluster_run):
    """SIGTERM to every process of the job (launchers, ranks, loader workers), to one rank or to one
    launcher (STOP_TARGETS in turn), srun's --kill-on-bad-exit played: each stop leaves the requeue
    marker and exactly one complete checkpoint (1 node: exit 75), and the requeued jobs
    (--resume auto) end bit-equal to a run never stopped, in one run directory however many nodes."""
    run_dir, marker = tmp_path / "run", tmp_path / "stopped"
    stopped_at = 0
    for stop in range(STOPS):
        target = STOP_TARGETS[nodes][stop % 2]
        job = Job(cluster_args(packed_shards, run_dir), nodes=nodes, procs=2 // nodes, cwd=tmp_path,
                  env={"SEGTRAIN_STOP_MARKER": str(marker)})
        wait_for_step(job, run_dir, stopped_at + 1)
        signalled = send_stop(job, target)
        outcome = job.wait()
        done = max(metrics_steps(run_dir))
        if target == "every process":
            assert signalled >= 2 * nodes + 2, signalled  # launchers, ranks and their loader workers
        assert marker.read_text().strip() == str(run_dir / "checkpoints" / f"step_{done:07d}"), str(outcome)
        assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [f"step_{done:07d}"], str(outcome)
        assert done < CLUSTER_ITERATIONS and "Traceback" not in outcome.output, str(outcome)
        assert outcome.output.count(f"stopped by SIGTERM after step {done}") == nodes  # each node main's line
        if nodes == 1:
            assert outcome.statuses == [PREEMPTED_EXIT], str(outcome)
        print(f"\n{nodes} node(s), stop {stop + 1} ({target}): after step {done}, statuses {outcome.statuses}")
        marker.unlink()  # as examples/slurm.sh does before it requeues
        stopped_at = done
    outcome = Job(cluster_args(packed_shards, run_dir), nodes=nodes, procs=2 // nodes, cwd=tmp_path).wait()
    assert outcome.statuses == [0] * nodes, str(outcome)
    assert "resumed from" in outcome.output and not marker.exists()
    assert losses(run_dir) == losses(uninterrupted_cluster_run)
    same_final_weights(run_dir, uninterrupted_cluster_run)


@pytest.mark.slow
def test_a_dead_rank_is_one_line_and_with_restarts_the_run_finishes_equal(packed_shards, tmp_path,
                                                                          uninterrupted_cluster_run):
    """kill -9 of rank 1 (the OOM killer): without restarts, one line naming the rank, its signal and
    the likely cause, no traceback; with --max_restarts 1 the group restarts from the newest complete
    checkpoint and ends with the uninterrupted run's weights."""
    for restarts, run_dir in ((0, tmp_path / "once"), (1, tmp_path / "restarted")):
        flags = ("--max_restarts", str(restarts), "--rdzv_backend", "c10d")
        job = Job(cluster_args(packed_shards, run_dir), nodes=1, procs=2, cwd=tmp_path, launch_flags=flags)
        wait_for_step(job, run_dir, 3)
        os.kill(job.rank_pid(1), signal.SIGKILL)
        killed = time.monotonic()
        outcome = job.wait()
        print(f"\nkill -9 of rank 1, {restarts} restart(s): launcher exit after {time.monotonic() - killed:.1f} s")
        assert "Traceback" not in outcome.output, str(outcome)
        if restarts == 0:
            assert outcome.statuses == [128 + 9], str(outcome)
            lines = [line for line in outcome.output.splitlines() if line.startswith("segtrain:")]
            assert lines == ["segtrain: process 1 was killed by SIGKILL (signal 9: out of memory? the kernel's "
                             "OOM killer sends it (dmesg; sacct shows OUT_OF_MEMORY))"], str(outcome)
        else:
            assert outcome.statuses == [0], str(outcome)
            assert "resumed from" in outcome.output
            assert losses(run_dir) == losses(uninterrupted_cluster_run)
            same_final_weights(run_dir, uninterrupted_cluster_run)


@pytest.mark.slow
def test_a_user_error_on_two_processes_is_one_line_and_spends_no_restart(packed_shards, tmp_path):
    flags = ("--max_restarts", "3", "--rdzv_backend", "c10d")
    started = time.monotonic()
    outcome = Job(cluster_args(packed_shards, tmp_path / "run", "--batch-size", "3"), nodes=1, procs=2,
                  cwd=tmp_path, launch_flags=flags).wait(timeout=300)
    assert outcome.statuses == [2], str(outcome)
    lines = [line for line in outcome.output.splitlines() if line.strip() and not line.startswith("---")]
    assert len(lines) == 1 and lines[0].startswith("segtrain: error: "), str(outcome)  # once: no second round
    print(f"\nuser error under --max_restarts 3: exit 2 after {time.monotonic() - started:.1f} s")


# ----------------------------------------------------------------------------- one process, no training

def test_every_restart_round_gets_the_jobs_default_run_name(monkeypatch):
    """A torchrun restart parses the config again, later: the default name (with the start time)
    is the job's, from segtrain.launch's clock, so the new round finds the run's checkpoints."""
    from segtrain.config import parse_config

    monkeypatch.setenv("SEGTRAIN_JOB_START", str(time.mktime((2026, 1, 2, 3, 4, 5, 0, 0, -1))))
    first = parse_config([]).name
    time.sleep(1.1)
    assert parse_config([]).name == first and first.endswith("-20260102-030405")


def test_an_error_while_the_main_process_decides_reaches_every_process(monkeypatch):
    """Rank 0 fails inside decided_by_main: the others get its user error (one line, exit 2) or
    end quietly after another error, instead of waiting in the broadcast until the timeout."""
    import types

    import accelerate.utils

    from segtrain import distributed
    from segtrain.files import ConfigError

    sent = []

    def fake_broadcast(box, from_process=0):
        if box[0] is None:
            box[0] = sent[-1]
        else:
            sent.append(box[0])
    monkeypatch.setattr(accelerate.utils, "broadcast_object_list", fake_broadcast)
    main, other = (types.SimpleNamespace(num_processes=2, is_main_process=m) for m in (True, False))
    for error, expected in ((ConfigError("wandb_id: cannot write"), ConfigError), (KeyError("x"), SystemExit)):
        def decide():
            raise error
        with pytest.raises(type(error)):
            distributed.decided_by_main(decide, main)
        with pytest.raises(expected) as raised:
            distributed.decided_by_main(lambda: "never run here", other)
        if expected is SystemExit:
            assert raised.value.code == distributed.PEER_LOST_EXIT
        else:
            assert str(raised.value) == "wandb_id: cannot write"
    assert distributed.decided_by_main(lambda: 7, main) == 7 and distributed.decided_by_main(lambda: 0, other) == 7


def test_the_launcher_names_the_process_that_died_not_the_ones_that_lost_it():
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    from segtrain import launch

    def failure(rank, code, timestamp):
        f = ProcessFailure(local_rank=rank, pid=100 + rank, exitcode=code, error_file="/nonexistent")
        f.timestamp = timestamp
        return f
    # Rank 0 lost its peer first (by the agent's clock); rank 1 was killed by the OOM killer.
    error = ChildFailedError("train", {0: failure(0, 3, 1), 1: failure(1, -9, 2), 2: failure(2, -15, 0)})
    rank, first = launch.first_cause(error)
    assert (rank, first.exitcode) == (1, -9)
    assert launch.describe(rank, first.exitcode).startswith("process 1 was killed by SIGKILL (signal 9: out of memory?")
    assert launch.describe(0, 3) == "process 0 lost contact with another process of the job (another node failed?)"
