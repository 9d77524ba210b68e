"""Training loader throughput: shards vs the VOC folder, against the raw decode rate.

Generates VOC-sized synthetic images (375-500 px a side) into a temporary folder,
packs them, then measures decoded + augmented samples/s at crop 513 for the shard
and folder loaders with 0, 1 and 2 DataLoader workers, and the raw JPEG + PNG decode
rate without augmentation (one process, one thread). Prints a Markdown table.

    python bench/loader_bench.py [--images 256] [--batch-size 8] [--crop 513] [--epochs 2] [--workers 0 1 2]

Loader rates are steady state: each epoch's clock starts at its first batch, so worker
start-up and the shuffle buffers' fill are excluded. "CPU ms/sample" adds up every
process (main + workers, start-up included) and is the steadier figure on a shared
machine; "main ms/sample" is the consumer's share (what the training process pays).
Compare rows within one run only. Training batches are uint8: the training loop
normalises them on its device; the cost of doing that on the CPU is printed below
the table.
"""
from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torchvision.io import ImageReadMode, decode_jpeg

from segtrain import loaders, transforms
from segtrain.datasets import VOC, VOCSegmentation, decode_label
from segtrain.sources import resolve_data
from segtrain.hardware import describe
from segtrain.pack import pack_split
from segtrain.synthetic import generate


def raw_decode_rate(root: Path, decode) -> tuple[float, float]:
    """(samples/s, CPU ms per sample) of decode(jpeg, png, id) over the split, bytes in memory."""
    dataset = VOCSegmentation(root, "train")
    pairs = [(*dataset.load_raw(i), sid) for i, sid in enumerate(dataset.ids)]
    start, cpu_start = time.perf_counter(), time.process_time()
    for jpeg, png, name in pairs:
        decode(jpeg, png, name)
    return len(pairs) / (time.perf_counter() - start), (time.process_time() - cpu_start) * 1000 / len(pairs)


def decode_with_torchvision(jpeg: bytes, png: bytes, name: str):
    """The alternative image decoder (libjpeg-turbo straight to a tensor)."""
    image = decode_jpeg(torch.frombuffer(bytearray(jpeg), dtype=torch.uint8), mode=ImageReadMode.RGB)
    return image, decode_label(png, name, VOC)


def cpu_seconds(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def loader_rate(data: str, workers: int, batch_size: int, crop: int, epochs: int) -> tuple[float, float, float]:
    """(steady-state samples/s, CPU ms per sample over all processes, of the main process) of train_loader.

    Each epoch's clock starts at its first batch: worker start-up and buffer fill are
    left out of the rate (not of the CPU time). An epoch's DataLoader joins its workers
    when it runs out, so RUSAGE_CHILDREN holds their whole CPU time.
    """
    samples, seconds, delivered = 0, 0.0, 0
    main_start, workers_start = cpu_seconds(resource.RUSAGE_SELF), cpu_seconds(resource.RUSAGE_CHILDREN)
    for epoch in range(epochs):
        loader, _ = loaders.train_loader(resolve_data(data, "train"), batch_size, crop, num_workers=workers,
                                         epoch=epoch)
        start = None
        for images, _, _ in loader:
            delivered += images.shape[0]
            if start is None:
                start = time.perf_counter()
            else:
                samples += images.shape[0]
        seconds += time.perf_counter() - start
    main_ms = (cpu_seconds(resource.RUSAGE_SELF) - main_start) * 1000 / delivered
    workers_ms = (cpu_seconds(resource.RUSAGE_CHILDREN) - workers_start) * 1000 / delivered
    return samples / seconds, main_ms + workers_ms, main_ms


def normalize_cost(batch_size: int, crop: int, repeats: int = 20) -> float:
    """CPU ms per sample of what training does to a uint8 batch: normalise, masks to int64."""
    images = torch.randint(0, 256, (batch_size, 3, crop, crop), dtype=torch.uint8)
    masks = torch.randint(0, 21, (batch_size, crop, crop), dtype=torch.uint8)
    start = time.process_time()
    for _ in range(repeats):
        transforms.normalize(images), masks.long()
    return (time.process_time() - start) * 1000 / (repeats * batch_size)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--crop", type=int, default=513)
    ap.add_argument("--epochs", type=int, default=2, help="loader epochs per measurement")
    ap.add_argument("--shard-size", type=int, default=64)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2],
                    help="DataLoader workers to try (0: all in the main process)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)  # DataLoader workers run one thread each; compare like with like
    warnings.simplefilter("ignore", DeprecationWarning)  # torchvision.io decoding, measured on purpose
    others_load = os.getloadavg()[0]  # before this script adds its own processes

    with tempfile.TemporaryDirectory() as tmp:
        root = generate(Path(tmp) / "voc", args.images, 1, seed=0, min_size=375, max_size=500)
        pack_split(root, "train", Path(tmp) / "shards", shard_size=args.shard_size, progress=False)
        manifest = str(Path(tmp) / "shards" / "voc-train.json")

        rows = [("raw decode, PIL JPEG + PNG (used)", "-", *raw_decode_rate(root, lambda j, p, n: loaders.decode_sample(j, p, n, VOC)),
                 None),
                ("raw decode, torchvision.io JPEG + PNG", "-", *raw_decode_rate(root, decode_with_torchvision),
                 None)]
        raw = rows[0][2]
        for workers in args.workers:
            for name, data in (("shards", manifest), ("folder", str(root))):
                rows.append((f"{name}, decode + augment (crop {args.crop})", str(workers),
                             *loader_rate(data, workers, args.batch_size, args.crop, args.epochs)))

    print("\n" + describe())
    print(f"{args.images} synthetic images 375-500 px, batch {args.batch_size}, "
          f"{torch.get_num_threads()} torch thread per process, {os.cpu_count()} CPUs, "
          f"load average {others_load:.1f} before the run\n")
    print("| pipeline | workers | samples/s | / raw decode | CPU ms/sample | main ms/sample |")
    print("|---|---|---|---|---|---|")
    for name, workers, rate, cpu_ms, main_ms in rows:
        main = "-" if main_ms is None else f"{main_ms:.2f}"
        print(f"| {name} | {workers} | {rate:.1f} | {rate / raw:.2f} | {cpu_ms:.2f} | {main} |")
    print(f"\nNormalising a uint8 batch and casting its masks to int64 on this CPU: "
          f"{normalize_cost(args.batch_size, args.crop):.2f} ms/sample (training does it on its device).")


if __name__ == "__main__":
    main()
