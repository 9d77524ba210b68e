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
launcher was signalled first). The ranks agree through the rendezvous store (torch's default
TCPStore, which every rank reached to join the process group: no side group, no other network
setting, and host-only, so never a wait on the accelerator). A rank whose flag is up at the
end of its step k proposes "stop after step k+1" with one ``compare_set`` (the first proposal
wins); every rank reads the key at the end of every step (one ``check``: a round trip to the
store, no collective). Why k+1 is safe: a rank at the end of step k has not started step k+1,
and no rank can finish step k+1 before it (DDP all-reduces every step's gradients), so every
rank reads the key at the end of step k+1 after the proposal was written, and none has read
it there before. So all ranks stop after the same step; the cost is one step between the
signal and the stop, as before. The keys are new per torchrun restart round
(``TORCHELASTIC_RESTART_COUNT``) and per ``StopOnSignal`` of the process (the agent's store
outlives a round); the store's timeout is the run's ``--dist-timeout-min``.

After the stop checkpoint's last barrier the main process writes ``SEGTRAIN_STOP_MARKER``
when that variable names a file (examples/slurm.sh sets it and requeues on it: under
``srun --kill-on-bad-exit`` the job's exit status does not survive a stop on 2+ nodes).
"""
from __future__ import annotations

import os
import itertools
import signal
import threading
import time
from datetime import timedelta
from pathlib import Path
from types import FrameType
from typing import Callable, Optional, Union

import torch.distributed as dist

from segtrain.files import atomic_write_bytes

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
# Set by examples/slurm.sh: the file the main process writes after a stop's checkpoint (requeue on it).
STOP_MARKER_ENV = "SEGTRAIN_STOP_MARKER"
_instances = itertools.count()  # one key per StopOnSignal; every rank makes them in the same order

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

    Call ``should_stop(step)`` at the end of every optimizer step on every rank; ``close()``
    when the loop ends (it restores the previous handlers, so one process can run ``train()``
    again).
    """

    def __init__(self, choice: str, world_size: int, timeout: Optional[timedelta] = None,
                 store: Optional[dist.Store] = None) -> None:
        """``timeout``: the store's (``--dist-timeout-min``); ``store``: the one the ranks agree
        through (default: the process group's rendezvous store)."""
        self.signum: Optional[int] = None
        self.first_at = 0.0  # time.monotonic() of the first signal
        self.stopped = False  # the ranks agreed: stop after this step
        self.stop_step: Optional[int] = None  # the step all ranks stop after, once one proposed it
        self.proposed = False
        # Python takes signals only in the main thread (train() run from another thread: none).
        main_thread = threading.current_thread() is threading.main_thread()
        self.previous = {sig: signal.signal(sig, self._handle) for sig in signals_of(choice) if main_thread}
        self.store: Optional[dist.Store] = None
        self.key = f"segtrain/stop/round{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/{next(_instances)}"
        if world_size > 1 and self.previous:
            self.store = store if store is not None else dist.distributed_c10d._get_default_store()
            if timeout is not None:  # init_process_group was given the same: say it where it is used
                self.store.set_timeout(timeout)

    def _handle(self, signum: int, frame: Optional[FrameType]) -> None:
        now = time.monotonic()
        if self.signum == signum:
            if now - self.first_at > REPEAT_GRACE_S:  # asked again, not a forwarded copy: stop now
                signal.signal(signum, signal.SIG_DFL)
                os.kill(os.getpid(), signum)
            return
        self.signum, self.first_at = signum, now

    def should_stop(self, step: int = 0) -> bool:
        """Whether all ranks stop after ``step`` (the same answer on every rank; call every step)."""
        if self.store is None:
            self.stopped = self.signum is not None
            return self.stopped
        if self.stop_step is None:
            if self.signum is not None and not self.proposed:
                self.proposed = True
                agreed = self.store.compare_set(self.key, "", f"{step + 1}:{self.signum}")
                self._read(agreed)
            elif self.store.check([self.key]):
                self._read(self.store.get(self.key))
        self.stopped = self.stop_step is not None and step >= self.stop_step
        return self.stopped

    def _read(self, value: bytes) -> None:
        stop_step, signum = value.decode().split(":")
        self.stop_step = int(stop_step)
        if self.signum is None:  # another rank's signal: report it as ours
            self.signum = int(signum)

    def close(self) -> None:
        """Restore the handlers."""
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}

    def finish(self, step: int, checkpoint: Union[str, os.PathLike], say: Callable[[str], None],
               is_main: bool) -> Preempted:
        """After the stop checkpoint's last barrier (all ranks): say where the checkpoint
        (RunDir.step_dir(step)) is, write the requeue marker (main process), and return the
        exception ``train()`` raises. Before anything that may block or die at the end (a
        tracker's finish): the line must be out."""
        name = signal.Signals(self.signum).name
        say(f"segtrain: stopped by {name} after step {step}; checkpoint in {checkpoint}; "
            f"exit status {PREEMPTED_EXIT} (continue with --resume auto)")
        marker = os.environ.get(STOP_MARKER_ENV)
        if is_main and marker:
            atomic_write_bytes(Path(marker), f"{checkpoint}\n".encode())
        return Preempted(step, self.signum)
