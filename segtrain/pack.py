"""Pack a VOC split into webdataset tar shards plus a JSON manifest.

    python tools/pack.py --voc-root datasets/data/VOCdevkit/VOC2012 --split train --out shards/
    python tools/pack.py --voc-root ... --split train_aug          # SBD, SegmentationClassAug labels
    (``python -m segtrain.pack`` is the same command)

Each sample's key is its VOC id and carries the ORIGINAL JPEG and label PNG
bytes (no re-encoding). Every pair is decoded and checked first (missing or
corrupt JPEG, missing label, non-index label, values outside 0..20 and 255,
image/label size mismatch): a bad pair stops the run with an error naming the id,
or with --skip-bad is skipped and listed in the manifest.

Shards are written under temporary names and renamed when complete, the manifest
``voc-{split}.json`` last; a previous manifest is removed first. So an
interrupted run leaves no half-written shard and no manifest that looks
finished, and a rerun produces byte-identical shards (fixed tar metadata).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import sys
import warnings
from pathlib import Path
from typing import Optional

import numpy as np
from tqdm import tqdm

from . import integrity
from .io import (MANIFEST_FORMAT, DataError, atomic_write_bytes, check_manifest, naming_write_errors, read_bytes,
                 read_manifest, sha256_file)
from .voc import CLASSES, IGNORE_INDEX, NUM_CLASSES, VOCSegmentation, default_label_dir, load_pair

# First bytes of the image formats PIL reads, and the file suffix (webdataset key) of each.
_IMAGE_MAGIC = ((b"\xff\xd8\xff", "jpg"), (b"\x89PNG\r\n\x1a\n", "png"), (b"BM", "bmp"), (b"GIF8", "gif"),
                (b"II*\x00", "tif"), (b"MM\x00*", "tif"))


def image_key(data: bytes) -> Optional[str]:
    """The file suffix (webdataset key) of an encoded image's real format, from its first bytes;
    None when it is none of the known ones."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return next((key for magic, key in _IMAGE_MAGIC if data.startswith(magic)), None)


def check_sample(args: tuple[str, Path, Path]) -> dict:
    """Read and validate one pair. Returns the raw bytes and label statistics, or the error."""
    sid, img_path, lbl_path = args
    try:
        jpg, png = read_bytes(img_path, "image"), read_bytes(lbl_path, "label")
        image, label = load_pair(jpg, png, sid)
    except DataError as e:
        return {"id": sid, "error": str(e)}
    counts = np.bincount(label.ravel(), minlength=256)
    return {"id": sid, "jpg": jpg, "png": png, "width": image.size[0], "height": image.size[1],
            "class_pixels": counts[:NUM_CLASSES].tolist(), "ignore_pixels": int(counts[IGNORE_INDEX])}


class ShardWriter:
    """Writes ``{prefix}-{index:06d}.tar`` shards atomically (temp name, then rename)."""

    def __init__(self, out_dir: Path, prefix: str, shard_size: int):
        self.out_dir, self.prefix, self.shard_size = out_dir, prefix, shard_size
        self.shards: list[dict] = []
        self._writer = None
        self._tmp: Optional[Path] = None
        self._ids: list[str] = []

    def write(self, sid: str, jpg: bytes, png: bytes) -> None:
        with naming_write_errors(self.out_dir / self._next_name()):  # a full disk: one line, no temp file
            self._write(sid, jpg, png)

    def _next_name(self) -> str:
        return f"{self.prefix}-{len(self.shards):06d}.tar"

    def _write(self, sid: str, jpg: bytes, png: bytes) -> None:
        if self._writer is None:
            name = self._next_name()
            self._tmp = self.out_dir / f".{name}.tmp"
            import webdataset as wds  # here, so reading manifests does not import torch

            # mtime=0 and fixed owner make the tar bytes a pure function of the input.
            self._writer = wds.TarWriter(open(self._tmp, "wb"), encoder=False, mtime=0,
                                         user="segtrain", group="segtrain")
            self._name = name
        self._writer.write({"__key__": sid, "jpg": jpg, "png": png})
        self._ids.append(sid)
        if len(self._ids) == self.shard_size:
            self._close_shard()

    def close_shard(self) -> None:
        with naming_write_errors(self.out_dir / self._next_name()):
            self._close_shard()

    def _close_shard(self) -> None:
        if self._writer is None:
            return
        self._writer.close()
        self._writer.stream.close()
        with open(self._tmp, "rb+") as f:
            os.fsync(f.fileno())
        final = self.out_dir / self._name
        os.replace(self._tmp, final)
        self.shards.append({"file": self._name, "samples": len(self._ids),
                            "bytes": final.stat().st_size, "sha256": sha256_file(final),
                            "ids": self._ids})
        self._writer, self._tmp, self._ids = None, None, []

    def abort(self) -> None:
        """Drop the shard in progress (after an error): no temp file is left behind."""
        if self._writer is not None:
            # Closing flushes, which fails again on a full disk: remove the temp file regardless.
            with contextlib.suppress(Exception):
                self._writer.close()
            with contextlib.suppress(Exception):
                self._writer.stream.close()
            self._tmp.unlink(missing_ok=True)
            self._writer, self._tmp, self._ids = None, None, []


def _size_stats(values: list[int]) -> dict:
    if not values:
        return {"min": 0, "max": 0, "mean": 0.0}
    return {"min": int(min(values)), "max": int(max(values)), "mean": round(float(np.mean(values)), 2)}


