"""PASCAL VOC 2012: class names, the palette, label colours and the folder's split lists.

Labels are palette ("P" mode) PNGs whose pixel values ARE the class indices
(0..20, 255 = ignore/boundary). Decoding them (never converting to RGB: a colour
conversion would destroy the indices) is ``segtrain.datasets``' (``decode_label``,
``load_pair``, with the ``VOC`` spec), as is the folder dataset ``VOCSegmentation``.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from .files import DataError, PathLike, atomic_write_bytes

CLASSES: tuple[str, ...] = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car",
    "cat", "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person",
    "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)
NUM_CLASSES = len(CLASSES)  # 21
IGNORE_INDEX = 255
VALID_LABEL_VALUES = frozenset(range(NUM_CLASSES)) | {IGNORE_INDEX}


def voc_colormap(n: int = 256) -> np.ndarray:
    """The standard VOC palette: bits of the class index interleaved into R, G, B.

    Index 255 comes out as (224, 224, 192), the colour of VOC's boundary pixels.
    """
    cmap = np.zeros((n, 3), dtype=np.uint8)
    for i in range(n):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        cmap[i] = (r, g, b)
    return cmap


COLORMAP = voc_colormap()
PALETTE: list[int] = COLORMAP.flatten().tolist()  # PIL putpalette() format


def decode_target(label: np.ndarray) -> np.ndarray:
    """Class-index mask (H, W) -> RGB image (H, W, 3) uint8 in VOC colours."""
    return COLORMAP[np.asarray(label, dtype=np.uint8)]


def encode_target(rgb: np.ndarray) -> np.ndarray:
    """RGB VOC-coloured mask (H, W, 3) -> class indices (H, W) uint8.

    The inverse of ``decode_target`` on the 21 classes and 255. A colour not in
    the palette raises, because guessing a class would corrupt the label.
    """
    rgb = np.asarray(rgb, dtype=np.uint8)
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"encode_target expects an (H, W, 3) RGB array, got shape {rgb.shape}")
    codes = (rgb[..., 0].astype(np.int32) << 16) | (rgb[..., 1].astype(np.int32) << 8) | rgb[..., 2]
    lut = {int(c[0]) << 16 | int(c[1]) << 8 | int(c[2]): i
           for i, c in enumerate(COLORMAP) if i in VALID_LABEL_VALUES}
    out = np.full(codes.shape, -1, dtype=np.int32)
    for code, index in lut.items():
        out[codes == code] = index
    if (out < 0).any():
        bad = np.unique(rgb[out < 0].reshape(-1, 3), axis=0)[:5].tolist()
        raise ValueError(f"encode_target: colours not in the VOC palette, e.g. {bad}")
    return out.astype(np.uint8)


def label_to_png_bytes(label: np.ndarray) -> bytes:
    """Encode a class-index mask as a VOC palette PNG."""
    img = Image.fromarray(np.asarray(label, dtype=np.uint8), mode="P")
    img.putpalette(PALETTE)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def save_label_png(label: np.ndarray, path: PathLike) -> None:
    """Write a class-index mask as a palette PNG, atomically."""
    atomic_write_bytes(path, label_to_png_bytes(label))


def read_split(voc_root: PathLike, split: str) -> list[str]:
    """Ids listed in ``ImageSets/Segmentation/{split}.txt``."""
    path = Path(voc_root) / "ImageSets" / "Segmentation" / f"{split}.txt"
    if not path.is_file():
        avail = sorted(p.stem for p in path.parent.glob("*.txt")) if path.parent.is_dir() else []
        raise DataError(f"{path}: missing split list for split {split!r}"
                        + (f" (available: {', '.join(avail)})" if avail else ""))
    ids = [line.split()[0] for line in path.read_text().splitlines() if line.strip()]
    if not ids:
        raise DataError(f"{path}: split list is empty")
    return ids


def default_label_dir(split: str) -> str:
    """SBD's train_aug split lives in SegmentationClassAug; everything else in SegmentationClass."""
    return "SegmentationClassAug" if split == "train_aug" else "SegmentationClass"
