"""Pack a dataset split into webdataset tar shards plus a JSON manifest.

    python tools/pack.py --dataset voc --root datasets/data/VOCdevkit/VOC2012 --split train --out shards/
    python tools/pack.py --voc-root datasets/data/VOCdevkit/VOC2012 --split train_aug   # SBD labels
    python tools/pack.py --dataset cityscapes --root data/cityscapes --split train
    python tools/pack.py --dataset ade20k --root data/ADEChallengeData2016 --split val
    python tools/pack.py --dataset folder --root data/mine --split train   # images/ masks/ classes.txt
    (``python -m segtrain.pack`` is the same command)

Each sample's key is its id and carries the ORIGINAL image and label bytes (no
re-encoding): a JPEG image under ``jpg`` with its label under ``png`` (VOC, ADE20K),
a PNG image under ``png`` with its label under ``label.png`` (Cityscapes). Every pair
is decoded and checked first (missing or corrupt image, missing label, non-index
label, values that are neither a class nor ignore after the dataset's label map,
image/label size mismatch): a bad pair stops the run with an error naming the sample,
or with --skip-bad is skipped and listed in the manifest. The manifest carries the
dataset spec (segtrain/datasets.py: classes, palette, ignore index, label map) and
per-class counts of the MAPPED labels.

Shards are written under temporary names and renamed when complete, the manifest
``{name}-{split}.json`` (``voc-{split}.json`` for VOC) last; a previous manifest is
removed first. So an interrupted run leaves no half-written shard and no manifest
that looks finished, and a rerun produces byte-identical shards (fixed tar metadata).
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import multiprocessing as mp
import os
import re
import sys
from pathlib import Path
from typing import Optional, Union

import numpy as np
from tqdm import tqdm

from . import integrity
from .cli import user_errors
from .datasets import DATASETS, IGNORE_INDEX, DatasetSpec, dataset_spec, load_pair
from .files import DataError, atomic_write_bytes, naming_write_errors, read_bytes, sha256_file
from .sources import MANIFEST_FORMAT
from .voc import default_label_dir

# Sample ids become tar member names (webdataset groups members by the text before the
# first dot) and output file names: letters, digits, '_' and '-' only.
PLAIN_ID = re.compile(r"[A-Za-z0-9_-]+")
PNG_MAGIC, JPEG_MAGIC = b"\x89PNG\r\n\x1a\n", b"\xff\xd8"


def image_key(data: bytes) -> str:
    """The webdataset key an image is stored under: its real type, ``jpg`` or ``png``."""
    return "png" if data.startswith(PNG_MAGIC) else "jpg"


def label_key(image: str) -> str:
    """``png`` beside a JPEG (VOC's layout); ``label.png`` beside a PNG image."""
    return "png" if image == "jpg" else "label.png"


def check_sample(job: tuple[str, Path, Path], spec: DatasetSpec) -> dict:
    """Read and validate one pair. Returns the raw bytes and label statistics, or the error."""
    sid, img_path, lbl_path = job
    try:
        if not PLAIN_ID.fullmatch(sid):
            raise DataError(f"{img_path}: id {sid!r} is not a plain name (letters, digits, '_', '-'); rename it")
        image_bytes, png = read_bytes(img_path, "image"), read_bytes(lbl_path, "label")
        if not image_bytes.startswith((PNG_MAGIC, JPEG_MAGIC)):
            raise DataError(f"{img_path}: not a JPEG or PNG image")
        image, label = load_pair(image_bytes, png, sid, spec, files=(img_path, lbl_path))
    except DataError as e:
        return {"id": sid, "error": str(e)}
    counts = np.bincount(label.ravel(), minlength=256)
    return {"id": sid, "image": image_bytes, "png": png, "width": image.size[0], "height": image.size[1],
            "class_pixels": counts[:spec.num_classes].tolist(), "ignore_pixels": int(counts[IGNORE_INDEX])}


class ShardWriter:
    """Writes ``{prefix}-{index:06d}.tar`` shards atomically (temp name, then rename)."""

    def __init__(self, out_dir: Path, prefix: str, shard_size: int):
        self.out_dir, self.prefix, self.shard_size = out_dir, prefix, shard_size
        self.shards: list[dict] = []
        self._writer = None
        self._tmp: Optional[Path] = None
        self._ids: list[str] = []

    def write(self, sid: str, image: bytes, png: bytes) -> None:
        with naming_write_errors(self.out_dir / self._next_name()):  # a full disk: one line, no temp file
            self._write(sid, image, png)

    def _next_name(self) -> str:
        return f"{self.prefix}-{len(self.shards):06d}.tar"

    def _write(self, sid: str, image: bytes, png: bytes) -> None:
        if self._writer is None:
            name = self._next_name()
            self._tmp = self.out_dir / f".{name}.tmp"
            import webdataset as wds  # here, so reading manifests does not import torch

            # mtime=0 and fixed owner make the tar bytes a pure function of the input.
            self._writer = wds.TarWriter(open(self._tmp, "wb"), encoder=False, mtime=0,
                                         user="segtrain", group="segtrain")
            self._name = name
        kind = image_key(image)
        self._writer.write({"__key__": sid, kind: image, label_key(kind): png})
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


def shard_prefix(spec: DatasetSpec, split: str) -> str:
    """``voc-{split}`` for VOC (as before specs existed), ``{name}-{split}`` for the others."""
    return f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', spec.name)}-{split}"


def pack_split(root: os.PathLike | str, split: str, out_dir: os.PathLike | str,
               shard_size: int = 256, workers: int = 1, skip_bad: bool = False,
               label_dir: Optional[str] = None, progress: bool = True,
               dataset: Union[str, DatasetSpec] = "voc") -> dict:
    """Pack one split of ``dataset`` (a DATASETS name or a spec) found under ``root``.

    Returns the manifest (also written to ``out_dir/{prefix}.json``, see ``shard_prefix``).
    """
    if shard_size < 1:
        raise ValueError(f"--shard-size must be >= 1, got {shard_size}")
    spec = dataset_spec(dataset, root) if isinstance(dataset, str) else dataset.at(root)
    if spec.layout == "voc":
        label_dir = label_dir or default_label_dir(split)
    jobs = spec.list_pairs(root, split, label_dir)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    prefix = shard_prefix(spec, split)
    manifest_path = out / f"{prefix}.json"
    manifest_path.unlink(missing_ok=True)  # no stale manifest may vouch for half-new shards
    for stale in out.glob(f".{prefix}-*.tar.tmp"):
        stale.unlink()

    writer = ShardWriter(out, prefix, shard_size)
    class_pixels = np.zeros(spec.num_classes, np.int64)
    class_images = np.zeros(spec.num_classes, np.int64)
    ignore_pixels = 0
    widths, heights, skipped = [], [], []
    image_classes: dict[str, list[int]] = {}
    # The default start method (fork on Linux) avoids re-importing torch in every worker.
    pool = mp.Pool(workers) if workers > 1 else None
    try:
        check = functools.partial(check_sample, spec=spec)
        results = pool.imap(check, jobs, chunksize=8) if pool else map(check, jobs)
        for r in tqdm(results, total=len(jobs), desc=f"pack {split}", unit="img", disable=not progress):
            if "error" in r:
                if not skip_bad:
                    raise DataError(f"{r['error']} (rerun with --skip-bad to skip and list bad pairs)")
                skipped.append({"id": r["id"], "error": r["error"]})
                continue
            writer.write(r["id"], r["image"], r["png"])
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
        raise DataError(f"{root}: split {split!r} has no valid samples")
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
        "class_names": list(spec.classes),
        "class_pixel_counts": class_pixels.tolist(),
        "class_image_counts": class_images.tolist(),
        "ignore_pixel_count": int(ignore_pixels),
        "labelled_pixel_count": int(class_pixels.sum()),
        "image_size": {"height": _size_stats(heights), "width": _size_stats(widths)},
        "image_classes": image_classes,
        "source_root": str(Path(root).resolve()),
        "label_dir": label_dir,
        "skipped": skipped,
        "dataset": spec.to_dict(),
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
    ap.add_argument("--dataset", choices=list(DATASETS), default="voc",
                    help="layout and classes of --root (segtrain/datasets.py; default: voc)")
    where = ap.add_mutually_exclusive_group(required=True)
    where.add_argument("--root", help="the dataset folder (VOCdevkit/VOC2012, the Cityscapes root, "
                                      "ADEChallengeData2016, or your folder with images/ masks/ classes.txt)")
    where.add_argument("--voc-root", help="the VOCdevkit/VOC2012 folder (same as --dataset voc --root)")
    ap.add_argument("--split", required=True, help="voc: train, val, trainval or train_aug; others: train or val")
    ap.add_argument("--out", default="shards", help="output folder (default: shards/)")
    ap.add_argument("--label-dir", default=None,
                    help="label folder (voc default: SegmentationClassAug for train_aug, else SegmentationClass)")
    ap.add_argument("--shard-size", type=int, default=256, help="samples per shard")
    ap.add_argument("--workers", type=int, default=1, help="processes that decode and check pairs")
    ap.add_argument("--skip-bad", action="store_true", help="skip bad pairs and list them in the manifest")
    args = ap.parse_args(argv)
    if args.voc_root and args.dataset != "voc":
        ap.error("--voc-root is for --dataset voc; use --root")
    with user_errors():
        m = pack_split(args.root or args.voc_root, args.split, args.out, args.shard_size, args.workers,
                       args.skip_bad, args.label_dir, dataset=args.dataset)
    name = shard_prefix(DatasetSpec.from_dict(m["dataset"]), args.split) + ".json"
    print(f"packed {m['num_samples']} samples ({len(m['class_names'])} classes) into {m['num_shards']} shards "
          f"-> {Path(args.out) / name}"
          + (f" ({len(m['skipped'])} bad pairs skipped, listed in the manifest)" if m["skipped"] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
