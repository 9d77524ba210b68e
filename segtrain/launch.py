"""``accelerate launch`` as ``./launch.sh train`` runs it: the exit code of the training
process, without the launcher's own traceback.

    python -m segtrain.launch [accelerate launch flags] SCRIPT [script args]

Plain ``accelerate launch`` ends every failed run in a Python traceback of its own
(``ChildFailedError`` from torch's elastic agent for several processes, or
``CalledProcessError`` for one) and exits 1 whatever the script's exit status was. Here
the script's own one-line error (printed once, by rank 0: see segtrain/cli.py) is all
that is shown, and the exit status is the failing process's: 2 for a user error, 128+N
when it was killed by signal N (the shell's convention). A process that failed without
a user error gets one line saying which rank ended how.

SIGTERM and SIGUSR1 sent to this launcher (SLURM's srun forwards them to it) go on to the
training processes, which finish their step, save a checkpoint and exit with
``preempt.PREEMPTED_EXIT`` (75, see segtrain/preempt.py); this launcher then exits 75 too.
torch's elastic agent would instead forward only SIGTERM, kill the processes 30 s later
(``TORCH_ELASTIC_SHUTDOWN_TIMEOUT``) and exit 143 whatever they did.
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Optional

from accelerate.commands.config.config_args import load_config_from_file
from accelerate.commands.launch import launch_command, launch_command_parser
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

from segtrain.cli import USER_ERROR_EXIT, no_usable_gpu, user_errors
from segtrain.distributed import JOB_START_ENV, LAUNCHER_ENV, PEER_LOST_EXIT
from segtrain.preempt import PREEMPTED_EXIT

FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def exit_status(code: int) -> int:
    """A process's status as a shell reports it: negative (killed by signal N) -> 128 + N."""
    return 128 - code if code < 0 else code


# What usually sends the signal that killed a training process, said with the rank's death.
LIKELY_CAUSE = {
    signal.SIGKILL: "out of memory? the kernel's OOM killer sends it (dmesg; sacct shows OUT_OF_MEMORY)",
    signal.SIGSEGV: "a crash in native code (a driver, a compiled kernel)",
    signal.SIGBUS: "out of shared memory? (/dev/shm, used by the DataLoader's workers)",
    signal.SIGABRT: "aborted by native code (a failed assertion, NCCL's watchdog)",
}


def describe(rank: int, code: int) -> str:
    if code == PEER_LOST_EXIT:  # no process died on this node: another node's did
        return f"process {rank} lost contact with another process of the job (another node failed?)"
    if code < 0:
        sig = signal.Signals(-code)
        cause = LIKELY_CAUSE.get(sig)
        return f"process {rank} was killed by {sig.name} (signal {-code}{': ' + cause if cause else ''})"
    return f"process {rank} exited with status {code}"


def no_restart_on(codes: tuple[int, ...]) -> None:
    """torchrun ``--max_restarts N`` restarts the group whenever a process fails. A user error
    (exit 2) would fail again in every round, and a clean stop (exit 75) asked the job to end:
    neither spends a restart; the agent stops at once. (Patches the agent's monitor: torch has
    no option for it.)"""
    from torch.distributed.elastic.agent.server.local_elastic_agent import LocalElasticAgent

    monitor = LocalElasticAgent._monitor_workers
    if getattr(monitor, "segtrain", False):
        return

    def monitor_workers(self, worker_group):
        result = monitor(self, worker_group)
        if result.is_failed() and any(f.exitcode in codes for f in result.failures.values()):
            self._remaining_restarts = 0
        return result

    monitor_workers.segtrain = True
    LocalElasticAgent._monitor_workers = monitor_workers


