#!/usr/bin/env python
"""Pack throughput (images/s) on VOC-sized synthetic images.

    python bench/pack_bench.py [--images 300] [--workers 1 2]

Generates a synthetic VOC tree with images of 350-500 px a side (VOC's are at
most 500x500, typically 500x375), then times tools/pack.py's pack_split for each
worker count. Every pair is fully decoded and checked, so this is the real cost.
"""
import argparse
import os
import tempfile
import time

from segtrain.hardware import describe
from segtrain.pack import pack_split
from segtrain.synthetic import generate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=300)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--shard-size", type=int, default=256)
    args = ap.parse_args()
    print(describe())
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        root = generate(tmp, num_train=args.images, num_val=1, seed=0, min_size=350, max_size=500)
        print(f"generated {args.images} images in {time.perf_counter() - t0:.1f} s "
              f"({os.cpu_count()} CPUs)")
        print("| workers | images | seconds | images/s | MB/s |")
        print("|---|---|---|---|---|")
        for w in args.workers:
            out = os.path.join(tmp, f"shards-{w}")
            t0 = time.perf_counter()
            m = pack_split(root, "train", out, shard_size=args.shard_size, workers=w, progress=False)
            dt = time.perf_counter() - t0
            mb = sum(s["bytes"] for s in m["shards"]) / 1e6
            print(f"| {w} | {m['num_samples']} | {dt:.2f} | {m['num_samples'] / dt:.1f} | {mb / dt:.1f} |")


if __name__ == "__main__":
    main()
