"""Training loader throughput: shards vs the VOC folder, against the raw decode rate.

Generates VOC-sized synthetic images (375-500 px a side) into a temporary folder,
packs them, then measures decoded + augmented samples/s at crop 513 for the shard
and folder loaders with 0, 1 and 2 DataLoader workers, and the raw JPEG + PNG decode
rate without augmentation (one process, one thread). Prints a Markdown table.

    python bench/loader_bench.py [--images 256] [--batch-size 8] [--crop 513] [--epochs 2] [--workers 0 1 2]

Loader rates are steady state: each epoch's clock starts at its first batch, so worker
start-up and the shuffle buffers' fill are excluded. "CPU ms/sample" adds up every
process (main + workers, start-up included) and is the steadier figure on a shared
machine; compare rows within one run only.
"""
from __future__ import annotations

import argparse
import gc
import resource
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torchvision.io import ImageReadMode, decode_jpeg

from segtrain import shards, voc
from segtrain.pack import pack_split
from segtrain.synthetic import generate


def raw_decode_rate(root: Path, decode) -> tuple[float, float]:
    """(samples/s, CPU ms per sample) of decode(jpeg, png, id) over the split, bytes in memory."""
    dataset = voc.VOCSegmentation(root, "train")
    pairs = [(*dataset.load_raw(i), sid) for i, sid in enumerate(dataset.ids)]
    start, cpu_start = time.perf_counter(), time.process_time()
    for jpeg, png, name in pairs:
        decode(jpeg, png, name)
    return len(pairs) / (time.perf_counter() - start), (time.process_time() - cpu_start) * 1000 / len(pairs)


def decode_with_torchvision(jpeg: bytes, png: bytes, name: str):
    """The alternative image decoder (libjpeg-turbo straight to a tensor)."""
    image = decode_jpeg(torch.frombuffer(bytearray(jpeg), dtype=torch.uint8), mode=ImageReadMode.RGB)
    return image, voc.decode_label(png, name)


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (DataLoader workers are joined)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def loader_rate(data: str, workers: int, batch_size: int, crop: int, epochs: int) -> tuple[float, float]:
    """(steady-state samples/s, CPU ms per sample over all processes) of train_loader.

    Each epoch's clock starts at its first batch: worker start-up and buffer fill are
    left out of the rate (not of the CPU time).
    """
    samples, seconds, cpu_start = 0, 0.0, cpu_seconds()
    for epoch in range(epochs):
        loader, _ = shards.train_loader(data, batch_size, crop, num_workers=workers, epoch=epoch)
        start = None
        for images, _, _ in loader:
            if start is None:
                start = time.perf_counter()
            else:
                samples += images.shape[0]
        seconds += time.perf_counter() - start
        del loader
        gc.collect()  # shut the workers down now, so their CPU time is counted
    return samples / seconds, (cpu_seconds() - cpu_start) * 1000 / (samples + epochs * batch_size)


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

    with tempfile.TemporaryDirectory() as tmp:
        root = generate(Path(tmp) / "voc", args.images, 1, seed=0, min_size=375, max_size=500)
        pack_split(root, "train", Path(tmp) / "shards", shard_size=args.shard_size, progress=False)
        manifest = str(Path(tmp) / "shards" / "voc-train.json")

        rows = [("raw decode, PIL JPEG + PNG (used)", "-", *raw_decode_rate(root, shards.decode_sample)),
                ("raw decode, torchvision.io JPEG + PNG", "-", *raw_decode_rate(root, decode_with_torchvision))]
        raw = rows[0][2]
        for workers in args.workers:
            for name, data in (("shards", manifest), ("folder", str(root))):
                rows.append((f"{name}, decode + augment (crop {args.crop})", str(workers),
                             *loader_rate(data, workers, args.batch_size, args.crop, args.epochs)))

    print(f"\n{args.images} synthetic images 375-500 px, batch {args.batch_size}, "
          f"{torch.get_num_threads()} torch thread per process\n")
    print("| pipeline | workers | samples/s | / raw decode | CPU ms/sample |")
    print("|---|---|---|---|---|")
    for name, workers, rate, cpu_ms in rows:
        print(f"| {name} | {workers} | {rate:.1f} | {rate / raw:.2f} | {cpu_ms:.2f} |")


if __name__ == "__main__":
    main()
