"""Shared, session-scoped test data: a small synthetic VOC and its packed shards."""
from pathlib import Path

import pytest

from segtrain.pack import pack_split
from segtrain.synthetic import generate

NUM_TRAIN, NUM_VAL = 48, 16
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
