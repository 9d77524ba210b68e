"""Figures: the one home of plotting code (dataset overview now; reports and SAM later).

Class names and colours come from a ``DatasetSpec`` (the manifest's or checkpoint's).

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

from .cli import user_errors
from .datasets import IGNORE_INDEX, VOC, DatasetSpec, decode_target
from .files import DataError
from .loaders import image_classes, iter_samples
from .sources import DataSource, resolve_data


def object_classes(spec: DatasetSpec) -> list[int]:
    """Every class but the one called "background" (if the dataset has one)."""
    return [c for c in range(spec.num_classes) if c != spec.background]


def overlay(image: np.ndarray, mask: np.ndarray, alpha: float = 0.5, spec: DatasetSpec = VOC) -> np.ndarray:
    """Blend the dataset's class colours over an (H, W, 3) uint8 image.

    A class called "background" stays transparent so the photo shows; other classes
    and the 255 ignore band (cream) are blended with weight ``alpha``.
    """
    image = np.asarray(image, dtype=np.uint8)
    mask = np.asarray(mask)
    if image.shape[:2] != mask.shape:
        raise ValueError(f"overlay: image is {image.shape[:2]} but mask is {mask.shape}")
    colours = decode_target(mask, spec).astype(np.float32)
    painted = (mask != spec.background)[..., None] if spec.background is not None else np.ones_like(mask, bool)[..., None]
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
                       classes: Optional[Iterable[int]] = None) -> list[str]:
    """Up to ``k`` image ids that together show as many of ``classes`` (default: every
    class that occurs) as possible.

    Greedy set cover: take the image adding the most not-yet-shown classes; once
    nothing new can be added, fill up with the images showing the most classes.
    Ties go to the smaller id, so the choice is deterministic.
    """
    wanted = set(classes) if classes is not None else {c for cls in image_classes.values() for c in cls}
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



def covering_ids(source: DataSource, k: int) -> list[str]:
    """``k`` ids of ``source`` that together show as many object classes as possible (figures, report, SAM)."""
    return greedy_class_cover(image_classes(source), k, object_classes(source.spec))


def _legend_handles(spec: DatasetSpec, classes: Iterable[int]) -> list[Patch]:
    colormap = spec.colormap()
    return [Patch(facecolor=colormap[c] / 255, edgecolor="0.5", label=spec.classes[c]) for c in classes] + [
        Patch(facecolor=colormap[IGNORE_INDEX] / 255, edgecolor="0.5", label="ignore (255)")]


LEGEND_COLUMNS = 11


def legend_inches(num_classes_shown: int) -> float:
    """Height of the colour legend under a grid: rows of LEGEND_COLUMNS entries (the classes and 255)."""
    return 0.25 + 0.2 * -(-(num_classes_shown + 1) // LEGEND_COLUMNS)


def image_grid(rows: Sequence[Sequence[Optional[np.ndarray]]], col_titles: Optional[Sequence[str]] = None,
               row_titles: Optional[Sequence[str]] = None, out: Optional[os.PathLike | str] = None,
               legend: bool = True, titles: Optional[Sequence[Sequence[str]]] = None,
               tile_inches: float = 1.8, spec: DatasetSpec = VOC,
               legend_classes: Optional[Sequence[int]] = None) -> Figure:
    """A grid of images (RGB uint8 or anything ``imshow`` takes); ``None`` leaves a tile empty.

    ``col_titles`` go above the columns, ``row_titles`` left of the rows, ``titles``
    above single tiles. ``legend`` adds ``spec``'s class colours (``legend_classes``,
    default all, and 255) under the grid. Saved atomically to ``out`` when given.
    """
    num_rows, num_cols = len(rows), max(len(row) for row in rows)
    shown = list(range(spec.num_classes) if legend_classes is None else legend_classes)
    legend_height = legend_inches(len(shown)) if legend else 0.0
    fig = Figure(figsize=(tile_inches * num_cols, tile_inches * num_rows + legend_height))
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
        fig.legend(handles=_legend_handles(spec, shown), loc="lower center", ncol=LEGEND_COLUMNS,
                   fontsize=7, frameon=False, handlelength=1.2, columnspacing=1.0)
        fig.subplots_adjust(bottom=legend_height / fig.get_figheight())
    if out is not None:
        save_figure(fig, out)
    return fig


def dataset_figure(data: str, out: os.PathLike | str, split: str = "train", k: int = 20,
                   pairs_per_row: int = 5) -> list[str]:
    """``k`` images chosen to cover every object class, each beside its coloured ground truth.

    20 images -> 4 rows of 5 (image, label) pairs = 10 columns, with a class legend.
    Returns the chosen ids, in figure order (row by row).
    """
    source = resolve_data(data, split)
    spec = source.spec
    chosen = covering_ids(source, k)
    if not chosen:
        raise DataError(f"{data}: split {split!r} has no images")
    samples = {sid: (np.asarray(image), label) for sid, image, label in iter_samples(source, chosen)}
    rows, titles, present = [], [], set()
    for start in range(0, len(chosen), pairs_per_row):
        row, row_titles = [], []
        for sid in chosen[start:start + pairs_per_row]:
            image, label = samples[sid]
            classes = [int(c) for c in np.unique(label) if c != IGNORE_INDEX]
            present.update(classes)
            names = ", ".join(spec.classes[c] for c in classes if c != spec.background)
            row += [image, decode_target(label, spec)]
            row_titles += [sid, names]
        rows.append(row)
        titles.append(row_titles)
    # A 21-class legend fits; ADE20K's 150 would not: then only the classes shown.
    image_grid(rows, out=out, legend=True, titles=titles, spec=spec,
               legend_classes=None if spec.num_classes <= 33 else sorted(present))
    return chosen


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m segtrain.visualize", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    ds = sub.add_parser("dataset", help="images covering the dataset's classes beside their ground truth")
    ds.add_argument("--data", required=True, help="shard manifest, shard pattern or VOCdevkit folder")
    ds.add_argument("--out", default="figures/dataset.png", help="output image (default: %(default)s)")
    ds.add_argument("--split", default="train")
    ds.add_argument("--k", type=int, default=20, help="number of images (default: %(default)s)")
    args = ap.parse_args(argv)
    with user_errors():
        if args.command == "dataset":
            ids = dataset_figure(args.data, args.out, args.split, args.k)
            print(f"wrote {args.out} ({len(ids)} images: {' '.join(ids)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
