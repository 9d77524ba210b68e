"""Both launch forms of the entry points work, and running the file cannot let segtrain's own
module names shadow a library's (Python puts the script's folder first on sys.path)."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no"]


def run(cmd, cwd=REPO, env=None):
    env = (env or os.environ) | {"PYTHONPATH": str(cwd)}  # this checkout's segtrain, not another install's
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("module, expected", [("train", "--val-protocol"), ("evaluate", "--protocol")])
def test_running_the_file_cannot_shadow_libraries(tmp_path, module, expected):
    """A copy of the package with a poisoned `tqdm.py` in it: the file form still imports the real
    tqdm, because it re-runs itself as `python -m segtrain.X` before importing anything."""
    shutil.copytree(REPO / "segtrain", tmp_path / "segtrain", ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "segtrain" / "tqdm.py").write_text("raise ImportError('segtrain/tqdm.py shadowed the library')\n")
    proc = run([sys.executable, "-X", "utf8", f"segtrain/{module}.py", "--help"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert expected in proc.stdout


@pytest.mark.parametrize("form", [["segtrain/train.py"], ["-m", "segtrain.train"]])
def test_accelerate_launch_file_and_module(form):
    proc = run([*ACCELERATE, *form, "--help"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "--val-protocol" in proc.stdout and "optimizer steps between validations" in proc.stdout


def test_a_user_error_through_the_file_form_is_one_line():
    proc = run([sys.executable, "segtrain/train.py", "--arch", "deeplabv4"])
    assert proc.returncode == 2
    assert proc.stderr.strip() == "segtrain: error: arch: must be one of deeplabv3, deeplabv3plus, got 'deeplabv4'"
