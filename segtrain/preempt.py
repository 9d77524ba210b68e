"""Stopping cleanly on a signal: a cluster's time limit or preemption costs no training step.

SLURM (``#SBATCH --signal=B:USR1@120``, or the SIGTERM of a preemption), torchrun and
``segtrain.launch`` ask a job to end with a signal. With ``--stop-signals`` (default
SIGTERM and SIGUSR1), the first such signal only raises a flag: every rank finishes the
optimizer step it is in, the ranks agree to stop after the same step, the run saves a
training checkpoint (atomically, as every checkpoint) and ``train()`` exits with
``PREEMPTED_EXIT`` (75, ``EX_TEMPFAIL``: "try again"). ``--resume auto`` continues from
that checkpoint; ``examples/slurm.sh`` requeues the job on this status. A second signal
of the same kind ends the process at once (the signal's default action), unless it comes
within ``REPEAT_GRACE_S`` of the first: on preemption SLURM signals every process of the
step and the launchers forward their own copy, so one request arrives several times.

Agreement: the signal may reach only some ranks (``kill`` of one process, a node whose
launcher was signalled first). Every step, each rank contributes its flag to one MAX
all-reduce on a gloo (CPU) process group of its own, issued asynchronously and read one
step later: the flag is a host tensor, so this never waits for the accelerator (no
host-device sync per step), and by the time it is read, a whole step later, it has long
arrived. All ranks read the result of the same collective, so all stop after the same
step; the cost is one step between the signal and the stop.
"""
from __future__ import annotations

import os
import signal
import threading
import time
from types import FrameType
from typing import Callable, Optional, Union

import torch
import torch.distributed as dist

PREEMPTED_EXIT = 75  # EX_TEMPFAIL (sysexits.h): stopped by a signal after saving a checkpoint; rerun to continue
# Copies of one request (SLURM's own + forwarded by sbatch's shell, srun, segtrain.launch) arrive
# within milliseconds; a person pressing Ctrl-C/kill again to force the stop takes longer.
REPEAT_GRACE_S = 3.0

STOP_SIGNALS = {
    "TERM+USR1": "SIGTERM and SIGUSR1 stop after the current step with a checkpoint (exit 75)",
    "TERM": "only SIGTERM",
    "USR1": "only SIGUSR1 (SIGTERM kills at once)",
    "none": "signals keep their default action (the process dies at once)",
}
STOP_HELP = "signals that stop training cleanly with a checkpoint and exit status 75"


def signals_of(choice: str) -> tuple[signal.Signals, ...]:
    return () if choice == "none" else tuple(signal.Signals[f"SIG{name}"] for name in choice.split("+"))


class Preempted(SystemExit):
    """Raised by ``train()`` after the checkpoint of a clean stop; exits with ``PREEMPTED_EXIT``."""

    def __init__(self, step: int, signum: int) -> None:
        super().__init__(PREEMPTED_EXIT)
        self.step, self.signum = step, signum


class StopOnSignal:
    """The flag the signal handlers raise, and the agreement of all ranks on it (module doc).

    Call ``should_stop()`` once per optimizer step on every rank; ``close()`` when the loop
    ends (it restores the previous handlers, so one process can run ``train()`` again).
    """

    def __init__(self, choice: str, world_size: int) -> None:
        self.signum: Optional[int] = None
        self.first_at = 0.0  # time.monotonic() of the first signal
        self.stopped = False  # the ranks agreed: stop after this step
        # Python takes signals only in the main thread (train() run from another thread: none).
        main_thread = threading.current_thread() is threading.main_thread()
        self.previous = {sig: signal.signal(sig, self._handle) for sig in signals_of(choice) if main_thread}
        # Its own gloo group: host tensors, whatever the training backend (NCCL on GPUs).
        self.group = dist.new_group(backend="gloo") if world_size > 1 and self.previous else None
        self.pending: Optional[tuple[dist.Work, torch.Tensor]] = None

    def _handle(self, signum: int, frame: Optional[FrameType]) -> None:
        now = time.monotonic()
        if self.signum == signum:
            if now - self.first_at > REPEAT_GRACE_S:  # asked again, not a forwarded copy: stop now
                signal.signal(signum, signal.SIG_DFL)
                os.kill(os.getpid(), signum)
            return
        self.signum, self.first_at = signum, now

    def should_stop(self) -> bool:
        """Whether all ranks stop after this step (the same answer on every rank)."""
        if self.group is None:
            self.stopped = self.signum is not None
            return self.stopped
        self.stopped = self._collect()
        flag = torch.tensor([0 if self.signum is None else self.signum], dtype=torch.int32)
        self.pending = (dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group, async_op=True), flag)
        return self.stopped

    def _collect(self) -> bool:
        if self.pending is None:
            return False
        work, flag = self.pending
        work.wait()
        self.pending = None
        if flag.item() and self.signum is None:  # another rank's signal: report it as ours
            self.signum = int(flag.item())
        return bool(flag.item())

    def close(self) -> None:
        """Complete the last collective (every rank issued the same ones) and restore the handlers."""
        self._collect()
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}

    def exit(self, step: int, checkpoint: Union[str, os.PathLike], say: Callable[[str], None]) -> Preempted:
        """The exception ``train()`` raises after a stop (all ranks), having said where the checkpoint
        (RunDir.step_dir(step)) is."""
        name = signal.Signals(self.signum).name
        say(f"segtrain: stopped by {name} after step {step}; checkpoint in {checkpoint}; "
            f"exit status {PREEMPTED_EXIT} (continue with --resume auto)")
        return Preempted(step, self.signum)
