"""launch.sh and segtrain.launch: caller-relative paths, the training process's exit status,
user errors printed once per job (not once per process), no launcher traceback."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from segtrain.cli import ArgumentParser, fail, rank_specific
from segtrain.files import DataError

REPO = Path(__file__).resolve().parents[1]


def run_launch_sh(*args, cwd, port: int = 0, timeout: int = 300) -> subprocess.CompletedProcess:
    env = os.environ | {"OMP_NUM_THREADS": "1"} | ({"PORT": str(port)} if port else {})
    return subprocess.run([str(REPO / "launch.sh"), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    return [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]


@pytest.mark.parametrize("rank, tagged, printed", [
    ("0", False, "segtrain: error: data: bad\n"),
    ("1", False, ""),  # every process raised it: rank 0 says it
    ("1", True, "segtrain: error: process 1: data: bad\n"),  # only this process knows it
])
def test_a_user_error_is_printed_by_the_first_process_or_the_one_that_had_it(monkeypatch, capsys, rank,
                                                                             tagged, printed):
    monkeypatch.setenv("RANK", rank)
    monkeypatch.setenv("WORLD_SIZE", "2")
    error = DataError("data: bad")
    with pytest.raises(SystemExit) as info:
        fail(rank_specific(error, int(rank)) if tagged else error)
    assert info.value.code == 2
    assert capsys.readouterr().err == printed


@pytest.mark.parametrize("rank, printed", [("0", True), ("1", False)])
def test_usage_errors_are_one_line_from_the_first_process(monkeypatch, capsys, rank, printed):
    monkeypatch.setenv("RANK", rank)
    parser = ArgumentParser(prog="python -m segtrain.x")
    with pytest.raises(SystemExit) as info:
        parser.parse_args(["--bogus"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    expected = "segtrain: error: unrecognized arguments: --bogus (see python -m segtrain.x --help)\n"
    assert err == (expected if printed else "")


def test_launch_sh_resolves_paths_against_the_callers_folder(packed_shards, tmp_path):
    """From another folder, --data shards/voc-train.json is the CALLER's shards/voc-train.json
    (the repository has none). --num-classes 3 stops the run right after reading that manifest."""
    shutil.copytree(packed_shards["dir"], tmp_path / "shards")
    assert not (REPO / "shards" / "voc-train.json").exists()
    proc = run_launch_sh("train", "--data", "shards/voc-train.json", "--run-dir", "run", "--num-classes", "3",
                         cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert error_lines(proc) == [
        "segtrain: error: num_classes: 3, but the labels of shards/voc-train.json have 21 classes "
        "(voc: background, aeroplane, bicycle, bird, boat, ...); drop --num-classes to take it from the data"], proc.stderr


@pytest.mark.slow
def test_two_processes_print_a_user_error_once_and_exit_2(tmp_path, launch_ddp):
    """launch.sh passes the training process's exit status through, without a traceback, and
    the first of 2 processes alone prints the usage error (one process: the same path)."""
    from conftest import _free_port
    proc = run_launch_sh("train", "--cpu-procs", "2", "--bogus", "1", cwd=tmp_path, port=_free_port())
    assert proc.returncode == 2
    assert error_lines(proc) == [
        "segtrain: error: unrecognized arguments: --bogus 1 (see segtrain/train.py --help)"]
    # Plain accelerate launch keeps its own traceback and exit 1, but the error is printed once.
    proc = launch_ddp(REPO / "segtrain" / "train.py", "--data", tmp_path / "missing.json", cwd=tmp_path)
    assert proc.returncode == 1
    assert (proc.stdout + proc.stderr).count("segtrain: error:") == 1
    assert "missing.json: manifest not found" in proc.stderr


def test_a_process_killed_by_a_signal_is_one_line_and_status_128_plus_n(tmp_path):
    script = tmp_path / "killed.py"
    script.write_text("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n")
    proc = subprocess.run([sys.executable, "-m", "segtrain.launch", "--num_processes", "1", "--num_machines", "1",
                           "--mixed_precision", "no", "--dynamo_backend", "no", str(script)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env=os.environ | {"PYTHONPATH": str(REPO)})
    assert proc.returncode == 128 + 9
    assert error_lines(proc) == ["segtrain: process 0 was killed by SIGKILL (signal 9: out of memory? the kernel's "
                                 "OOM killer sends it (dmesg; sacct shows OUT_OF_MEMORY))"]


@pytest.mark.parametrize("module, usage", [
    ("segtrain.report", "python -m segtrain.report"), ("segtrain.evaluate", "python -m segtrain.evaluate"),
    ("segtrain.predict", "python -m segtrain.predict"), ("segtrain.sam", "python -m segtrain.sam"),
    ("segtrain.stats", "python -m segtrain.stats"), ("segtrain.visualize", "python -m segtrain.visualize"),
    ("segtrain.synthetic", "python -m segtrain.synthetic"), ("segtrain.pack", "python tools/pack.py"),
    ("segtrain.convert", "python tools/convert_checkpoint.py"),
    ("segtrain.download", "python tools/download_voc.py"), ("segtrain.train", "segtrain/train.py"),
])
def test_help_names_the_command_you_type(module, usage, capsys):
    import importlib
    with pytest.raises(SystemExit) as info:
        importlib.import_module(module).main(["--help"])
    assert info.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: {usage} ")


@pytest.mark.parametrize("env, cuda_build, message", [
    ({"LOCAL_RANK": "0", "WORLD_SIZE": "1"}, "13.0",
     "a GPU run was asked for (accelerate launch started it as a multi-GPU process); torch "),
    ({"LOCAL_RANK": "1", "WORLD_SIZE": "2"}, "13.0", "built for CUDA 13.0 but sees no usable GPU; most likely the "
                                                     "NVIDIA driver is older than CUDA 13.0 needs"),
    ({"LOCAL_RANK": "0", "ACCELERATE_USE_CPU": "False"}, None, "is a CPU-only build; install a CUDA build of torch"),
])
def test_a_gpu_launch_without_usable_cuda_is_one_line(monkeypatch, env, cuda_build, message):
    import torch

    from segtrain.cli import NoUsableGPU, check_launch

    for name in ("LOCAL_RANK", "WORLD_SIZE", "CUDA_VISIBLE_DEVICES", "ACCELERATE_USE_CPU"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", cuda_build)
    with pytest.raises(NoUsableGPU) as error:
        check_launch(1)
    assert message in str(error.value) and "\n" not in str(error.value)
    assert f"torch {torch.__version__}" in str(error.value) and "ACCELERATE_USE_CPU=1" in str(error.value)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the GPU is there: no error
    check_launch(int(env.get("WORLD_SIZE", 1)))


@pytest.mark.parametrize("env", [{}, {"CUDA_VISIBLE_DEVICES": "0"},  # single_gpu.yaml: CPU when no GPU
                                 {"LOCAL_RANK": "0", "WORLD_SIZE": "1", "ACCELERATE_USE_CPU": "1"},
                                 {"LOCAL_RANK": "0", "WORLD_SIZE": "1", "ACCELERATE_USE_CPU": "True"}])
def test_cpu_launches_are_not_gpu_launches(monkeypatch, env):
    import torch

    from segtrain.cli import check_launch

    for name in ("LOCAL_RANK", "WORLD_SIZE", "CUDA_VISIBLE_DEVICES", "ACCELERATE_USE_CPU"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    check_launch(1)
