"""Figures: the one home of plotting code (dataset overview now; reports and SAM later).

Uses matplotlib's object-oriented API on ``Figure`` objects (Agg canvas, no pyplot
state), so it runs headless and never leaks figures.

    python -m segtrain.visualize dataset --data shards/voc-train.json --out figures/dataset.png
"""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Optional

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from .shards import image_classes, iter_samples
from .io import DataError
from .voc import CLASSES, COLORMAP, IGNORE_INDEX, decode_target

OBJECT_CLASSES = range(1, len(CLASSES))  # 1..20: everything but background


def overlay(image: np.ndarray, mask: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend VOC class colours over an (H, W, 3) uint8 image.

    Background (0) stays transparent so the photo shows; objects and the 255
    ignore/boundary band (VOC's cream colour) are blended with weight ``alpha``.
    """
    image = np.asarray(image, dtype=np.uint8)
    mask = np.asarray(mask)
    if image.shape[:2] != mask.shape:
        raise ValueError(f"overlay: image is {image.shape[:2]} but mask is {mask.shape}")
    colours = decode_target(mask).astype(np.float32)
    painted = (mask != 0)[..., None]
    blended = np.where(painted, (1 - alpha) * image + alpha * colours, image)
    return np.round(blended).astype(np.uint8)


def save_figure(fig: Figure, path: os.PathLike | str, dpi: int = 100) -> Path:
    """Write ``fig`` atomically (temporary file in the same folder, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        fig.savefig(tmp, format=path.suffix.lstrip(".") or "png", dpi=dpi, bbox_inches="tight")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def greedy_class_cover(image_classes: dict[str, list[int]], k: int = 20,
                       classes: Iterable[int] = OBJECT_CLASSES) -> list[str]:
    """Up to ``k`` image ids that together show as many of ``classes`` as possible.

    Greedy set cover: take the image adding the most not-yet-shown classes; once
    nothing new can be added, fill up with the images showing the most classes.
    Ties go to the smaller id, so the choice is deterministic.
    """
    wanted = set(classes)
    present = {sid: set(cls) & wanted for sid, cls in image_classes.items()}
    uncovered = set(wanted)
    chosen: list[str] = []
    candidates = sorted(present)
    while candidates and len(chosen) < k:
        # max() keeps the first of equal keys: candidates are sorted, so ties -> smaller id.
        best = max(candidates, key=lambda sid: (len(present[sid] & uncovered), len(present[sid])))
        chosen.append(best)
        candidates.remove(best)
        uncovered -= present[best]
    return chosen



def covering_ids(data: str, split: str, k: int) -> list[str]:
    """``k`` ids of ``split`` that together show as many classes as possible (figures, report, SAM)."""
    return greedy_class_cover(image_classes(data, split), k)

def _legend_handles(classes: Iterable[int]) -> list[Patch]:
    return [Patch(facecolor=COLORMAP[c] / 255, edgecolor="0.5", label=CLASSES[c]) for c in classes] + [
        Patch(facecolor=COLORMAP[IGNORE_INDEX] / 255, edgecolor="0.5", label="ignore (255)")]


def image_grid(rows: Sequence[Sequence[Optional[np.ndarray]]], col_titles: Optional[Sequence[str]] = None,
               row_titles: Optional[Sequence[str]] = None, out: Optional[os.PathLike | str] = None,
               legend: bool = True, titles: Optional[Sequence[Sequence[str]]] = None,
               tile_inches: float = 1.8) -> Figure:
    """A grid of images (RGB uint8 or anything ``imshow`` takes); ``None`` leaves a tile empty.

    ``col_titles`` go above the columns, ``row_titles`` left of the rows, ``titles``
    above single tiles. ``legend`` adds the VOC class colours (all 21 classes and
    255) under the grid. Saved atomically to ``out`` when given.
    """
    num_rows, num_cols = len(rows), max(len(row) for row in rows)
    legend_inches = 0.5 if legend else 0.0
    fig = Figure(figsize=(tile_inches * num_cols, tile_inches * num_rows + legend_inches))
    axes = fig.subplots(num_rows, num_cols, squeeze=False)
    for r in range(num_rows):
        for c in range(num_cols):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            tile = rows[r][c] if c < len(rows[r]) else None
            if tile is None:
                ax.set_axis_off()
                continue
            ax.imshow(tile, interpolation="nearest")
            heading = []
            if r == 0 and col_titles is not None and c < len(col_titles):
                heading.append(col_titles[c])
            if titles is not None and c < len(titles[r]):
                heading.append(titles[r][c])
            if any(heading):
                ax.set_title("\n".join(h for h in heading if h), fontsize=7)
            if c == 0 and row_titles is not None and r < len(row_titles):
                ax.set_ylabel(row_titles[r], fontsize=8)
    if legend:
        fig.legend(handles=_legend_handles(range(len(CLASSES))), loc="lower center", ncol=11,
                   fontsize=7, frameon=False, handlelength=1.2, columnspacing=1.0)
        fig.subplots_adjust(bottom=legend_inches / fig.get_figheight())
    if out is not None:
        save_figure(fig, out)
    return fig


def dataset_figure(data: str, out: os.PathLike | str, split: str = "train", k: int = 20,
                   pairs_per_row: int = 5) -> list[str]:
    """``k`` images chosen to cover every object class, each beside its coloured ground truth.

    20 images -> 4 rows of 5 (image, label) pairs = 10 columns, with a class legend.
    Returns the chosen ids, in figure order (row by row).
    """
    chosen = covering_ids(data, split, k)
    if not chosen:
        raise DataError(f"{data}: split {split!r} has no images")
    samples = {sid: (np.asarray(image), label) for sid, image, label in iter_samples(data, split, chosen)}
    rows, titles = [], []
    for start in range(0, len(chosen), pairs_per_row):
        row, row_titles = [], []
        for sid in chosen[start:start + pairs_per_row]:
            image, label = samples[sid]
            names = ", ".join(CLASSES[c] for c in np.unique(label) if c not in (0, IGNORE_INDEX))
            row += [image, decode_target(label)]
            row_titles += [sid, names]
        rows.append(row)
        titles.append(row_titles)
    image_grid(rows, out=out, legend=True, titles=titles)
    return chosen


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m segtrain.visualize", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    ds = sub.add_parser("dataset", help="images covering all 20 classes beside their ground truth")
    ds.add_argument("--data", required=True, help="shard manifest, shard pattern or VOCdevkit folder")
    ds.add_argument("--out", default="figures/dataset.png", help="output image (default: %(default)s)")
    ds.add_argument("--split", default="train")
    ds.add_argument("--k", type=int, default=20, help="number of images (default: %(default)s)")
    args = ap.parse_args(argv)
    try:
        if args.command == "dataset":
            ids = dataset_figure(args.data, args.out, args.split, args.k)
            print(f"wrote {args.out} ({len(ids)} images: {' '.join(ids)})")
    except DataError as e:
        print(f"visualize: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
