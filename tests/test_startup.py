"""Time to first step: what a training process does not pay for (bench/startup_bench.py times it)."""
import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from segtrain.files import atomic_link

REPO = Path(__file__).resolve().parents[1]


def test_training_imports_nothing_a_run_does_not_use():
    """wandb (timm imports it when installed: ~380 modules), plotting and SAM stay out of a training
    process until something uses them, and both timm's utilities and wandb still import after."""
    code = ("import json, sys, segtrain.train\n"
            "loaded = [m for m in ('wandb', 'matplotlib', 'segment_anything') if m in sys.modules]\n"
            "import timm.utils, wandb\n"
            "print(json.dumps([loaded, wandb.__name__]))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=os.environ | {"PYTHONPATH": str(REPO)},
                         capture_output=True, text=True, check=True).stdout
    assert json.loads(out) == [[], "wandb"]


def test_atomic_link_names_the_same_file_and_replaces_the_old(tmp_path):
    best, final = tmp_path / "best.pt", tmp_path / "final.pt"
    best.write_bytes(b"weights at step 6")
    final.write_bytes(b"an older final.pt")
    assert atomic_link(best, final)
    assert final.read_bytes() == b"weights at step 6" and os.path.samefile(best, final)
    assert atomic_link(best, final)  # already one file: rename() keeps both names, the temp name goes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "final.pt"]


def test_atomic_link_without_hard_links_changes_nothing(tmp_path, monkeypatch):
    best, final = tmp_path / "best.pt", tmp_path / "final.pt"
    best.write_bytes(b"new")
    final.write_bytes(b"old")

    def no_hard_links(source, target):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", no_hard_links)
    assert not atomic_link(best, final)
    assert final.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "final.pt"]
