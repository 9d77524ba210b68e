"""A built-in synthetic dataset in the exact VOCdevkit/VOC2012 layout (and in the
Cityscapes, ADE20K and folder layouts, ``--layout``).

It exists so the demo and the tests run anywhere without downloading VOC. It is
built to exercise what matters on real VOC:

* photo-like JPEGs: smooth lighting, low-frequency clutter, sensor noise, sizes
  that vary (roughly 160-400 px a side), and JPEG artefacts;
* palette label PNGs with 255-valued boundary bands around every object, as in
  VOC's SegmentationClass;
* all 20 object classes, each with its own shape, colour and texture, so a
  small model can learn them;
* VOC-like imbalance: background dominates, person is frequent, sheep, cow,
  bus and pottedplant are rare (in a few percent of images, small, well under
  1% of labelled pixels, as VOC's rarest classes), so losses for class imbalance
  matter.

    python -m segtrain.synthetic --out data/synthetic --train 200 --val 50 --seed 0
    python -m segtrain.synthetic --layout cityscapes --out data/synth_cityscapes
    python -m segtrain.synthetic --layout folder --out data/mine   # 4 classes, classes.txt

The other layouts draw the same scenes and write their labels as those datasets do:
Cityscapes labelIds (an object class becomes one of the 19 evaluated labelIds, or the
ignored "static"; boundaries are "unlabeled" 0), ADE20K indices 1..N with 0 on the
boundaries, and a 4-class folder dataset (background, vehicle, animal, person).
"""
from __future__ import annotations

import argparse
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from . import datasets
from .files import atomic_write_bytes
from .voc import IGNORE_INDEX, NUM_CLASSES, label_to_png_bytes


@dataclass(frozen=True)
class ClassStyle:
    shape: str
    color: tuple[int, int, int]
    texture: str
    weight: float          # relative frequency of the class among objects
    size: tuple[float, float]  # object size as a fraction of the shorter image side


# index -> style; index matches segtrain.voc.CLASSES (0 is background).
STYLES: dict[int, ClassStyle] = {
    1: ClassStyle("cross", (200, 200, 210), "flat", 0.050, (0.35, 0.6)),        # aeroplane
    2: ClassStyle("ring", (30, 60, 160), "flat", 0.030, (0.3, 0.5)),            # bicycle
    3: ClassStyle("ellipse", (140, 90, 40), "dots", 0.050, (0.15, 0.3)),        # bird
    4: ClassStyle("trapezoid", (235, 235, 225), "hstripes", 0.040, (0.3, 0.5)),  # boat
    5: ClassStyle("tall_rect", (40, 150, 60), "vstripes", 0.040, (0.2, 0.35)),   # bottle
    6: ClassStyle("rect", (240, 200, 20), "grid", 0.018, (0.3, 0.45)),           # bus (rare)
    7: ClassStyle("rounded", (200, 30, 30), "flat", 0.070, (0.3, 0.5)),          # car
    8: ClassStyle("ellipse", (240, 140, 30), "diag", 0.060, (0.25, 0.45)),       # cat
    9: ClassStyle("ell", (110, 60, 30), "checker", 0.070, (0.25, 0.4)),          # chair
    10: ClassStyle("blob", (20, 20, 20), "spots", 0.018, (0.2, 0.35)),          # cow (rare)
    11: ClassStyle("wide_rect", (200, 160, 110), "hstripes", 0.040, (0.45, 0.7)),  # diningtable
    12: ClassStyle("ellipse", (210, 170, 70), "noise", 0.060, (0.25, 0.45)),      # dog
    13: ClassStyle("diamond", (150, 70, 40), "flat", 0.040, (0.35, 0.55)),        # horse
    14: ClassStyle("twin", (50, 50, 60), "vstripes", 0.035, (0.3, 0.5)),          # motorbike
    15: ClassStyle("person", (230, 170, 150), "flat", 0.220, (0.35, 0.7)),        # person (frequent)
    16: ClassStyle("triangle", (20, 90, 30), "dots", 0.018, (0.15, 0.25)),        # pottedplant (rare)
    17: ClassStyle("blob", (235, 235, 220), "noise", 0.018, (0.2, 0.3)),          # sheep (rare)
    18: ClassStyle("rounded", (120, 50, 140), "flat", 0.040, (0.4, 0.6)),         # sofa
    19: ClassStyle("wide_rect", (30, 90, 200), "grid", 0.040, (0.5, 0.8)),        # train
    20: ClassStyle("rect", (60, 60, 70), "screen", 0.040, (0.25, 0.4)),           # tvmonitor
}
assert len(STYLES) == NUM_CLASSES - 1
BOUNDARY_WIDTH = 5  # px of 255 around each object (VOC's band is ~5 px wide)


