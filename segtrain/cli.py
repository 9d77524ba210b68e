"""What every command-line entry point shares: one error prefix, one exit code for user
errors, and the launch check.

    def main(argv=None):
        with user_errors():
            ...

A user error (bad config, bad data, wrong checkpoint, a launch that is not connected)
prints ``segtrain: error: <one line>`` on standard error and exits with status 2, no
traceback. Anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator

from segtrain.io import ConfigError, DataError

USER_ERROR_EXIT = 2


class DisconnectedLaunch(RuntimeError):
    """Several processes were started but Accelerate did not join them into one group."""


class OtherProcessFailed(RuntimeError):
    """Raised on the healthy processes of a distributed job when another one failed."""


USER_ERRORS = (ConfigError, DataError, FileNotFoundError, DisconnectedLaunch, OtherProcessFailed)


def one_line(error: BaseException) -> str:
    """The message of an error, minus what a DataLoader worker wraps around it."""
    text = str(error).strip()
    if "Original Traceback" in text:  # re-raised from a worker: the real message is the last line
        last = text.splitlines()[-1]
        kind, sep, message = last.partition(": ")
        text = message if sep and kind.endswith(("Error", "Exception")) else last
    return text.splitlines()[0] if text else type(error).__name__


def fail(error: BaseException) -> None:
    """Print a user error as one line and exit with USER_ERROR_EXIT."""
    print(f"segtrain: error: {one_line(error)}", file=sys.stderr)
    sys.exit(USER_ERROR_EXIT)


@contextlib.contextmanager
def user_errors(*extra: type[BaseException]) -> Iterator[None]:
    """Turn the user errors (and ``extra`` types) raised inside into one line + exit 2."""
    try:
        yield
    except USER_ERRORS + extra as e:
        fail(e)


def check_launch(num_processes: int) -> None:
    """Refuse to run as N unconnected copies of a one-process job.

    ``accelerate launch --multi_gpu`` on a machine without GPUs starts the processes
    but, unless ACCELERATE_USE_CPU=1 is set, each one runs alone: every copy would
    train or evaluate on all the data and write the same files.
    """
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and num_processes != launched:
        raise DisconnectedLaunch(
            f"{launched} processes were launched but they are not connected (Accelerate sees "
            f"{num_processes}). On CPU, set ACCELERATE_USE_CPU=1 (./launch.sh train "
            "--cpu-procs N does); see accelerate_configs/cpu_ddp.yaml")
