"""What every command-line entry point shares: one error prefix, one exit code for user
errors, and the launch check.

    def main(argv=None):
        with user_errors():
            ...

A user error (bad config, bad data, wrong checkpoint, a launch that is not connected)
prints ``segtrain: error: <one line>`` on standard error and exits with status 2, no
traceback. Anything else is a bug and keeps its traceback.

Under ``accelerate launch`` every process runs the same command, so an error that comes
from the command line, the config or the shared data is raised by all of them: only the
first process (global rank 0) prints it, the others exit 2 silently. An error that belongs
to one process alone (a corrupt sample in its share of the data) is marked with
``rank_specific`` and printed by that process, tagged with its rank.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from collections.abc import Iterator
from typing import Optional

from segtrain.files import ConfigError, DataError

USER_ERROR_EXIT = 2


class DisconnectedLaunch(RuntimeError):
    """Several processes were started but Accelerate did not join them into one group."""


class NoUsableGPU(RuntimeError):
    """A GPU launch was asked for, but this torch cannot use a GPU."""


class OtherProcessFailed(RuntimeError):
    """Raised on the healthy processes of a distributed job when another one failed."""


USER_ERRORS = (ConfigError, DataError, FileNotFoundError, DisconnectedLaunch, NoUsableGPU, OtherProcessFailed)


def one_line(error: BaseException) -> str:
    """The message of an error, minus what a DataLoader worker wraps around it."""
    text = str(error).strip()
    if "Original Traceback" in text:  # re-raised from a worker: the real message is the last line
        last = text.splitlines()[-1]
        kind, sep, message = last.partition(": ")
        text = message if sep and kind.endswith(("Error", "Exception")) else last
    return text.splitlines()[0] if text else type(error).__name__


def process_rank() -> int:
    """This process's global rank as the launcher set it (0 when run alone).

    Read from the environment, so it is known before (and after) the process group exists.
    """
    return int(os.environ.get("RANK", "0"))


def rank_specific(error: BaseException, rank: int) -> BaseException:
    """Mark ``error`` as this process's own (not shared by the others): ``fail`` prints it
    on every rank, tagged ``process RANK``. Returns ``error``, for ``raise rank_specific(e, r)``."""
    error.segtrain_rank = rank  # type: ignore[attr-defined]
    return error


@contextlib.contextmanager
def errors_of_rank(rank: int) -> Iterator[None]:
    """Mark the user errors raised inside as this process's own (see ``rank_specific``)."""
    try:
        yield
    except USER_ERRORS as e:
        raise rank_specific(e, rank)


def fail(error: BaseException) -> None:
    """Print a user error as one line (once per job) and exit with USER_ERROR_EXIT."""
    own_rank = getattr(error, "segtrain_rank", None)
    if own_rank is not None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        print(f"segtrain: error: process {own_rank}: {one_line(error)}", file=sys.stderr)
    elif process_rank() == 0:
        print(f"segtrain: error: {one_line(error)}", file=sys.stderr)
    else:
        leave_the_saying_to_the_first_process()
    sys.exit(USER_ERROR_EXIT)


# An error every process raises is said by process 0 alone; the others exit silently. Were one to
# exit first, the launcher would end the job (SIGTERM) before process 0 had printed, and the run
# would fail with no line at all (seen under load). Process 0 meets the same error within moments.
SILENT_EXIT_DELAY_S = 3.0


def leave_the_saying_to_the_first_process() -> None:
    """A silent process's exit, after process 0 has had time to print the shared error."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.stderr.flush()
        time.sleep(SILENT_EXIT_DELAY_S)


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors are user errors like the others: one line with the
    segtrain prefix, printed by the first process only, exit 2."""

    def error(self, message: str):  # type: ignore[override]
        if process_rank() == 0:
            print(f"segtrain: error: {message} (see {self.prog} --help)", file=sys.stderr)
        else:
            leave_the_saying_to_the_first_process()
        self.exit(USER_ERROR_EXIT)


@contextlib.contextmanager
def user_errors(*extra: type[BaseException]) -> Iterator[None]:
    """Turn the user errors (and ``extra`` types) raised inside into one line + exit 2."""
    try:
        yield
    except USER_ERRORS + extra as e:
        fail(e)


def gpu_launch_reason() -> Optional[str]:
    """Why this process was meant to run on a GPU, or None: accelerate's multi-GPU launcher
    (torchrun: LOCAL_RANK) started it without ACCELERATE_USE_CPU. A one-process launch
    (single_gpu.yaml, which sets CUDA_VISIBLE_DEVICES=0) may run on the CPU by design."""
    use_cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    if "LOCAL_RANK" in os.environ and not use_cpu:
        return "accelerate launch started it as a multi-GPU process"
    return None


def no_usable_gpu(reason: str) -> NoUsableGPU:
    """The one-line error for a GPU run on a torch that cannot use CUDA: the build and the likely cause."""
    import torch

    build = f"torch {torch.__version__}"
    if torch.version.cuda is None:
        cause = f"{build} is a CPU-only build; install a CUDA build of torch"
    else:
        cause = (f"{build} is built for CUDA {torch.version.cuda} but sees no usable GPU; most likely the NVIDIA "
                 f"driver is older than CUDA {torch.version.cuda} needs (nvidia-smi shows the CUDA version the "
                 "driver supports): update the driver or install a torch wheel for the driver's CUDA")
    return NoUsableGPU(f"a GPU run was asked for ({reason}); {cause}; to run on the CPU instead, "
                       "set ACCELERATE_USE_CPU=1 (./launch.sh train --cpu-procs N)")


def check_gpu_launch() -> None:
    """A GPU launch on a torch that cannot use CUDA is an error, not a silent CPU run."""
    import torch

    reason = gpu_launch_reason()
    if reason is not None and not torch.cuda.is_available():
        raise no_usable_gpu(reason)


def check_launch(num_processes: int) -> None:
    """Refuse a GPU launch without a usable GPU (``check_gpu_launch``), and to run as N
    unconnected copies of a one-process job.

    ``accelerate launch --multi_gpu`` on a machine without GPUs starts the processes
    but, unless ACCELERATE_USE_CPU=1 is set, each one runs alone: every copy would
    train or evaluate on all the data and write the same files.
    """
    check_gpu_launch()
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and num_processes != launched:
        raise DisconnectedLaunch(
            f"{launched} processes were launched but they are not connected (Accelerate sees "
            f"{num_processes}). On CPU, set ACCELERATE_USE_CPU=1 (./launch.sh train "
            "--cpu-procs N does); see accelerate_configs/cpu_ddp.yaml")
