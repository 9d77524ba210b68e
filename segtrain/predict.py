"""Segment images with a checkpoint: palette index PNGs plus colour overlays.

    python -m segtrain.predict --checkpoint runs/x/best.pt --input photo.jpg --out preds/
    python -m segtrain.predict --checkpoint runs/x/best.pt --input images/ --out preds/ --protocol ms-flip

For each image ``ID.jpg`` it writes ``preds/ID.png`` (class indices, in the palette of the
checkpoint's dataset spec, VOC's for checkpoints without one: it opens as a coloured mask and ``np.array(Image.open(...))`` gives the indices back) and
``preds/ID_overlay.jpg`` (the prediction blended over the photo). A folder is read
non-recursively (jpg, jpeg, png, bmp, sorted by name); unreadable images are reported
and skipped. The exit status is nonzero only when nothing could be written.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

import numpy as np
import PIL.Image
import torch
from tqdm import tqdm

from segtrain import autotune, hardware
from segtrain.cli import user_errors
from segtrain.datasets import decode_image, save_label_png, spec_from_checkpoint
from segtrain.inference import predict_mask
from segtrain.files import DataError, save_image
from segtrain.model import load_checkpoint
from segtrain.visualize import overlay

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")
PROTOCOLS = ("whole", "ms-flip")

__all__ = ["IMAGE_SUFFIXES", "list_images", "main"]


def list_images(path: Path) -> list[Path]:
    """``path`` itself, or the images directly inside the folder ``path``, sorted."""
    if path.is_dir():
        return sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if path.is_file():
        return [path]
    raise DataError(f"{path}: no such image or folder")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m segtrain.predict",
                                     description="Segment images: palette index PNGs and overlays.")
    parser.add_argument("--checkpoint", required=True, type=Path, help="checkpoint file, e.g. runs/x/best.pt")
    parser.add_argument("--input", required=True, type=Path, help="an image, or a folder of images")
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument("--protocol", choices=PROTOCOLS, default="whole",
                        help="ms-flip: average over 6 scales and flips (12 forward passes per image)")
    parser.add_argument("--alpha", type=float, default=0.5, help="overlay opacity of the mask colours")
    parser.add_argument("--overlay-format", choices=("jpg", "png"), default="jpg")
    parser.add_argument("--mixed-precision", choices=hardware.PRECISIONS, default="auto",
                        help=hardware.PRECISION_HELP)
    args = parser.parse_args(argv)
    if not 0.0 <= args.alpha <= 1.0:
        parser.error(f"--alpha must be in [0, 1], got {args.alpha}")
    return args


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    with user_errors():
        paths = list_images(args.input)
        if not paths:
            raise DataError(f"{args.input}: no {'/'.join(s[1:] for s in IMAGE_SUFFIXES)} images in this folder")
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        model, ckpt = load_checkpoint(args.checkpoint)
        model.to(device).eval()
        amp = autotune.inference_autocast(args.mixed_precision, device, model)
        spec = spec_from_checkpoint(ckpt, str(args.checkpoint))

    written, skipped = 0, []
    seen: dict[str, Path] = {}
    for path in tqdm(paths, unit="img", desc="predict", disable=len(paths) == 1, dynamic_ncols=True):
        sid = path.stem
        try:
            if sid in seen:  # a.jpg and a.png would write the same outputs
                raise DataError(f"{path}: same name as {seen[sid].name}, whose outputs it would overwrite")
            seen[sid] = path
            try:
                data = path.read_bytes()
            except OSError as e:
                raise DataError(f"{path}: cannot read ({e.strerror or e})") from None
            image = decode_image(data, str(path))
        except DataError as e:
            tqdm.write(f"warning: skipped {e}", file=sys.stderr)
            skipped.append(path)
            continue
        mask = predict_mask(model, image, device, args.protocol, amp)
        save_label_png(mask, args.out / f"{sid}.png", spec)
        blended = PIL.Image.fromarray(overlay(np.asarray(image), mask, args.alpha, spec))
        save_image(blended, args.out / f"{sid}_overlay.{args.overlay_format}")
        written += 1

    print(f"{written} written, {len(skipped)} skipped -> {args.out}")
    if not written:
        sys.exit(1)


if __name__ == "__main__":
    main()
