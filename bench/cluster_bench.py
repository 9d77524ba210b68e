"""Cluster life, measured: (1) a signal during 2-process CPU training: steps lost, seconds from
the signal to the checkpoint and to the launcher's exit; (2) bytes fetched per epoch from a
local HTTP server (remote manifest) against the split's size, for 1 and 2 ranks of one node,
1 and 2 loader workers, with and without the node's shard cache (segtrain/shardcache.py); (3) on the
cluster harness (tests/cluster_harness.py): SIGTERM to every process of the job -> every node
exited (75 / the requeue marker), for 1 node x 2 processes and 2 nodes x 1, and kill -9 of
rank 1 under --max_restarts 1 -> the first training step of the restarted group, in seconds.

    PYTHONPATH=$PWD python bench/cluster_bench.py [--iterations 12] [--crop 33] [--skip-signal]
        [--skip-bytes] [--skip-harness]

Prints the figures; name the machine (and any other load on it) when you record them.
"""
from __future__ import annotations

import argparse
import collections
import functools
import http.server
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

sys.path.insert(0, str(REPO / "tests"))

from cluster_harness import Job, metrics_steps, wait_for_step  # noqa: E402
from segtrain import loaders, sources  # noqa: E402
from segtrain.pack import pack_split  # noqa: E402
from segtrain.synthetic import generate  # noqa: E402


class Counting(http.server.SimpleHTTPRequestHandler):
    def copyfile(self, source, outputfile):
        data = source.read()
        self.server.sent[self.path] += len(data)
        outputfile.write(data)

    def log_message(self, *args):
        pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(folder: Path):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Counting, directory=str(folder)))
    server.sent = collections.Counter()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def bytes_per_epoch(shard_dir: Path, batch: int) -> None:
    server, base = serve(shard_dir)
    manifest = json.loads((shard_dir / "voc-train.json").read_text())
    split_bytes = sum(s["bytes"] for s in manifest["shards"])
    source = sources.resolve_data(f"{base}/voc-train.json", "train")
    try:
        for world, workers, cache_gb in ((1, 1, 0), (1, 2, 0), (2, 2, 0), (1, 2, 1), (2, 2, 1)):
            server.sent.clear()
            ranks = [loaders.train_loader(source, batch, 33, num_workers=workers, rank=rank, world_size=world,
                                          epoch=0, node_cache_gb=cache_gb)[0] for rank in range(world)]
            for _ in zip(*ranks):  # the ranks side by side, as on one node
                pass
            tars = {p: n for p, n in server.sent.items() if p.endswith(".tar")}
            fetched = sum(tars.values())
            print(f"remote epoch, {world} rank(s) x {workers} worker(s), node cache {'on' if cache_gb else 'off'}, "
                  f"batch {batch}/rank: fetched {fetched} B of shards for a split of {split_bytes} B "
                  f"({fetched / split_bytes:.3f}x)")
    finally:
        server.shutdown()


