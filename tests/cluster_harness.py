"""A SLURM cluster played on one CPU machine, for tests and bench/cluster_bench.py.

* ``Job(nodes=N, procs=P)``: N "nodes", each one ``python -m segtrain.launch`` process (what
  examples/slurm.sh's srun starts per node) with ``--num_machines N --machine_rank i``,
  rendezvous on 127.0.0.1, P CPU processes per node (gloo).
* ``job.signal_all(sig)``: the signal to EVERY process of the job tree, as SLURM signals a job
  step's cgroup: launchers, ranks, loader workers, wandb-core (found by walking /proc children).
* ``job.wait()``: srun's ``--kill-on-bad-exit=1`` rule: when one node exits non-zero, the
  others' trees get SIGTERM (then SIGKILL after ``kill_wait`` s, SLURM's KillWait); returns
  the statuses, srun's status (the highest, or 128+N of a node killed by a signal), and output.
* ``job.rank_pid(r)``: the pid of global rank r (for ``kill -9`` of one rank).
"""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tree(pid: int) -> list[psutil.Process]:
    """The process and all its descendants (the job step's cgroup, as far as one machine shows it)."""
    with contextlib.suppress(psutil.NoSuchProcess):
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    return []


def send(processes: list[psutil.Process], sig: int) -> None:
    for p in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(sig)


@dataclass
class Outcome:
    statuses: list[int]  # each node's launcher (shell convention: 128+N for a signal death)
    srun_status: int  # what srun reports: the highest status of the nodes
    output: str  # every node's stdout and stderr, node after node
    killed_on_bad_exit: bool  # the rule fired: a node exited non-zero while another still ran

    def __str__(self) -> str:
        return f"statuses {self.statuses}, srun {self.srun_status}\n{self.output[-4000:]}"


class Job:
    def __init__(self, script_args: list[str], nodes: int = 1, procs: int = 1, cwd: Path = REPO,
                 launch_flags: tuple[str, ...] = (), env: dict | None = None, kill_wait: float = 30.0,
                 script: str = "segtrain/train.py") -> None:
        port = free_port()
        world = nodes * procs
        self.kill_wait = kill_wait
        self.env = os.environ | {"ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO),
                                 **(env or {})}
        self.logs = [cwd / f".node{i}.log" for i in range(nodes)]
        self.nodes = []
        for i in range(nodes):
            cmd = [sys.executable, "-m", "segtrain.launch", "--multi_gpu", "--num_machines", str(nodes),
                   "--machine_rank", str(i), "--num_processes", str(world), "--main_process_ip", "127.0.0.1",
                   "--main_process_port", str(port), "--mixed_precision", "no", "--dynamo_backend", "no",
                   *launch_flags, str(REPO / script), *script_args]
            with open(self.logs[i], "w") as log:
                # Each node its own session: a signal to one node's tree is not a terminal's to all.
                self.nodes.append(subprocess.Popen(cmd, cwd=cwd, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                                   start_new_session=True))

    def processes(self) -> list[psutil.Process]:
        return [p for node in self.nodes for p in tree(node.pid)]

    def rank_pid(self, rank: int, timeout: float = 120) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for p in self.processes():
                with contextlib.suppress(psutil.Error):
                    if p.environ().get("RANK") == str(rank) and p.environ().get("LOCAL_RANK") is not None:
                        if p.parent() is not None and p.parent().pid in [n.pid for n in self.nodes]:
                            return p.pid
            time.sleep(0.1)
        raise AssertionError(f"no rank {rank} in the job")

    def signal_all(self, sig: int = signal.SIGTERM) -> int:
        """``sig`` to every process of every node (SLURM's preemption / time limit / scancel)."""
        processes = self.processes()
        send(processes, sig)
        return len(processes)

    def output(self) -> str:
        return "".join(f"--- node {i}\n{log.read_text()}" for i, log in enumerate(self.logs))

    def wait(self, timeout: float = 600) -> Outcome:
        """Wait for every node, playing srun --kill-on-bad-exit=1 (module doc)."""
        deadline = time.monotonic() + timeout
        fired_at = None
        while any(n.poll() is None for n in self.nodes):
            if time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"the job did not end in {timeout} s\n{self.output()[-4000:]}")
            bad = [n for n in self.nodes if n.poll() not in (None, 0)]
            running = [n for n in self.nodes if n.poll() is None]
            if bad and running and fired_at is None:
                fired_at = time.monotonic()
                for n in running:
                    send(tree(n.pid), signal.SIGTERM)
            if fired_at is not None and time.monotonic() - fired_at > self.kill_wait:
                for n in running:
                    send(tree(n.pid), signal.SIGKILL)
            time.sleep(0.02)
        statuses = [128 - n.returncode if n.returncode < 0 else n.returncode for n in self.nodes]
        return Outcome(statuses, max(statuses), self.output(), fired_at is not None)

    def kill(self) -> None:
        send(self.processes(), signal.SIGKILL)
        for n in self.nodes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                n.wait(10)


def metrics_steps(run_dir: Path) -> list[int]:
    import json

    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if '"train/loss"' in line]


def wait_for_step(job: Job, run_dir: Path, step: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ended = [n.returncode for n in job.nodes if n.poll() is not None]
        assert not ended, f"a node ended ({ended}) before step {step}\n{job.output()[-4000:]}"
        if max(metrics_steps(run_dir), default=0) >= step:
            return
        time.sleep(0.02)
    job.kill()
    raise AssertionError(f"step {step} not reached in {timeout} s\n{job.output()[-4000:]}")
