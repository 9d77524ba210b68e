"""Multi-node training proven on one machine: two "machines" (two `accelerate launch` calls
with --num_machines 2 and machine_rank 0 and 1, rendezvous on 127.0.0.1, CPU + gloo) train
into ONE run directory, end with equal parameters, and `--resume latest` continues it."""
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import _free_port
from segtrain.model import load_checkpoint

REPO = Path(__file__).resolve().parents[1]


def launch_two_machines(cwd: Path, *train_args: str, timeout: int = 600) -> list[subprocess.CompletedProcess]:
    """The same command on machine 0 and machine 1, one process each, as examples/slurm.sh runs it."""
    port = _free_port()
    env = os.environ | {"ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    machines = [subprocess.Popen(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "2",
         "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1", "--main_process_port", str(port),
         "--num_processes", "2", "--mixed_precision", "no", "--dynamo_backend", "no",
         str(REPO / "tests" / "ddp_train_worker.py"), str(cwd), *train_args],
        cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]
    results = []
    try:
        for machine in machines:
            out, _ = machine.communicate(timeout=timeout)
            results.append(subprocess.CompletedProcess(machine.args, machine.returncode, out, ""))
    finally:
        for machine in machines:
            if machine.poll() is None:
                machine.kill()
    return results


def fingerprint(model: torch.nn.Module) -> str:
    """The hash tests/ddp_train_worker.py writes for each rank's trained model."""
    params = torch.cat([p.detach().double().flatten() for p in model.state_dict().values()
                        if p.is_floating_point()])
    return hashlib.sha256(params.numpy().tobytes()).hexdigest()


def read_ranks(folder: Path) -> list[dict]:
    return [json.loads((folder / f"rank{r}.json").read_text()) for r in (0, 1)]


@pytest.mark.slow
def test_two_machines_train_into_one_run_dir_and_resume(packed_shards, tmp_path):
    shutil.copytree(packed_shards["dir"], tmp_path / "shards")
    args = ["--data", "shards/voc-train.json", "--run-dir", "run", "--backbone", "resnet18",
            "--pretrained", "false", "--crop-size", "65", "--batch-size", "4", "--workers", "1",
            "--lr-schedule", "step", "--step-size", "100", "--log-every", "1", "--checkpoint-every", "2",
            "--val-every", "2", "--tracker", "none", "--seed", "3"]
    for machine in launch_two_machines(tmp_path, *args, "--iterations", "4"):
        assert machine.returncode == 0, machine.stdout[-3000:]
    first = read_ranks(tmp_path)
    assert first[0]["world"] == first[1]["world"] == 2
    assert first[0]["sha256"] == first[1]["sha256"]  # DDP kept both machines' parameters equal
    run = tmp_path / "run"
    model, ckpt = load_checkpoint(run / "final.pt")
    assert fingerprint(model) == first[0]["sha256"] and ckpt["step"] == 4
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_0000002", "step_0000004"]

    # Both machines resume from the shared directory's latest checkpoint and continue to step 6.
    for f in tmp_path.glob("rank*.json"):
        f.unlink()
    machines = launch_two_machines(tmp_path, *args, "--iterations", "6", "--resume", "latest")
    for machine in machines:
        assert machine.returncode == 0, machine.stdout[-3000:]
    assert "resumed from run/checkpoints/step_0000004 at step 4" in machines[0].stdout
    second = read_ranks(tmp_path)
    assert second[0]["sha256"] == second[1]["sha256"] != first[0]["sha256"]
    model, ckpt = load_checkpoint(run / "final.pt")
    assert fingerprint(model) == second[0]["sha256"] and ckpt["step"] == 6
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()
             if "train/loss" in line]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_slurm_script_gives_every_rank_its_cpus_and_names_no_precision(tmp_path):
    """examples/slurm.sh with stand-ins for srun and scontrol: srun repeats --cpus-per-task (not
    inherited on Slurm 22.05-23.02), and the launcher is given no precision (segtrain's decides)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text('#!/usr/bin/env bash\nprintf "%s\\0" "SRUN_CPUS_PER_TASK=$SRUN_CPUS_PER_TASK" "$@" '
                                  f'> {tmp_path}/srun.args\n')
    (bin_dir / "scontrol").write_text("#!/usr/bin/env bash\nprintf 'node1\\nnode2\\n'\n")
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    env = os.environ | {"PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_SUBMIT_DIR": str(REPO),
                        "SLURM_JOB_NODELIST": "node[1-2]", "SLURM_NNODES": "2", "SLURM_GPUS_ON_NODE": "4",
                        "SLURM_CPUS_PER_TASK": "32", "SLURM_JOB_ID": "123", "SLURM_JOB_NAME": "voc"}
    proc = subprocess.run(["bash", str(REPO / "examples" / "slurm.sh"), "--data", "x.json"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    args = (tmp_path / "srun.args").read_text().split("\0")
    assert args[0] == "SRUN_CPUS_PER_TASK=32" and "--cpus-per-task=32" in args
    script = args[args.index("-c") + 1]
    assert "--mixed_precision" not in script and "segtrain.launch" in script
    assert args[args.index("-c") + 2:args.index("-c") + 7] == [f"{REPO}/.venv/bin/python", "2", "8", "node1", "29500"]


@pytest.mark.slow
def test_compile_on_two_processes_compiles_graphs(launch_ddp, tmp_path):
    """--compile on 2 processes: the inner module is compiled, so dynamo compiles graphs (the DDP
    wrapper compiled gives 0: dynamo graph-breaks at DDP's forward), the line says so, and DDP
    still keeps the ranks' parameters equal."""
    proc = launch_ddp(REPO / "tests" / "ddp_compile_worker.py", tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"compile{r}.json").read_text()) for r in (0, 1)]
    for rank in ranks:
        assert rank["world"] == 2 and rank["compiled"] and rank["graphs"] > 0, rank
        assert rank["line"].startswith(f"compile: {rank['graphs']} graph(s) compiled"), rank
    assert ranks[0]["checksum"] == ranks[1]["checksum"]
