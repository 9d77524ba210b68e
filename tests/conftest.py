"""Shared test data (a small synthetic VOC and its shards) and shared test tools."""
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from segtrain.pack import pack_split
from segtrain.synthetic import generate

NUM_TRAIN, NUM_VAL = 48, 16


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
