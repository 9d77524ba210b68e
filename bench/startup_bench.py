"""Time to first step: a whole 1-step training process against `import torch, torchvision`.

Every process segtrain starts (a test, a sweep trial, a short job) pays a fixed cost before
and after its steps: imports, the run's setup, the first step, the validation and the weight
files at the end. This times, as fresh interpreters,

    import torch, torchvision          the floor: what any torch + torchvision program pays
    import segtrain.train              segtrain's imports
    segtrain/train.py ... 1 step       a whole training process: a tiny synthetic dataset (8 train,
                                       4 val images of 64-96 px), ResNet-18 DeepLabV3+ without
                                       pretrained weights, crop 65, batch 2, one step, validation,
                                       best.pt/final.pt, per tracker (none; wandb offline as the demo)

and prints the median of N runs of each, the 1-step process as a multiple of the floor, the
CPU and the load average. The kinds are interleaved (one of each per round), so a neighbour's
load hits them alike; a warm-up round (not counted) fills the file cache and the autotune's
cache (`--mixed-precision auto` measures once per machine; SEGTRAIN_NO_AUTOTUNE=1 skips it).
"CPU s" adds up user + system time of the process and its children (loader workers): the
steadier figure on a shared machine.

    python bench/startup_bench.py [--runs 5] [--trackers none wandb] [--baseline OTHER_CHECKOUT]

``--baseline`` times another checkout's segtrain (`git worktree add /tmp/before main`) in the
same rounds, its rows marked "(baseline)": before/after figures under the same load.
"""
from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from segtrain.hardware import cpu_model  # noqa: E402  (after the path: the checkout's segtrain)

TRAIN_ARGS = ["--backbone", "resnet18", "--pretrained", "false", "--crop-size", "65", "--batch-size", "2",
              "--iterations", "1", "--workers", "1", "--mixed-precision", "auto"]


def make_data(root: Path) -> Path:
    """8 train + 4 val synthetic VOC images of 64-96 px, packed; returns the train manifest."""
    env = os.environ | {"PYTHONPATH": str(REPO)}
    subprocess.run([sys.executable, "-m", "segtrain.synthetic", "--out", str(root / "voc"), "--train", "8",
                    "--val", "4", "--seed", "0", "--min-size", "64", "--max-size", "96"],
                   check=True, env=env, stdout=subprocess.DEVNULL)
    for split in ("train", "val"):
        subprocess.run([sys.executable, str(REPO / "tools" / "pack.py"), "--voc-root",
                        str(root / "voc" / "VOCdevkit" / "VOC2012"), "--split", split, "--out", str(root / "shards"),
                        "--workers", "1"], check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return root / "shards" / "voc-train.json"


def commands(repo: Path, data: Path, root: Path, trackers: list[str], label: str = ""
             ) -> dict[str, tuple[list[str], dict]]:
    """Name -> (argv, environment) of each kind of process timed, with ``repo``'s segtrain."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")} | {"PYTHONPATH": str(repo)}
    kinds = {f"import segtrain.train{label}": ([sys.executable, "-c", "import segtrain.train"], env)}
    for tracker in trackers:
        extra = {"WANDB_MODE": "offline", "WANDB_SILENT": "true"} if tracker == "wandb" else {}
        kinds[f"1-step training, tracker {tracker}{label}"] = (
            [sys.executable, str(repo / "segtrain" / "train.py"), "--data", str(data), *TRAIN_ARGS,
             "--tracker", tracker, "--run-dir", str(root / f"runs{label.strip()}" / tracker)], env | extra)
    return kinds


def timed(argv: list[str], env: dict) -> tuple[float, float]:
    """(wall s, CPU s of the process and its children) of one run; a failure stops the bench."""
    if "--run-dir" in argv:  # a fresh run each time (not timed)
        shutil.rmtree(argv[argv.index("--run-dir") + 1], ignore_errors=True)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    # In the checkout whose segtrain it times: Python puts the working folder first on sys.path.
    proc = subprocess.run(argv, env=env, cwd=env["PYTHONPATH"], capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode:
        sys.exit(f"{' '.join(argv)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="timed rounds (one run of each kind per round)")
    parser.add_argument("--trackers", nargs="+", default=["none", "wandb"], choices=["none", "wandb"])
    parser.add_argument("--baseline", type=Path, help="another segtrain checkout, timed in the same rounds")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="startup-bench-") as tmp:
        root = Path(tmp)
        data = make_data(root)
        kinds = {"import torch, torchvision": ([sys.executable, "-c", "import torch, torchvision"],
                                               os.environ | {"PYTHONPATH": str(REPO)})}
        kinds |= commands(REPO, data, root, args.trackers)
        if args.baseline:
            kinds |= commands(args.baseline.resolve(), data, root, args.trackers, " (baseline)")
        print(f"CPU: {cpu_model()}, {os.cpu_count()} logical cores; load average {load()} (1, 5, 15 min) at start")
        for argv, env in kinds.values():  # warm-up: file cache, autotune cache
            timed(argv, env)
        walls: dict[str, list[float]] = {k: [] for k in kinds}
        cpus: dict[str, list[float]] = {k: [] for k in kinds}
        loads = []
        for round_ in range(args.runs):
            loads.append(os.getloadavg()[0])
            for name, (argv, env) in kinds.items():
                wall, cpu = timed(argv, env)
                walls[name].append(wall)
                cpus[name].append(cpu)
            print(f"round {round_ + 1}/{args.runs}: " + ", ".join(f"{w[-1]:.1f}" for w in walls.values())
                  + f" s; load {load()}", file=sys.stderr)
    floor = statistics.median(walls["import torch, torchvision"])
    floor_cpu = statistics.median(cpus["import torch, torchvision"])
    print(f"\n| process (median of {args.runs}) | wall s | x floor | CPU s | x floor |\n|---|---|---|---|---|")
    for name in kinds:
        wall, cpu = statistics.median(walls[name]), statistics.median(cpus[name])
        print(f"| {name} | {wall:.2f} | {wall / floor:.2f} | {cpu:.2f} | {cpu / floor_cpu:.2f} |")
    print(f"\nload average (1 min) at the rounds' starts: {', '.join(f'{x:.1f}' for x in loads)}; at the end {load()}")


if __name__ == "__main__":
    main()
