#!/usr/bin/env python
"""Losses for class imbalance on the synthetic VOC set: equal budget, fixed seed.

    python bench/imbalance_bench.py                                  # ce vs weighted_ce, ce+dice, focal
    python bench/imbalance_bench.py --losses ce lovasz --iterations 300

Trains DeepLabV3+ once per loss with otherwise identical settings (data, seed,
steps, schedule: the demo recipe), evaluates the final weights on the val split
and prints mIoU, the mean IoU over the 5 rarest classes (by training pixel share,
from the manifest) and their per-class IoU. Writes the comparison report
(segtrain.report) under --out. Takes ~2.5 min per loss on 2 CPU cores.
"""
import argparse
import time
from pathlib import Path

from segtrain import stats
from segtrain.hardware import describe
from segtrain.config import parse_config
from segtrain.metrics import subset_miou
from segtrain.sources import read_manifest
from segtrain.pack import pack_split
from segtrain.report import build_report
from segtrain.synthetic import generate
from segtrain.checkpoints import read_metrics_log
from segtrain.train import train


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--losses", nargs="+", default=["ce", "weighted_ce", "ce+dice", "focal"])
    ap.add_argument("--class-weighting", default="median_frequency")
    ap.add_argument("--iterations", type=int, default=150)
    ap.add_argument("--backbone", default="resnet50")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rare", type=int, default=5, help="how many of the rarest classes to average")
    ap.add_argument("--out", type=Path, default=Path("runs/imbalance_bench"))
    args = ap.parse_args()

    data = args.out / "data"
    if not (data / "shards" / "voc-val.json").exists():
        root = generate(data, num_train=240, num_val=150, seed=args.seed)
        for split in ("train", "val"):
            pack_split(root, split, data / "shards", shard_size=64, workers=2, progress=False)
    manifest_path = data / "shards" / "voc-train.json"
    manifest = read_manifest(manifest_path)
    class_names = manifest["class_names"]  # the data's classes, not an import
    rare = stats.rarest_classes(manifest, args.rare)

    results = {}
    for loss in args.losses:
        run_dir = args.out / loss.replace("+", "_plus_")
        if not (run_dir / "final.pt").exists():
            start = time.perf_counter()
            train(parse_config([
                "--data", str(manifest_path), "--run-dir", str(run_dir), "--name", f"bench-{loss}",
                "--backbone", args.backbone, "--pretrained", "false", "--crop-size", "129",
                "--batch-size", "8", "--iterations", str(args.iterations), "--lr", "0.02",
                "--lr-schedule", "poly", "--mixed-precision", "auto", "--workers", "2",
                "--seed", str(args.seed), "--loss", loss, "--class-weighting", args.class_weighting,
                "--val-every", str(args.iterations), "--checkpoint-every", str(args.iterations),
                "--tracker", "none"]))
            print(f"{loss}: trained in {time.perf_counter() - start:.0f} s")
        records = read_metrics_log(run_dir / "metrics.jsonl")
        results[loss] = [r for r in records if "val/miou" in r][-1]  # the final weights: equal budget

    print("\n" + describe())
    print(f"DeepLabV3+ {args.backbone}, random init, {args.iterations} steps, batch 8, crop 129, precision auto, "
          f"seed {args.seed}; val: 150 synthetic images; weighting for weighted_ce: {args.class_weighting}")
    print(f"rarest classes (train pixel share): {', '.join(class_names[c] for c in rare)}\n")
    print("| loss | mIoU | rare-class mIoU | " + " | ".join(class_names[c] for c in rare) + " |")
    print("|---|---|---|" + "---|" * len(rare))
    for loss, r in results.items():
        iou = r["val/iou"]
        cells = " | ".join("-" if iou[c] is None else f"{100 * iou[c]:.1f}" for c in rare)
        print(f"| {loss} | {100 * r['val/miou']:.1f} | {100 * subset_miou(iou, rare):.1f} | {cells} |")
    report = build_report([args.out / loss.replace("+", "_plus_") for loss in args.losses], args.out / "report")
    print(f"\nreport: {report}")


if __name__ == "__main__":
    main()
