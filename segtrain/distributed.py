"""What the processes of one run must agree on, and what each must have of its own.

* ``agree_on_run_name``: the run name (and so RUN_DIR) is rank 0's. The default name has
  the start time in it, read by each process from its own clock: processes that start on
  either side of a second boundary would write to different run folders.
* ``seed_process``: model-independent randomness (dropout masks) differs per process,
  while the weights initialise identically (seeded with the run's seed before).
* ``process_group_timeout``: how long a process waits in a collective (an all-reduce, a
  barrier) for the others before the job is declared hung; see DIST_TIMEOUT_HELP.
* ``local_processes``: the processes of this machine (loader workers share its CPUs).
* ``peers_lost``: a process whose collective failed because another process of the job is
  gone ends quietly; the launcher names the process that died and why (segtrain/launch.py).
* ``decided_by_main``: an error while the main process decides reaches every process.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import pickle
import sys
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any, TypeVar

from accelerate import PartialState
from accelerate.utils import InitProcessGroupKwargs, set_seed

from segtrain.cli import USER_ERRORS

T = TypeVar("T")
Config = TypeVar("Config")  # a segtrain.config.TrainConfig: config.py takes its timeout setting from here,
                            # so this module does not import it

# Set by segtrain.launch for its training processes: it reports a dead process itself.
LAUNCHER_ENV = "SEGTRAIN_LAUNCHER"
JOB_START_ENV = "SEGTRAIN_JOB_START"  # set by segtrain.launch: see job_start
PEER_LOST_EXIT = 3  # this process stopped because another process of the job failed or is gone

# Why 60 minutes: the slowest legitimate wait in a collective is a rank that finishes its
# share of validation while another still runs its own (the forward passes run on the
# unwrapped model, so nothing synchronises until the confusion matrices are summed), or
# the main process alone hashing shards or writing best.pt. The longest validation
# segtrain runs is ms-flip on Cityscapes val: 500 images of 1024x2048, 6 scales (0.5..1.75)
# x 2 flips = 2 x sum(s^2) = 17.4 full-size forward passes per image. DeepLabV3+ R50 at
# OS16 is ~180 GFLOP per 512x512, so ~1.4 TFLOP at 1024x2048 and ~25 TFLOP per image. On
# a T4 (the slowest GPU the CUDA 13 wheel still runs: sm75), ~5 TFLOP/s achieved in fp32
# gives ~5 s per image: the smallest split (2 ranks, 250 images each) takes ~21 minutes,
# and accelerate's NCCL default (10 minutes) would kill a run whose ranks drift by half of
# that. 60 minutes covers the whole per-rank validation about 3 times over; a real hang
# then costs an hour of idle GPUs instead of ten minutes, the price of never killing a
# healthy run.
DIST_TIMEOUT_MIN = 60
DIST_TIMEOUT_HELP = ("minutes a process waits in a collective (all-reduce, barrier) for the others before the "
                     "job fails as hung; the default fits an ms-flip validation of Cityscapes val on a T4 in fp32 "
                     "(~21 min per rank of 2; arithmetic in segtrain/distributed.py)")


def process_group_timeout(minutes: float) -> timedelta:
    """The ``timeout`` for ``PartialState`` / ``init_process_group`` (both NCCL and gloo)."""
    return timedelta(minutes=minutes)


def process_group_kwargs(minutes: float = DIST_TIMEOUT_MIN) -> InitProcessGroupKwargs:
    """The same timeout for an ``Accelerator(kwargs_handlers=[...])`` made without a PartialState first."""
    return InitProcessGroupKwargs(timeout=process_group_timeout(minutes))


def decided_by_main(decide: Callable[[], T], state: Any = None) -> T:
    """``decide()`` on the main process only, its result on every process (a collective: call on
    all). ``state``: anything with ``num_processes`` and ``is_main_process`` (default PartialState)."""
    state = state if state is not None else PartialState()
    if state.num_processes == 1:
        return decide()
    from accelerate import utils  # looked up at call time: tests replace broadcast_object_list

    box: list[Any] = [None]
    if state.is_main_process:
        try:
            box = [("ok", decide())]
        except Exception as e:  # the others would wait in the broadcast until the collective timeout
            box = [("error", e if picklable(e) else RuntimeError(f"{type(e).__name__}: {e}"))]
            utils.broadcast_object_list(box, from_process=0)
            raise
    utils.broadcast_object_list(box, from_process=0)
    kind, value = box[0]
    if kind == "error":
        raise main_failed(value)
    return value


def picklable(error: BaseException) -> bool:
    try:
        pickle.loads(pickle.dumps(error))
        return True
    except Exception:
        return False


def main_failed(error: BaseException) -> BaseException:
    """On a process other than the main one: the main process's error, re-raised here. A user
    error keeps its type (one line, printed once by rank 0, exit 2 on every process); anything
    else ends this process quietly with PEER_LOST_EXIT (the main process shows the traceback)."""
    if isinstance(error, USER_ERRORS):
        return error
    return SystemExit(PEER_LOST_EXIT)  # quietly: rank 0's traceback says it, its status is the job's


def job_start() -> float:
    """When this job started (seconds since the epoch): segtrain.launch's clock, the same for
    every restart round of torchrun's --max_restarts, so the default run name (which has the
    start time) and RUN_DIR stay the run's and --resume auto finds its checkpoints; now when run
    without it."""
    return float(os.environ.get(JOB_START_ENV) or time.time())


def agree_on_run_name(cfg: Config) -> Config:
    """``cfg`` (a TrainConfig) with rank 0's ``name`` and ``run_dir`` on every process (a collective:
    call on all)."""
    name, run_dir = decided_by_main(lambda: (cfg.name, cfg.run_dir))
    return dataclasses.replace(cfg, name=name, run_dir=run_dir)


def seed_process(seed: int) -> None:
    """Seed this process's global RNGs (dropout masks, anything not seeded on its own) with
    ``seed + rank``: identical masks on every rank would make the data-parallel batch one
    small batch repeated. Call after building the model (its init is seeded with ``seed`` alone);
    a resume then restores each process's own RNG states from its checkpoint."""
    set_seed(seed, device_specific=True)


def local_processes() -> int:
    """Processes of this run on this machine (torchrun's LOCAL_WORLD_SIZE; 1 without a launcher)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity: a SLURM/cgroup/taskset limit), not the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


# What gloo and NCCL say when a peer's connection is gone (they raise plain RuntimeErrors).
PEER_LOST_MESSAGES = ("Connection reset by peer", "Connection closed by peer", "Broken pipe",
                      "Connection refused", "NCCL communicator was aborted", "remote process exited")


@contextlib.contextmanager
def peers_lost() -> Iterator[None]:
    """Under segtrain.launch with several processes: a collective that failed because another
    process died ends this one with PEER_LOST_EXIT and one short line instead of a traceback
    per survivor; the launcher's line names the process that died, its signal and the likely
    cause. Elsewhere (torchrun, plain accelerate launch) the error keeps its traceback."""
    try:
        yield
    except RuntimeError as e:  # torch.distributed.DistBackendError is one
        quiet = os.environ.get(LAUNCHER_ENV) == "1" and int(os.environ.get("WORLD_SIZE", "1")) > 1
        if not quiet or not any(m in str(e) for m in PEER_LOST_MESSAGES):
            raise
        sys.exit(PEER_LOST_EXIT)