def _shape_mask(shape: str, w: int, h: int, rng: np.random.Generator) -> Image.Image:
    """An 'L' image (0/255) of one object silhouette filling a w x h box."""
    m = Image.new("L", (w, h), 0)
    d = ImageDraw.Draw(m)
    if shape in ("ellipse",):
        d.ellipse([0, 0, w - 1, h - 1], fill=255)
    elif shape in ("rect", "tall_rect", "wide_rect"):
        d.rectangle([0, 0, w - 1, h - 1], fill=255)
    elif shape == "rounded":
        d.rounded_rectangle([0, 0, w - 1, h - 1], radius=min(w, h) // 4, fill=255)
    elif shape == "ring":
        t = max(3, min(w, h) // 6)
        d.ellipse([0, 0, w - 1, h - 1], fill=255)
        d.ellipse([t, t, w - 1 - t, h - 1 - t], fill=0)
    elif shape == "triangle":
        d.polygon([(w // 2, 0), (w - 1, h - 1), (0, h - 1)], fill=255)
    elif shape == "trapezoid":
        d.polygon([(0, h // 3), (w - 1, h // 3), (int(w * 0.8), h - 1), (int(w * 0.2), h - 1)], fill=255)
        d.rectangle([int(w * 0.45), 0, int(w * 0.55), h // 3], fill=255)  # mast
    elif shape == "diamond":
        d.polygon([(w // 2, 0), (w - 1, h // 2), (w // 2, h - 1), (0, h // 2)], fill=255)
    elif shape == "cross":
        d.rectangle([0, int(h * 0.4), w - 1, int(h * 0.6)], fill=255)
        d.rectangle([int(w * 0.4), 0, int(w * 0.6), h - 1], fill=255)
    elif shape == "ell":
        d.rectangle([0, 0, int(w * 0.35), h - 1], fill=255)
        d.rectangle([0, int(h * 0.55), w - 1, int(h * 0.75)], fill=255)
    elif shape == "twin":
        r = min(w // 2, h) - 1
        d.ellipse([0, h - 1 - r, r, h - 1], fill=255)
        d.ellipse([w - 1 - r, h - 1 - r, w - 1, h - 1], fill=255)
        d.rectangle([r // 2, h - r, w - r // 2, h - r // 2], fill=255)
    elif shape == "blob":
        for _ in range(5):
            cw, ch = int(w * rng.uniform(0.4, 0.7)), int(h * rng.uniform(0.4, 0.7))
            x, y = int(rng.uniform(0, w - cw)), int(rng.uniform(0, h - ch))
            d.ellipse([x, y, x + cw, y + ch], fill=255)
    elif shape == "person":
        head = max(4, w // 2)
        d.ellipse([(w - head) // 2, 0, (w + head) // 2, head], fill=255)
        d.ellipse([0, int(head * 0.8), w - 1, h - 1], fill=255)
    else:  # pragma: no cover - STYLES only names shapes handled above
        raise ValueError(shape)
    return m


def _texture(kind: str, w: int, h: int, rng: np.random.Generator) -> np.ndarray:
    """A (h, w) multiplicative brightness pattern around 1.0."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    period = rng.uniform(6, 10)
    if kind == "flat":
        t = np.ones((h, w), np.float32)
    elif kind == "hstripes":
        t = 1 + 0.35 * np.sign(np.sin(2 * np.pi * yy / period))
    elif kind == "vstripes":
        t = 1 + 0.35 * np.sign(np.sin(2 * np.pi * xx / period))
    elif kind == "diag":
        t = 1 + 0.35 * np.sign(np.sin(2 * np.pi * (xx + yy) / period))
    elif kind == "checker":
        t = 1 + 0.3 * np.sign(np.sin(np.pi * xx / period) * np.sin(np.pi * yy / period))
    elif kind == "grid":
        t = np.where((xx % (period * 2) < 3) | (yy % (period * 2) < 3), 0.45, 1.1)
    elif kind == "dots":
        t = np.where((np.sin(2 * np.pi * xx / period) * np.sin(2 * np.pi * yy / period)) > 0.6, 0.45, 1.0)
    elif kind == "spots":  # large white patches on black (cow)
        low = _smooth_noise(w, h, 4, rng)
        t = np.where(low > 0.2, 9.0, 1.0)
    elif kind == "noise":
        t = 1 + 0.25 * rng.standard_normal((h, w)).astype(np.float32)
    elif kind == "screen":  # dark frame, bright inner panel
        t = np.ones((h, w), np.float32)
        t[h // 6: h - h // 6, w // 8: w - w // 8] = 2.8
    else:  # pragma: no cover
        raise ValueError(kind)
    return t.astype(np.float32)


def _smooth_noise(w: int, h: int, cells: int, rng: np.random.Generator) -> np.ndarray:
    """Low-frequency noise in [-1, 1]: random grid values upsampled bicubically."""
    grid = rng.uniform(-1, 1, (cells + 1, cells + 1)).astype(np.float32)
    img = Image.fromarray(grid, mode="F").resize((w, h), Image.BICUBIC)
    return np.clip(np.asarray(img), -1, 1)


def _background(w: int, h: int, rng: np.random.Generator) -> np.ndarray:
    """Sky/ground-like gradient, low-frequency clutter and a muted palette."""
    top = rng.uniform(60, 200, 3)
    bottom = rng.uniform(40, 170, 3)
    ramp = np.linspace(0, 1, h, dtype=np.float32)[:, None, None]
    img = top * (1 - ramp) + bottom * ramp
    img = img * np.ones((1, w, 1), np.float32)
    for cells, amp in ((3, 35), (12, 15)):
        img += amp * np.stack([_smooth_noise(w, h, cells, rng) for _ in range(3)], axis=-1)
    return img


def _pick_classes(rng: np.random.Generator, n: int) -> list[int]:
    ids = np.array(list(STYLES))
    p = np.array([STYLES[c].weight for c in ids])
    return [int(c) for c in rng.choice(ids, size=n, p=p / p.sum())]


def render_sample(width: int, height: int, classes: list[int],
                  rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One (image HxWx3 uint8, label HxW uint8) pair with the given object classes."""
    img = _background(width, height, rng)
    label = np.zeros((height, width), np.uint8)
    boundary = np.zeros((height, width), bool)
    short = min(width, height)
    for c in classes:
        style = STYLES[c]
        s = rng.uniform(*style.size) * short
        aspect = {"tall_rect": 2.2, "wide_rect": 0.45, "person": 2.0, "cross": 0.8,
                  "twin": 0.55, "ell": 1.1}.get(style.shape, rng.uniform(0.7, 1.3))
        ow = int(np.clip(s / np.sqrt(aspect), 12, width - 2))
        oh = int(np.clip(s * np.sqrt(aspect), 12, height - 2))
        x0 = int(rng.integers(0, width - ow + 1))
        y0 = int(rng.integers(0, height - oh + 1))
        sil = np.asarray(_shape_mask(style.shape, ow, oh, rng)) > 127
        region = np.zeros((height, width), bool)
        region[y0:y0 + oh, x0:x0 + ow] = sil
        if not region.any():
            continue
        color = np.array(style.color, np.float32) * rng.uniform(0.85, 1.15)
        shade = np.linspace(1.1, 0.8, oh, dtype=np.float32)[:, None]  # light from above
        tex = _texture(style.texture, ow, oh, rng) * shade
        patch = np.clip(color[None, None] * tex[..., None], 0, 255)
        sub = img[y0:y0 + oh, x0:x0 + ow]
        sub[sil] = patch[sil]
        label[region] = c          # later objects occlude earlier ones
        boundary &= ~region        # an occluder's interior is not a boundary
        boundary |= _band(region)
    img = np.asarray(Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
                     .filter(ImageFilter.GaussianBlur(0.8)), np.float32)
    img += rng.normal(0, 6, img.shape)  # sensor noise
    label[boundary] = IGNORE_INDEX
    return np.clip(img, 0, 255).astype(np.uint8), label


def _band(region: np.ndarray) -> np.ndarray:
    """Pixels within about BOUNDARY_WIDTH/2 of the region's edge, as VOC's void band.

    An object too thin to keep an interior (a bicycle's ring in a small image) gets
    the band outside only, so no object is ever labelled away entirely.
    """
    m = Image.fromarray(region.astype(np.uint8) * 255)
    k = BOUNDARY_WIDTH | 1  # MaxFilter/MinFilter need odd sizes
    grown = np.asarray(m.filter(ImageFilter.MaxFilter(k))) > 127
    shrunk = np.asarray(m.filter(ImageFilter.MinFilter(k))) > 127
    return grown & ~(shrunk if shrunk.any() else region)


def _jpeg_bytes(img: np.ndarray, quality: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _split_plan(num: int, rng: np.random.Generator) -> list[list[int]]:
    """Object classes per image: every class at least once (when num allows), skewed otherwise."""
    plan = [_pick_classes(rng, int(rng.integers(1, 4))) for _ in range(num)]
    # Guarantee coverage: put each class that did not come up into a distinct image.
    present = {c for objs in plan for c in objs}
    missing = [c for c in STYLES if c not in present]
    for slot, c in zip(rng.permutation(num), missing):
        plan[int(slot)].append(c)
    return plan


def generate(out_dir: os.PathLike | str, num_train: int = 200, num_val: int = 50, seed: int = 0,
             min_size: int = 160, max_size: int = 400, quality: int = 90) -> Path:
    """Write ``out_dir/VOCdevkit/VOC2012`` with train and val splits; returns that VOC root.

    Deterministic for a seed. Files are written atomically, so an interrupted run
    never leaves a truncated JPEG or PNG behind.
    """
    if num_train < 1 or num_val < 1:
        raise ValueError("num_train and num_val must be >= 1")
    if not 16 <= min_size <= max_size:
        raise ValueError(f"need 16 <= min_size <= max_size, got {min_size}, {max_size}")
    root = Path(out_dir) / "VOCdevkit" / "VOC2012"
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    splits: dict[str, list[str]] = {}
    index = 0
    for split, num in (("train", num_train), ("val", num_val)):
        ids = []
        for classes in _split_plan(num, rng):
            index += 1
            sid = f"synth_{index:06d}"
            w, h = (int(v) for v in rng.integers(min_size, max_size + 1, size=2))
            image, label = render_sample(w, h, classes, rng)
            atomic_write_bytes(root / "JPEGImages" / f"{sid}.jpg", _jpeg_bytes(image, quality))
            atomic_write_bytes(root / "SegmentationClass" / f"{sid}.png", label_to_png_bytes(label))
            ids.append(sid)
        splits[split] = ids
    splits["trainval"] = splits["train"] + splits["val"]
    for split, ids in splits.items():
        atomic_write_bytes(root / "ImageSets" / "Segmentation" / f"{split}.txt",
                           ("\n".join(ids) + "\n").encode())
    return root


# --------------------------------------------------------------------------- other layouts

LAYOUTS = ("voc", "cityscapes", "ade20k", "folder")
# Synthetic object class -> Cityscapes labelId: the 19 evaluated labelIds, then "static" (4, ignored).
CITYSCAPES_LABEL_IDS = tuple(sorted(k for k, v in enumerate(datasets.CITYSCAPES.label_map)
                                    if v != IGNORE_INDEX)) + (4,)
CITYSCAPES_UNLABELED = 0
FOLDER_CLASSES = ("background", "vehicle", "animal", "person")
FOLDER_SOURCES = {7: 1, 6: 1, 8: 2, 12: 2, 15: 3}  # synthetic class (car, bus, cat, dog, person) -> folder class


def _index_png(label: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(label.astype(np.uint8), mode="L").save(buf, format="PNG")
    return buf.getvalue()


def _png_bytes(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def _layout_label(layout: str, label: np.ndarray) -> np.ndarray:
    """A synthetic VOC-index label as the dataset's files store it."""
    if layout == "cityscapes":
        table = np.full(256, CITYSCAPES_UNLABELED, np.uint8)
        table[1:NUM_CLASSES] = CITYSCAPES_LABEL_IDS[: NUM_CLASSES - 1]
        table[0] = CITYSCAPES_LABEL_IDS[0]  # background is road
        return table[label]
    if layout == "ade20k":
        table = np.zeros(256, np.uint8)  # boundaries -> 0, "other objects" (ignored)
        table[:NUM_CLASSES] = np.arange(1, NUM_CLASSES + 1)
        return table[label]
    table = np.zeros(256, np.uint8)  # folder: unlisted classes never occur (see the plan)
    for source, target in FOLDER_SOURCES.items():
        table[source] = target
    table[IGNORE_INDEX] = IGNORE_INDEX
    return table[label]


def generate_layout(out_dir: os.PathLike | str, layout: str, num_train: int = 20, num_val: int = 8,
                    seed: int = 0, min_size: int = 160, max_size: int = 400, quality: int = 90) -> Path:
    """Write a synthetic dataset in ``layout``; returns the folder to pack (``--root``)."""
    if layout == "voc":
        return generate(out_dir, num_train, num_val, seed, min_size, max_size, quality)
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; one of {', '.join(LAYOUTS)}")
    if num_train < 1 or num_val < 1:
        raise ValueError("num_train and num_val must be >= 1")
    out = Path(out_dir)
    root = out / "ADEChallengeData2016" if layout == "ade20k" else out
    rng = np.random.default_rng(seed)
    index = 0
    for split, num in (("train", num_train), ("val", num_val)):
        if layout == "folder":
            plan = [[int(c) for c in rng.choice(list(FOLDER_SOURCES), size=int(rng.integers(1, 4)))]
                    for _ in range(num)]
        else:
            plan = _split_plan(num, rng)
        for classes in plan:
            index += 1
            w, h = (int(v) for v in rng.integers(min_size, max_size + 1, size=2))
            image, label = render_sample(w, h, classes, rng)
            label = _layout_label(layout, label)
            if layout == "cityscapes":
                city = ("aachen", "bochum")[index % 2]
                stem = f"{city}_{index:06d}_000019"
                atomic_write_bytes(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png", _png_bytes(image))
                atomic_write_bytes(root / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png", _index_png(label))
            elif layout == "ade20k":
                folder = datasets.ADE_SPLIT_DIRS[split]
                stem = f"ADE_{split}_{index:08d}"
                atomic_write_bytes(root / "images" / folder / f"{stem}.jpg", _jpeg_bytes(image, quality))
                atomic_write_bytes(root / "annotations" / folder / f"{stem}.png", _index_png(label))
            else:  # folder: JPEG and PNG images side by side, as users' folders have
                stem = f"img_{index:04d}"
                data = _png_bytes(image) if index % 3 == 0 else _jpeg_bytes(image, quality)
                suffix = "png" if index % 3 == 0 else "jpg"
                atomic_write_bytes(root / "images" / split / f"{stem}.{suffix}", data)
                atomic_write_bytes(root / "masks" / split / f"{stem}.png", _index_png(label))
    if layout == "folder":
        atomic_write_bytes(root / datasets.FOLDER_CLASSES, ("\n".join(FOLDER_CLASSES) + "\n").encode())
    return root


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m segtrain.synthetic", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output folder (voc: receives VOCdevkit/VOC2012)")
    ap.add_argument("--layout", choices=LAYOUTS, default="voc", help="dataset layout to write (default: voc)")
    ap.add_argument("--train", type=int, default=200, help="number of train images")
    ap.add_argument("--val", type=int, default=50, help="number of val images")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--min-size", type=int, default=160)
    ap.add_argument("--max-size", type=int, default=400)
    args = ap.parse_args(argv)
    root = generate_layout(args.out, args.layout, args.train, args.val, args.seed, args.min_size, args.max_size)
    print(f"wrote {args.train} train + {args.val} val images to {root}\n"
          f"pack it: python tools/pack.py --dataset {args.layout} --root {root} --split train --out shards/")


if __name__ == "__main__":
    main()
