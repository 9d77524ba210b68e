"""Shared test data (a small synthetic VOC and its shards) and shared test tools."""
import functools
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

# GNU OpenMP's threads spin while they wait for work: on a machine whose cores are all busy (loader
# workers, launched processes, other jobs) a spinning thread holds the core its peer needs, and a
# resnet18 forward takes seconds instead of a tenth of one. Passive waiting gives the same numbers
# (the thread count is unchanged). Set before torch loads its OpenMP runtime; launched processes
# inherit it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import torch  # noqa: E402
from torch import nn

from segtrain import hardware
from segtrain.pack import pack_split
from segtrain.synthetic import generate

NUM_TRAIN, NUM_VAL = 48, 16

# pytest-xdist (setup.cfg: one worker per core, whole files per worker): the workers share the
# cores, so each process, and every process a test starts, gets its share of them. Two OpenMP
# pools spinning on the same core make a forward pass many times slower (bench/gpu_check.py).
XDIST_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if XDIST_WORKERS > 1:
    _threads = max(1, (os.cpu_count() or 1) // XDIST_WORKERS)
    torch.set_num_threads(_threads)
    os.environ["OMP_NUM_THREADS"] = str(_threads)

# The files that launch processes, slowest first: xdist hands whole files to workers in the order
# collected, so the long ones start first and the short ones fill in around them.
SLOWEST_FILES = ("test_multinode.py", "test_trackers.py", "test_train.py", "test_gpu_check.py", "test_remote.py",
                 "test_reliability.py", "test_evaluate.py", "test_sam.py", "test_launch.py", "test_cli.py")


def pytest_collection_modifyitems(items: list) -> None:
    rank = {name: i for i, name in enumerate(SLOWEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(SLOWEST_FILES)))  # stable: in-file order kept


@pytest.fixture(autouse=True, scope="session")
def no_autotune(tmp_path_factory):
    """Tests never time candidate settings (figures vary with load): --mixed-precision auto falls
    back to the flag rule, and nothing reads or writes the user's real cache (tests/test_autotune.py
    turns the measurement back on with the timing function replaced). Session-wide, so that
    module-scoped fixtures that train (set up before any function-scoped fixture) get it too."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SEGTRAIN_NO_AUTOTUNE", "1")
        patch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("cache")))
        yield
SHARD_SIZE = 10  # 48 train -> shards of 10, 10, 10, 10, 8; 16 val -> 10, 6


@pytest.fixture(scope="session")
def synthetic_voc(tmp_path_factory) -> Path:
    """The VOC2012 root of a synthetic VOC: 48 train / 16 val images of 64-128 px, seed 0."""
    return generate(tmp_path_factory.mktemp("synthetic_voc"), NUM_TRAIN, NUM_VAL, seed=0,
                    min_size=64, max_size=128)


@pytest.fixture(scope="session")
def packed_shards(synthetic_voc, tmp_path_factory) -> dict:
    """``synthetic_voc`` packed with 10 samples per shard (uneven last shards).

    Returns ``{"dir": Path, "train": manifest Path, "val": manifest Path}``.
    """
    out = tmp_path_factory.mktemp("shards")
    paths = {"dir": out}
    for split in ("train", "val"):
        pack_split(synthetic_voc, split, out, shard_size=SHARD_SIZE, progress=False)
        paths[split] = out / f"voc-{split}.json"
    return paths


REPO = Path(__file__).resolve().parents[1]

# The precision of the shared trained run: bf16 where this CPU computes it natively (its kernels
# differ between memory layouts, which the evaluation must reproduce), fp32 where bf16 would be
# emulated (AVX2-only CPUs: several times slower, and never what a user runs there).
RUN_PRECISION = "bf16" if hardware.cpu_bf16_native()[0] else "fp32"
# The flags of the one shared trained run (``trained_run``): 6 steps of a resnet18, validated and
# checkpointed at steps 3 and 6; RUN_PRECISION with channels_last, so that evaluating its best.pt
# proves the evaluation takes the run's precision and memory format.
TRAINED_RUN_FLAGS = ("--backbone", "resnet18", "--pretrained", "false", "--crop-size", "65", "--batch-size", "4",
                     "--iterations", "6", "--workers", "1", "--lr-schedule", "step", "--step-size", "2",
                     "--step-gamma", "0.5", "--log-every", "1", "--checkpoint-every", "3", "--val-every", "3",
                     "--seed", "7", "--mixed-precision", RUN_PRECISION, "--channels-last", "true", "--val-protocol", "whole")


@pytest.fixture(scope="session")
def trained_run(packed_shards, tmp_path_factory):
    """ONE short training run for every test that needs a trained run (train's outputs, resume,
    report, evaluate): ``(run_dir, TrainResult)``. Loss ce, in a folder named ``ce``; tracker
    wandb in offline mode (no key, no network), so its run files can be decoded too. Tests copy
    what they change: the run itself stays as it was written."""
    from segtrain.config import parse_config
    from segtrain.train import train

    run_dir = tmp_path_factory.mktemp("trained_run") / "ce"
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, "environ", env | {"NETRC": str(run_dir.parent / "no-netrc")})
        result = train(parse_config(["--data", str(packed_shards["train"]), "--run-dir", str(run_dir),
                                     *TRAINED_RUN_FLAGS, "--tracker", "wandb"]))
    return run_dir, result


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def launch_ddp():
    """``launch_ddp(script, *args)`` runs ``script`` in 2 real DDP processes on the CPU (gloo).

    The recipe from FIELD_NOTES.md: ``--multi_gpu`` with ACCELERATE_USE_CPU=1 (``--cpu``
    or MULTI_CPU would start one process). Returns the CompletedProcess.
    """
    def run(script, *args, timeout: int = 600, cwd=REPO) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(_free_port()), str(script), *map(str, args)]
        env = os.environ | {"ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=cwd)
    return run


def _forked_rank(function, args) -> None:
    """In each process ``debug_launch`` forks: look like a process ``accelerate launch`` started."""
    import torch.distributed as dist
    from accelerate.state import AcceleratorState, GradientState, PartialState

    # GNU OpenMP cannot use the parent's thread pool after a fork (the first parallel op hangs):
    # one thread per process, as launch_ddp's OMP_NUM_THREADS=1 gives.
    torch.set_num_threads(1)
    rank, world = dist.get_rank(), dist.get_world_size()
    # Segtrain reads these as torchrun sets them (the first process prints user errors, only
    # LOCAL_RANK 0 hashes shards); accelerate's debug mode sets WORLD_SIZE only.
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world), OMP_NUM_THREADS="1")
    # The pytest process's single-process Accelerate state was copied by the fork: start afresh.
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    function(*args)


@pytest.fixture(scope="session")
def debug_launch():
    """``debug_launch(function, *args, processes=2)`` runs ``function(*args)`` in ``processes``
    processes forked from this one, joined in one gloo group: accelerate's ``debug_launcher`` (its
    own tests' pattern). For the checks where the launcher is not under test: no fresh interpreter
    importing torch, no port.
    Every process runs with one CPU thread (see ``_forked_rank``); an exception in either is
    raised here with that process's traceback."""
    from accelerate import debug_launcher

    def run(function, *args, processes: int = 2) -> None:
        debug_launcher(functools.partial(_forked_rank, function, args), num_processes=processes)
    return run


def randomize_batchnorm(model: nn.Module, seed: int = 0) -> None:
    """Non-trivial BN statistics and affine terms, so a mis-mapped or mis-loaded BatchNorm
    changes the outputs (test files import it: ``from conftest import randomize_batchnorm``)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