def signal_timing(shard_dir: Path, work: Path, iterations: int, crop: int, target: str) -> None:
    run_dir = work / f"run-{target.replace(' ', '-')}"
    args = ["--data", str(shard_dir / "voc-train.json"), "--run-dir", str(run_dir), "--backbone", "resnet18",
            "--pretrained", "false", "--crop-size", str(crop), "--batch-size", "4", "--iterations", str(iterations),
            "--workers", "1", "--log-every", "1", "--checkpoint-every", "1000", "--val-every", "1000",
            "--mixed-precision", "no", "--tracker", "none", "--resume", "auto"]
    cmd = [sys.executable, "-m", "segtrain.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
           str(REPO / "segtrain" / "train.py"), *args]
    env = os.environ | {"ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    launcher = subprocess.Popen(cmd, env=env, cwd=work, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    log = run_dir / "metrics.jsonl"
    step_times = []
    while True:
        assert launcher.poll() is None, launcher.communicate()[1][-2000:]
        steps = [json.loads(line)["step"] for line in log.read_text().splitlines()] if log.exists() else []
        if steps and (not step_times or step_times[-1][0] != steps[-1]):
            step_times.append((steps[-1], time.monotonic()))
        if steps and steps[-1] >= 3:
            break
        time.sleep(0.01)
    child = {c.environ().get("RANK"): c.pid for c in psutil.Process(launcher.pid).children()}
    signalled = time.monotonic()
    os.kill(child["1"] if target == "one rank" else launcher.pid, signal.SIGTERM)
    checkpoint_at, ranks_gone = None, {}
    while launcher.poll() is None:
        if checkpoint_at is None and any((run_dir / "checkpoints").glob("step_*")):
            checkpoint_at = time.monotonic()
        for rank, pid in child.items():
            if rank not in ranks_gone and not (psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"):
                ranks_gone[rank] = time.monotonic() - signalled
        time.sleep(0.01)
    exited = time.monotonic()
    done = max(json.loads(line)["step"] for line in log.read_text().splitlines())
    saved = sorted(p.name for p in (run_dir / "checkpoints").glob("step_*"))
    step_s = (step_times[-1][1] - step_times[0][1]) / max(1, step_times[-1][0] - step_times[0][0])
    print(f"SIGTERM to {target} at step 3 (a step takes ~{step_s:.2f} s): exit status {launcher.returncode}, "
          f"stopped after step {done}, checkpoints {saved}, steps lost {done - int(saved[-1][5:])}; "
          f"signal -> checkpoint in place {checkpoint_at - signalled:.2f} s, -> training processes ended "
          f"{', '.join(f'{t:.2f}' for _, t in sorted(ranks_gone.items()))} s, -> launcher exit {exited - signalled:.2f} s")


def harness_args(shard_dir: Path, run_dir: Path, iterations: int, crop: int) -> list[str]:
    return ["--data", str(shard_dir / "voc-train.json"), "--run-dir", str(run_dir), "--backbone", "resnet18",
            "--pretrained", "false", "--crop-size", str(crop), "--batch-size", "4", "--iterations", str(iterations),
            "--workers", "1", "--log-every", "1", "--checkpoint-every", "2", "--keep-checkpoints", "1",
            "--val-every", "1000", "--mixed-precision", "no", "--tracker", "none", "--resume", "auto"]


def stop_on_every_process(shard_dir: Path, work: Path, nodes: int, iterations: int, crop: int) -> None:
    """SIGTERM to every process of the job at step 3, srun's kill-on-bad-exit played."""
    run_dir, marker = work / f"stop-{nodes}", work / f"stopped-{nodes}"
    job = Job(harness_args(shard_dir, run_dir, iterations, crop), nodes=nodes, procs=2 // nodes, cwd=work,
              env={"SEGTRAIN_STOP_MARKER": str(marker)})
    wait_for_step(job, run_dir, 3)
    signalled = time.monotonic()
    count = job.signal_all(signal.SIGTERM)
    outcome = job.wait()
    print(f"SIGTERM to all {count} processes, {nodes} node(s) x {2 // nodes} process(es): every node exited "
          f"{time.monotonic() - signalled:.2f} s after the signal, statuses {outcome.statuses}, requeue marker "
          f"{'written' if marker.exists() else 'MISSING'}, stopped after step {max(metrics_steps(run_dir))}")


def kill_and_restart(shard_dir: Path, work: Path, iterations: int, crop: int) -> None:
    """kill -9 of rank 1 at step 3 under --max_restarts 1 (c10d): seconds to the restarted group's first step."""
    run_dir = work / "restart"
    job = Job(harness_args(shard_dir, run_dir, iterations, crop), nodes=1, procs=2, cwd=work,
              launch_flags=("--max_restarts", "1", "--rdzv_backend", "c10d"))
    wait_for_step(job, run_dir, 3)
    os.kill(job.rank_pid(1), signal.SIGKILL)
    killed = time.monotonic()
    first_step = None
    while job.nodes[0].poll() is None:
        resumed = [line for line in job.output().splitlines() if line.startswith("resumed from")]
        if resumed and first_step is None:
            at = int(resumed[0].rsplit(" ", 1)[1])
            if max(metrics_steps(run_dir), default=0) > at:
                first_step = time.monotonic() - killed
        time.sleep(0.02)
    outcome = job.wait()
    print(f"kill -9 of rank 1 at step 3, --max_restarts 1: first step of the restarted group "
          f"{first_step:.2f} s after the kill (from {resumed[0].split(' at ')[0][13:]}); job exit status "
          f"{outcome.statuses[0]} after {time.monotonic() - killed:.2f} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iterations", type=int, default=12)
    ap.add_argument("--crop", type=int, default=33)
    ap.add_argument("--skip-signal", action="store_true")
    ap.add_argument("--skip-bytes", action="store_true")
    ap.add_argument("--skip-harness", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        root = generate(work / "voc", 48, 16, seed=0, min_size=64, max_size=128)
        for split in ("train", "val"):
            pack_split(root, split, work / "shards", shard_size=10, progress=False)
        if not args.skip_bytes:
            bytes_per_epoch(work / "shards", batch=4)
        if not args.skip_signal:
            for target in ("one rank", "launcher"):
                signal_timing(work / "shards", work, args.iterations, args.crop, target)
        if not args.skip_harness:
            for nodes in (1, 2):
                stop_on_every_process(work / "shards", work, nodes, args.iterations, args.crop)
            kill_and_restart(work / "shards", work, args.iterations, args.crop)


if __name__ == "__main__":
    main()