def quiet_elastic_agent() -> None:
    """torch's elastic agent logs each SIGTERM it sends and each failed child; the failing
    process has said what went wrong, and ``main`` sums up anything else in one line."""
    import torch.distributed.run  # noqa: F401  (creates the agent's loggers)

    for name in list(logging.Logger.manager.loggerDict):
        if name.startswith("torch.distributed.elastic"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    # "master_addr is only used for static rdzv_backend": accelerate passes it with every backend.
    logging.getLogger("torch.distributed.run").setLevel(logging.ERROR)


def forward_stop_signals() -> None:
    """Pass SIGTERM/SIGUSR1 on to the training processes (this launcher's children) and keep
    waiting for them; see the module doc. Before any has started, the signal ends the launcher."""
    import psutil

    # torch's agent installs its own handlers for the signals it is told to handle: not these.
    os.environ["PET_SIGNALS_TO_HANDLE"] = "SIGINT,SIGHUP,SIGQUIT"

    def forward(signum: int, frame) -> None:
        children = psutil.Process().children()
        if not children:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        for child in children:
            with contextlib.suppress(psutil.NoSuchProcess):
                child.send_signal(signum)

    for sig in FORWARDED_SIGNALS:
        signal.signal(sig, forward)


def fill_num_processes(args) -> None:
    """A multi-machine GPU config without ``num_processes`` (accelerate_configs/multi_node.yaml):
    every machine's visible GPUs, ``num_machines x torch.cuda.device_count()``. A config with
    ``num_processes: gpu`` on a torch that sees no GPU: one line naming the torch build.

    accelerate refuses a config without it, and its one-machine spelling (``gpu``, torchrun's
    ``--nproc_per_node gpu``) cannot be divided by the machine count. Assumes machines alike.
    """
    if args.config_file is None:
        return
    config = load_config_from_file(args.config_file)
    if config.num_processes == "gpu" and args.num_processes is None:
        import torch

        if not torch.cuda.is_available():  # torchrun would say only "Cuda is not available", in a traceback
            raise no_usable_gpu(f"{args.config_file} starts one process per GPU")
    if args.num_processes is not None:
        return
    machines = args.num_machines or config.num_machines
    if str(config.distributed_type).endswith("MULTI_GPU") and config.num_processes in (-1, None) and machines > 1:
        import torch

        args.num_processes = machines * max(torch.cuda.device_count(), 1)


def first_cause(error: ChildFailedError):
    """(rank, failure) of the process whose end caused the others': a signal death or a user error
    before the processes that then lost their peers or got the agent's SIGTERM (torch orders
    failures only by the time its agent noticed them)."""
    failures = sorted(error.failures.items(), key=lambda rf: (rf[1].timestamp, rf[0]))
    for rank, failure in failures:
        killed = failure.exitcode < 0 and failure.exitcode != -signal.SIGTERM
        if killed or failure.exitcode in (USER_ERROR_EXIT, PREEMPTED_EXIT):
            return rank, failure
    for rank, failure in failures:  # a crash with its traceback before the processes that lost it
        if failure.exitcode not in (PEER_LOST_EXIT, -signal.SIGTERM):
            return rank, failure
    return failures[0]


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = launch_command_parser().parse_args(argv)
    with user_errors():
        fill_num_processes(args)
    quiet_elastic_agent()
    no_restart_on((USER_ERROR_EXIT, PREEMPTED_EXIT))
    # torch >= 2.4's c10d rendezvous keeps one store server for every restart round and its
    # workers key the process group's addresses without the round: a restarted gloo group reads
    # the dead round's ports (connectFullMesh ... Connection refused). Opting out makes the new
    # round's rank 0 host a fresh store (torch's behaviour before 2.4).
    os.environ.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    os.environ[LAUNCHER_ENV] = "1"  # its processes leave naming a dead process to it (peers_lost)
    os.environ.setdefault(JOB_START_ENV, str(time.time()))  # one default run name for every restart round
    forward_stop_signals()
    try:
        launch_command(args)
    except ChildFailedError as e:
        rank, failure = first_cause(e)
        code = failure.exitcode
        # A rank that exits 75 has passed the checkpoint's last barrier: the stop was clean, even if
        # the agent then killed a slower rank before it could exit on its own.
        if any(f.exitcode == PREEMPTED_EXIT for f in e.failures.values()):
            code = PREEMPTED_EXIT
    except subprocess.CalledProcessError as e:  # one process, run by accelerate's simple launcher
        rank, code = 0, e.returncode
    else:
        return
    if code not in (USER_ERROR_EXIT, PREEMPTED_EXIT):  # those processes said why themselves
        print(f"segtrain: {describe(rank, code)}", file=sys.stderr)
    sys.exit(exit_status(code))


def run_and_exit() -> None:
    """``main()``, then exit without the interpreter's teardown: this launcher's processes have
    ended and its work is done, and unloading torch's libraries takes seconds (3.6 s for a bare
    ``import torch`` on the 2-core AMD EPYC), which a stop would add to SLURM's grace time."""
    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if isinstance(e.code, str):  # what the interpreter would print
            print(e.code, file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    run_and_exit()
