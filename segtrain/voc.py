"""PASCAL VOC 2012: class names, the palette, label I/O and the folder dataset.

Labels are palette ("P" mode) PNGs whose pixel values ARE the class indices
(0..20, 255 = ignore/boundary). They are read with ``np.array(Image.open(p))``
and never converted to RGB: a colour conversion would destroy the indices.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Callable, Optional

import numpy as np
from PIL import Image, UnidentifiedImageError

from .files import DataError, PathLike, atomic_write_bytes, read_bytes

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


def decode_image(data: bytes, name: str) -> Image.Image:
    """JPEG (or any PIL image) bytes -> RGB PIL image; a clear DataError when corrupt."""
    try:
        img = Image.open(io.BytesIO(data))
        img.load()  # force the full decode now so truncation is caught here
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise DataError(f"{name}: corrupt or unreadable image ({e})") from None
    return img.convert("RGB")


def decode_label(data: bytes, name: str) -> np.ndarray:
    """Label PNG bytes -> (H, W) uint8 class indices, validated.

    Accepts palette ("P") and single-channel ("L") index images, as VOC's
    SegmentationClass and SBD's SegmentationClassAug use. Never converts colour.
    """
    label = read_index_png(data, name)
    check_label_values(label, name)
    return label


def read_index_png(data: bytes, name: str) -> np.ndarray:
    """Index PNG bytes -> (H, W) uint8 raw values (palette "P" or grayscale "L"), unchecked."""
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise DataError(f"{name}: corrupt or unreadable label PNG ({e})") from None
    if img.mode not in ("P", "L"):
        raise DataError(
            f"{name}: label is a {img.mode!r} image, not an index image (palette 'P' or "
            "grayscale 'L'); colourised labels must be converted with segtrain.voc.encode_target")
    return np.array(img, dtype=np.uint8)


def check_label_values(label: np.ndarray, name: str) -> None:
    present = np.unique(label)
    bad = [int(v) for v in present if int(v) not in VALID_LABEL_VALUES]
    if bad:
        raise DataError(f"{name}: label values {bad[:10]} outside 0..{NUM_CLASSES - 1} and {IGNORE_INDEX}")


def load_pair(image_bytes: bytes, label_bytes: bytes, name: str) -> tuple[Image.Image, np.ndarray]:
    """Decode and validate one (image, label) pair; sizes must match."""
    image = decode_image(image_bytes, f"{name} (image)")
    label = decode_label(label_bytes, f"{name} (label)")
    if (label.shape[1], label.shape[0]) != image.size:
        raise DataError(
            f"{name}: image is {image.size[0]}x{image.size[1]} but label is "
            f"{label.shape[1]}x{label.shape[0]} (width x height)")
    return image, label


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


class VOCSegmentation:
    """Map-style dataset over a ``VOCdevkit/VOC2012`` folder.

    ``__getitem__`` returns ``(image, mask)`` with ``image`` an RGB PIL image and
    ``mask`` an (H, W) uint8 array of class indices, or whatever ``transforms``
    makes of that pair. ``ids[i]`` is the VOC id of sample ``i``.
    """

    def __init__(self, root: PathLike, split: str = "train",
                 transforms: Optional[Callable] = None, label_dir: Optional[str] = None):
        self.root = Path(root)
        if not (self.root / "JPEGImages").is_dir():
            raise DataError(f"{self.root}: not a VOC root (no JPEGImages folder); "
                            "pass the VOCdevkit/VOC2012 folder")
        self.split = split
        self.label_dir = label_dir or default_label_dir(split)
        self.transforms = transforms
        self.ids = read_split(self.root, split)

    def __len__(self) -> int:
        return len(self.ids)

    def paths(self, index: int) -> tuple[Path, Path]:
        sid = self.ids[index]
        return self.root / "JPEGImages" / f"{sid}.jpg", self.root / self.label_dir / f"{sid}.png"

    def load_raw(self, index: int) -> tuple[bytes, bytes]:
        """The original JPEG and PNG bytes (what the shard packer stores)."""
        img_path, lbl_path = self.paths(index)
        return read_bytes(img_path, "image (JPEG)"), read_bytes(lbl_path, "label (PNG)")

    def __getitem__(self, index: int):
        image, label = load_pair(*self.load_raw(index), name=self.ids[index])
        if self.transforms is not None:
            return self.transforms(image, label)
        return image, label
