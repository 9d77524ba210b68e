"""Class balance of a packed split, read from its shard manifest.

    python -m segtrain.stats shards/voc-train.json [--plot figures/class_balance.png]

Prints, per class, the pixel share (% of labelled pixels; 255 "ignore" pixels
excluded) and the image share (% of images containing the class), and can draw
both as a bar chart. The counts come from the manifest that tools/pack.py
writes, so no image is decoded here.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional, Sequence, Union

from matplotlib.figure import Figure

from segtrain.cli import user_errors
from segtrain.datasets import spec_from_manifest
from segtrain.files import PathLike
from segtrain.sources import check_manifest, read_manifest
from segtrain.visualize import save_figure

def class_balance(manifest: dict) -> list[dict]:
    """One row per class, in class-index order.

    Keys: ``name``, ``pixels``, ``pixel_share`` (fraction of labelled pixels),
    ``images``, ``image_share`` (fraction of images containing the class).
    Shares are 0 for an empty split rather than a division error.
    """
    check_manifest(manifest, f"manifest for split {manifest.get('split', '?')!r}"
                   if isinstance(manifest, dict) else "manifest")
    labelled = manifest["labelled_pixel_count"]
    num_images = manifest["num_samples"]
    return [
        {"name": name, "pixels": pixels, "pixel_share": pixels / labelled if labelled else 0.0,
         "images": images, "image_share": images / num_images if num_images else 0.0}
        for name, pixels, images in zip(manifest["class_names"], manifest["class_pixel_counts"],
                                        manifest["class_image_counts"])
    ]


def rarest_classes(manifest: dict, k: int = 5) -> list[int]:
    """The ``k`` object classes (a class called background excluded) with the fewest labelled
    pixels, rarest first.

    The classes on which an imbalance-aware loss should make a difference; classes
    with no pixels at all are left out (nothing can be learned or measured there).
    """
    counts = manifest["class_pixel_counts"]
    background = spec_from_manifest(manifest).background
    present = [c for c in range(len(counts)) if counts[c] > 0 and c != background]
    return sorted(present, key=lambda c: (counts[c], c))[:k]


def format_table(manifest: dict) -> str:
    """The class-balance table with a totals line, as ``main`` prints it."""
    rows = class_balance(manifest)
    name_width = max(len("class"), *(len(r["name"]) for r in rows))
    lines = [f"{'idx':>3}  {'class':<{name_width}}  {'pixels':>15}  {'pixel %':>8}  {'images':>7}  {'image %':>8}"]
    for index, r in enumerate(rows):
        lines.append(f"{index:>3}  {r['name']:<{name_width}}  {r['pixels']:>15,}  {100 * r['pixel_share']:>8.3f}"
                     f"  {r['images']:>7,}  {100 * r['image_share']:>8.2f}")
    labelled, ignored = manifest["labelled_pixel_count"], manifest["ignore_pixel_count"]
    all_pixels = labelled + ignored
    ignored_pct = 100 * ignored / all_pixels if all_pixels else 0.0
    lines.append(f"total: {manifest['num_samples']:,} images, {labelled:,} labelled pixels, "
                 f"{ignored:,} ignore (255) pixels ({ignored_pct:.2f}% of all pixels)")
    return "\n".join(lines)


def plot_class_balance(manifest_or_rows: Union[dict, Sequence[dict]], out_path: PathLike,
                       title: Optional[str] = None, image_share: bool = True) -> Path:
    """Bar chart of pixel share per class (log scale), plus image share when ``image_share``.

    Bars use the dataset's class colours (the manifest's spec; VOC's for a manifest
    without one, and for bare rows), so the chart reads like the label maps.
    Written atomically; returns ``out_path``. Works on a manifest or on
    ``class_balance`` rows.
    """
    if isinstance(manifest_or_rows, dict):
        rows = class_balance(manifest_or_rows)
        colormap = spec_from_manifest(manifest_or_rows).colormap()
    else:
        rows = list(manifest_or_rows)
        colormap = spec_from_manifest({"class_names": [r["name"] for r in rows]}).colormap()
    out_path = Path(out_path)
    names = [r["name"] for r in rows]
    colours = colormap[: len(rows)] / 255.0
    positions = range(len(rows))

    # A bare Figure renders with Agg and touches no pyplot global state, so
    # it is safe in scripts, tests and worker threads alike.
    fig = Figure(figsize=(max(8.0, 0.45 * len(rows)), 7.5 if image_share else 4.5), layout="constrained")
    axes = fig.subplots(2 if image_share else 1, 1, sharex=True, squeeze=False)[:, 0]

    pixel_pct = [100 * r["pixel_share"] for r in rows]
    ax = axes[0]
    ax.bar(positions, pixel_pct, color=colours, edgecolor="0.3", linewidth=0.5)
    # Log scale: background holds ~70% of VOC's pixels, bottles well under 1%.
    ax.set_yscale("log")
    ax.set_ylabel("% of labelled pixels (log)")
    ax.grid(axis="y", which="major", alpha=0.3)
    ax.set_title(title or "Class balance")
    if image_share:
        ax = axes[1]
        ax.bar(positions, [100 * r["image_share"] for r in rows], color=colours, edgecolor="0.3", linewidth=0.5)
        ax.set_ylabel("% of images containing class")
        ax.set_ylim(0, 100)
        ax.grid(axis="y", alpha=0.3)
    axes[-1].set_xticks(list(positions), names, rotation=60, ha="right", rotation_mode="anchor")

    return save_figure(fig, out_path, dpi=120)


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m segtrain.stats",
                                     description="Per-class pixel and image share of a packed split.")
    parser.add_argument("manifest", type=Path, help="shard manifest, e.g. shards/voc-train.json")
    parser.add_argument("--plot", type=Path, metavar="PNG", help="also write a bar chart here")
    parser.add_argument("--title", help="chart title (default: names the manifest)")
    args = parser.parse_args(argv)
    with user_errors():
        manifest = read_manifest(args.manifest)
        print(f"{args.manifest} (split {manifest.get('split', '?')!r}, dataset "
              f"{spec_from_manifest(manifest, str(args.manifest)).name})")
        print(format_table(manifest))
        if args.plot:
            title = args.title or f"Class balance of {args.manifest.name}"
            print(f"wrote {plot_class_balance(manifest, args.plot, title)}")


if __name__ == "__main__":
    main()