def pack_split(voc_root: os.PathLike | str, split: str, out_dir: os.PathLike | str,
               shard_size: int = 256, workers: int = 1, skip_bad: bool = False,
               label_dir: Optional[str] = None, progress: bool = True) -> dict:
    """Pack one split; returns the manifest (also written to ``out_dir/voc-{split}.json``)."""
    if shard_size < 1:
        raise ValueError(f"--shard-size must be >= 1, got {shard_size}")
    dataset = VOCSegmentation(voc_root, split, label_dir=label_dir or default_label_dir(split))
    if not (dataset.root / dataset.label_dir).is_dir():
        raise DataError(f"{dataset.root / dataset.label_dir}: label folder not found "
                        f"(use --label-dir; SBD's train_aug needs SegmentationClassAug)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    prefix = f"voc-{split}"
    manifest_path = out / f"{prefix}.json"
    manifest_path.unlink(missing_ok=True)  # no stale manifest may vouch for half-new shards
    for stale in out.glob(f".{prefix}-*.tar.tmp"):
        stale.unlink()

    jobs = [(sid, *dataset.paths(i)) for i, sid in enumerate(dataset.ids)]
    writer = ShardWriter(out, prefix, shard_size)
    class_pixels = np.zeros(NUM_CLASSES, np.int64)
    class_images = np.zeros(NUM_CLASSES, np.int64)
    ignore_pixels = 0
    widths, heights, skipped = [], [], []
    image_classes: dict[str, list[int]] = {}
    misnamed: list[str] = []  # images whose bytes are not the JPEG their .jpg name says
    # The default start method (fork on Linux) avoids re-importing torch in every worker.
    pool = mp.Pool(workers) if workers > 1 else None
    try:
        results = pool.imap(check_sample, jobs, chunksize=8) if pool else map(check_sample, jobs)
        for r in tqdm(results, total=len(jobs), desc=f"pack {split}", unit="img", disable=not progress):
            if "error" in r:
                if not skip_bad:
                    raise DataError(f"{r['error']} (rerun with --skip-bad to skip and list bad pairs)")
                skipped.append({"id": r["id"], "error": r["error"]})
                continue
            writer.write(r["id"], r["jpg"], r["png"])
            if image_key(r["jpg"]) != "jpg":
                misnamed.append(f"{r['id']} ({image_key(r['jpg']) or 'unknown format'})")
            pixels = np.asarray(r["class_pixels"], np.int64)
            class_pixels += pixels
            class_images += pixels > 0
            ignore_pixels += r["ignore_pixels"]
            widths.append(r["width"])
            heights.append(r["height"])
            image_classes[r["id"]] = np.flatnonzero(pixels).tolist()
        writer.close_shard()
    except BaseException:
        writer.abort()
        raise
    finally:
        if pool:
            pool.terminate()
    if not writer.shards:
        raise DataError(f"{dataset.root}: split {split!r} has no valid samples")
    if misnamed:
        warnings.warn(f"{dataset.root}: {len(misnamed)} image(s) named .jpg hold another format, packed "
                      f"unchanged under the 'jpg' key (decoding reads the real format): {', '.join(misnamed[:5])}"
                      + (" ..." if len(misnamed) > 5 else ""), stacklevel=2)
    # Shards beyond this run's count (an older run with a smaller --shard-size) are not ours any more.
    keep = {s["file"] for s in writer.shards}
    for old in out.glob(f"{prefix}-[0-9]*.tar"):
        if old.name not in keep:
            old.unlink()

    manifest = {
        "format": MANIFEST_FORMAT,
        "split": split,
        "num_samples": sum(s["samples"] for s in writer.shards),
        "num_shards": len(writer.shards),
        "shards": writer.shards,
        "class_names": list(CLASSES),
        "class_pixel_counts": class_pixels.tolist(),
        "class_image_counts": class_images.tolist(),
        "ignore_pixel_count": int(ignore_pixels),
        "labelled_pixel_count": int(class_pixels.sum()),
        "image_size": {"height": _size_stats(heights), "width": _size_stats(widths)},
        "image_classes": image_classes,
        "source_root": str(Path(voc_root).resolve()),
        "label_dir": dataset.label_dir,
        "skipped": skipped,
    }
    atomic_write_bytes(manifest_path, (json.dumps(manifest, indent=1) + "\n").encode())
    return manifest


def main(argv: Optional[list[str]] = None) -> int:
    words = sys.argv[1:] if argv is None else list(argv)
    if any(w == "--verify" or w.startswith("--verify=") for w in words):
        return integrity.main(words)
    ap = argparse.ArgumentParser(prog="python tools/pack.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--verify", metavar="MANIFEST",
                    help="instead of packing: check every shard of MANIFEST (sha256, sample count); exit 0 or 2")
    ap.add_argument("--voc-root", required=True, help="the VOCdevkit/VOC2012 folder")
    ap.add_argument("--split", required=True, help="train, val, trainval or train_aug")
    ap.add_argument("--out", default="shards", help="output folder (default: shards/)")
    ap.add_argument("--label-dir", default=None,
                    help="label folder (default: SegmentationClassAug for train_aug, else SegmentationClass)")
    ap.add_argument("--shard-size", type=int, default=256, help="samples per shard")
    ap.add_argument("--workers", type=int, default=1, help="processes that decode and check pairs")
    ap.add_argument("--skip-bad", action="store_true", help="skip bad pairs and list them in the manifest")
    args = ap.parse_args(argv)
    try:
        m = pack_split(args.voc_root, args.split, args.out, args.shard_size, args.workers,
                       args.skip_bad, args.label_dir)
    except DataError as e:
        print(f"pack.py: error: {e}", file=sys.stderr)
        return 1
    print(f"packed {m['num_samples']} samples into {m['num_shards']} shards "
          f"-> {Path(args.out) / ('voc-' + args.split + '.json')}"
          + (f" ({len(m['skipped'])} bad pairs skipped, listed in the manifest)" if m["skipped"] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
