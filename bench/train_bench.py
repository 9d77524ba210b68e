#!/usr/bin/env python
"""Training throughput: segtrain's loop against a plain PyTorch loop, side by side.

    python bench/train_bench.py                       # CPU defaults: resnet50 V3+, crop 257, batch 4
    python bench/train_bench.py --crop 513 --batch 8  # the reference recipe's size (GPU)

"plain" is the loop of the reference implementations (VainF/DeepLabV3Plus-Pytorch,
torchvision references): a map-style DataLoader over the VOC folder, fp32, one
process. "segtrain" is segtrain/train.py itself on the packed shards of the same
images, with its defaults (--mixed-precision auto and --channels-last auto: on a CPU
timed on this machine by segtrain/autotune.py, its "precision:" line above the table
gives the figures; the setting is in the table). Both build the same
model, use the same augmentation and batch size, and are timed over the same number
of steps after warm-up; segtrain's figure comes from its own metrics.jsonl (training
steps only). On CUDA it also prints peak GPU memory (the reference recipe reported
6861 MB at crop 513, batch 8).
"""
import argparse
import itertools
import os
import tempfile
from pathlib import Path

import torch
import yaml

from segtrain.config import parse_config
from segtrain.hardware import PRECISIONS, describe
from segtrain.losses import build_loss
from segtrain.model import build_model
from segtrain.pack import pack_split
from segtrain.synthetic import generate
from segtrain.checkpoints import read_metrics_log
from segtrain.datasets import VOC, VOCSegmentation
from segtrain.steptime import time_calls
from segtrain.train import train
from segtrain.transforms import train_transforms


def plain_loop(voc_root: Path, args, device: torch.device) -> tuple[float, float]:
    """images/s and peak MB of a reference-style fp32 loop."""
    transform = train_transforms(args.crop)
    dataset = VOCSegmentation(voc_root, "train", transforms=lambda img, lbl: transform(img, lbl))
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch, shuffle=True, drop_last=True,
                                         num_workers=args.workers, persistent_workers=args.workers > 0)
    model = build_model("deeplabv3plus", args.backbone).to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    criterion = build_loss("ce", VOC.num_classes)
    batches = itertools.cycle(loader)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def step() -> None:  # loading included, as in the reference loop
        images, masks = next(batches)
        loss = criterion(model(images.to(device))["out"], masks.to(device))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    timing = time_calls(step, args.steps, args.warmup, device)  # segtrain/steptime.py's timer
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else float("nan")
    return args.batch * args.steps / sum(timing.steps), peak


def segtrain_loop(manifest: Path, run_dir: Path, args, device: torch.device) -> tuple[float, float, str]:
    """images/s (training steps after warm-up, from metrics.jsonl), peak MB and the resolved
    precision + memory format of segtrain/train.py."""
    flags = ["--data", str(manifest), "--run-dir", str(run_dir), "--backbone", args.backbone,
             "--pretrained", "false", "--crop-size", str(args.crop), "--batch-size", str(args.batch),
             "--iterations", str(args.warmup + args.steps), "--log-every", "1", "--val-every", "100000",
             "--checkpoint-every", "100000", "--workers", str(args.workers), "--tracker", "none",
             "--mixed-precision", args.precision]
    train(parse_config(flags))
    records = read_metrics_log(run_dir / "metrics.jsonl")
    timed = [r for r in records if "images_per_s" in r and r["step"] > args.warmup]
    images_per_s = len(timed) / sum(1 / r["images_per_s"] for r in timed)  # harmonic mean = total rate
    peak = max((r.get("max_memory_mb", float("nan")) for r in timed), default=float("nan"))
    resolved = yaml.safe_load((run_dir / "config.yaml").read_text())["resolved"]
    return images_per_s, peak, resolved["mixed_precision"] + ("+channels_last" if resolved["channels_last"] else "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="resnet50")
    ap.add_argument("--crop", type=int, default=257)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--precision", default="auto", choices=PRECISIONS)
    ap.add_argument("--images", type=int, default=64, help="synthetic VOC-sized train images")
    ap.add_argument("--abba", action=argparse.BooleanOptionalAction, default=True,
                    help="time each loop twice, in the order plain, segtrain, segtrain, plain, and report "
                         "each loop's faster run (robust to load that comes and goes)")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        root = generate(tmp, num_train=args.images, num_val=2, seed=0, min_size=350, max_size=500)
        shards_dir = Path(tmp) / "shards"
        for split in ("train", "val"):
            pack_split(root, split, shards_dir, shard_size=16, progress=False)
        # A B B A: on a shared machine, load that comes and goes hits both loops alike.
        runs = {"plain": [], "segtrain": []}
        for n, which in enumerate(["plain", "segtrain", "segtrain", "plain"][: 4 if args.abba else 2]):
            if which == "plain":
                runs["plain"].append((*plain_loop(root, args, device), "fp32"))
            else:
                runs["segtrain"].append(segtrain_loop(shards_dir / "voc-train.json", Path(tmp) / f"run{n}",
                                                      args, device))
        # Interference only ever slows a run down: the faster run of each loop is the better estimate.
        (plain, plain_mb, _), (ours, ours_mb, ours_setting) = (max(runs[k], key=lambda r: r[0])
                                                               for k in ("plain", "segtrain"))
    print("\n" + describe())
    if hasattr(os, "getloadavg"):
        print(f"load average (1 min) at the end: {os.getloadavg()[0]:.2f}")
    print(f"DeepLabV3+ {args.backbone}, crop {args.crop}, batch {args.batch}, {args.steps} timed steps on {device}"
          + (", ABBA order, faster of 2 runs each" if args.abba else ""))
    print("all runs (images/s):", {k: [round(r[0], 2) for r in v] for k, v in runs.items()})
    print("| loop | precision | images/s | peak GPU MB |")
    print("|---|---|---|---|")
    print(f"| plain PyTorch (reference style) | fp32 | {plain:.2f} | {plain_mb:.0f} |")
    print(f"| segtrain (--mixed-precision {args.precision}) | {ours_setting} | {ours:.2f} | {ours_mb:.0f} |")
    print(f"speed-up: {ours / plain:.2f}x")


if __name__ == "__main__":
    main()
