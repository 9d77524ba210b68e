"""What the processes of one run must agree on, and what each must have of its own.

* ``agree_on_run_name``: the run name (and so RUN_DIR) is rank 0's. The default name has
  the start time in it, read by each process from its own clock: processes that start on
  either side of a second boundary would write to different run folders.
* ``seed_process``: model-independent randomness (dropout masks) differs per process,
  while the weights initialise identically (seeded with the run's seed before).
* ``process_group_timeout``: how long a process waits in a collective (an all-reduce, a
  barrier) for the others before the job is declared hung; see DIST_TIMEOUT_HELP.
* ``local_processes``: the processes of this machine (loader workers share its CPUs).
"""
from __future__ import annotations

import dataclasses
import os
from datetime import timedelta
from collections.abc import Callable
from typing import Any, TypeVar

from accelerate import PartialState
from accelerate.utils import InitProcessGroupKwargs, set_seed

T = TypeVar("T")
Config = TypeVar("Config")  # a segtrain.config.TrainConfig: config.py takes its timeout setting from here,
                            # so this module does not import it


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

    box = [decide() if state.is_main_process else None]
    utils.broadcast_object_list(box, from_process=0)
    return box[0]


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
