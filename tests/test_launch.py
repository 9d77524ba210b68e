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


def poisoned_copy(tmp_path: Path) -> Path:
    """A copy of the package with a `tqdm.py` in it that fails on import: the file form must
    still import the real tqdm, because it swaps segtrain/ for the repository root on sys.path
    before importing anything."""
    shutil.copytree(REPO / "segtrain", tmp_path / "segtrain", ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "segtrain" / "tqdm.py").write_text("raise ImportError('segtrain/tqdm.py shadowed the library')\n")
    return tmp_path


def test_a_user_error_through_the_file_form_is_one_line_and_no_module_shadows_a_library(tmp_path):
    """train.py run as a file from the poisoned copy: it imports tqdm before parsing (a shadowed
    one would end in an ImportError traceback, exit 1), then the user error is one line, exit 2."""
    proc = run([sys.executable, "-X", "utf8", "segtrain/train.py", "--arch", "deeplabv4"], cwd=poisoned_copy(tmp_path))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip() == "segtrain: error: arch: must be one of deeplabv3, deeplabv3plus, got 'deeplabv4'"


def test_accelerate_launch_of_the_file_form_cannot_shadow_libraries(tmp_path):
    """`accelerate launch segtrain/evaluate.py` (the launcher runs the file) from the poisoned copy."""
    proc = run([*ACCELERATE, "segtrain/evaluate.py", "--help"], cwd=poisoned_copy(tmp_path))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "--protocol" in proc.stdout and "--confusion-matrix" in proc.stdout


def test_accelerate_launch_of_the_module_form():
    proc = run([*ACCELERATE, "-m", "segtrain.train", "--help"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "--val-protocol" in proc.stdout and "optimizer steps between validations" in proc.stdout


def launched_processes(monkeypatch, gpus, *flags):
    """(processes per machine, total) that `accelerate launch FLAGS segtrain/train.py` starts on a
    machine where torch sees ``gpus`` GPUs: accelerate's own argument resolution, then torchrun's
    count of its --nproc_per_node, with the CUDA probes monkeypatched."""
    import torch
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env
    from torch.distributed.run import determine_local_world_size

    from segtrain.launch import fill_num_processes

    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    args = launch_command_parser().parse_args([*flags, "--main_process_port", "0", "segtrain/train.py"])
    fill_num_processes(args)  # what python -m segtrain.launch (./launch.sh train) adds
    args, _, _ = _validate_launch_command(args)
    assert args.multi_gpu
    prepare_multi_gpu_env(args)
    per_machine = determine_local_world_size(args.nproc_per_node)
    return per_machine, per_machine * int(args.num_machines)


@pytest.mark.parametrize("gpus", [1, 2, 8])
def test_multi_gpu_config_uses_every_visible_gpu(monkeypatch, gpus):
    config = str(REPO / "accelerate_configs" / "multi_gpu.yaml")
    assert launched_processes(monkeypatch, gpus, "--config_file", config) == (gpus, gpus)


def test_num_processes_still_overrides_the_gpu_count(monkeypatch):
    """./launch.sh train --gpus 4 passes --num_processes 4 with the same config."""
    config = str(REPO / "accelerate_configs" / "multi_gpu.yaml")
    assert launched_processes(monkeypatch, 8, "--config_file", config, "--num_processes", "4") == (4, 4)


def test_multi_gpu_config_without_cuda_fails_at_launch(monkeypatch):
    """One line naming the torch build (torchrun alone would say "Cuda is not available" in a traceback)."""
    from segtrain.cli import NoUsableGPU

    with pytest.raises(NoUsableGPU, match=r"multi_gpu.yaml starts one process per GPU\); torch "):
        launched_processes(monkeypatch, 0, "--config_file", str(REPO / "accelerate_configs" / "multi_gpu.yaml"))


def test_multi_node_config_counts_every_machines_gpus(monkeypatch):
    config = str(REPO / "accelerate_configs" / "multi_node.yaml")
    assert launched_processes(monkeypatch, 4, "--config_file", config) == (4, 8)
    assert launched_processes(monkeypatch, 4, "--config_file", config, "--num_processes", "4") == (2, 4)


def test_launch_sh_gpus_flag_passes_num_processes():
    text = (REPO / "launch.sh").read_text()
    assert '--gpus) acc=(--config_file "$ROOT/accelerate_configs/multi_gpu.yaml" --num_processes "$2")' in text
