"""What a dataset is, as a value: class names, colours, ignore label, label lookup table,
splits, and where its (image, label) pairs live under a root folder.

    spec = DATASETS["cityscapes"]                 # or dataset_spec("folder", root)
    pairs = spec.list_pairs(root, "train")         # [(id, image path, label path), ...]
    image, label = load_pair(jpg, png, name, spec) # label mapped through spec.label_map

A ``DatasetSpec`` travels as a plain dict (``to_dict`` / ``from_dict``): the packer
writes it into the shard manifest, training copies it into best.pt / final.pt, and
every later step (evaluate, predict, report, sam, visualize, stats) reads class names
and colours from there, never from an import.

Mapped labels always use 255 for "ignore" (the loss, the metrics and the crop padding
rely on it); a dataset whose files use other values for void pixels maps them to 255
with ``label_map``, a 256-entry table raw value -> class index, 255 (ignore) or -1 (a
value that must not occur: decoding a label that has it fails, naming the file).

Built-in datasets (``DATASETS``): adding one means adding a spec and, if its files are
laid out in a new way, a ``list_pairs`` function to ``LAYOUTS``: both in this file.

* ``voc``: PASCAL VOC 2012 (VOCdevkit/VOC2012; train, val, trainval, and train_aug with
  SBD's SegmentationClassAug), 21 classes, labels are the class indices;
* ``cityscapes``: leftImg8bit/{split}/CITY/*_leftImg8bit.png with
  gtFine/{split}/CITY/*_gtFine_labelIds.png, the official labelId -> 19 trainIds, the
  other labelIds ignored;
* ``ade20k``: ADEChallengeData2016/images/{training,validation}/*.jpg with
  annotations/.../*.png, 150 classes; 0 ("other") is ignored and 1..150 shift down by 1;
* ``folder``: your own data, no code: images/{split}/*.{jpg,png}, masks/{split}/*.png
  (index PNGs, same stem) and classes.txt (one name per line) or dataset.yaml (see
  ``folder_spec``).

Checkpoints and manifests older than the spec carry none: they are read as VOC
(``spec_from_checkpoint``, ``spec_from_manifest``).
"""
from __future__ import annotations

import dataclasses
import functools
import io
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
from PIL import Image, UnidentifiedImageError

from . import voc
from .files import DataError, PathLike, atomic_write_bytes, read_bytes

IGNORE_INDEX = 255  # the ignore label of mapped masks, everywhere in segtrain
MAX_CLASSES = 255   # uint8 masks, 255 reserved for ignore
IGNORE_COLOUR = tuple(int(v) for v in voc.COLORMAP[IGNORE_INDEX])  # VOC's cream boundary colour

Pair = tuple[str, Path, Path]  # (sample id, image path, label path)


def default_palette(num_classes: int) -> tuple[tuple[int, int, int], ...]:
    """The VOC bit-interleaving colormap's first ``num_classes`` colours."""
    return tuple(tuple(int(v) for v in rgb) for rgb in voc.voc_colormap(256)[:num_classes])


@dataclass(frozen=True)
class DatasetSpec:
    """A dataset as data. ``layout`` names the ``LAYOUTS`` function that lists its pairs."""

    name: str
    classes: tuple[str, ...]
    palette: tuple[tuple[int, int, int], ...] = ()  # one RGB per class; () = VOC colormap
    ignore_index: int = IGNORE_INDEX
    label_map: Optional[tuple[int, ...]] = None      # 256 entries raw -> class / 255 / -1; None = identity
    splits: tuple[str, ...] = ("train", "val")
    layout: str = "folder"

    def __post_init__(self) -> None:
        where = f"dataset spec {self.name!r}"
        object.__setattr__(self, "classes", tuple(str(c) for c in self.classes))
        if not self.classes and self.layout != "folder":
            raise DataError(f"{where}: no class names")
        if len(self.classes) > MAX_CLASSES:
            raise DataError(f"{where}: {len(self.classes)} classes; at most {MAX_CLASSES} fit uint8 masks")
        if len(set(self.classes)) != len(self.classes):
            raise DataError(f"{where}: class names repeat")
        if self.ignore_index != IGNORE_INDEX:
            raise DataError(f"{where}: ignore_index must be {IGNORE_INDEX} after mapping; map the files' "
                            "void value to it with label_map")
        palette = tuple(tuple(int(v) for v in rgb) for rgb in self.palette) or default_palette(len(self.classes))
        if len(palette) != len(self.classes) or any(len(rgb) != 3 or not all(0 <= v <= 255 for v in rgb)
                                                    for rgb in palette):
            raise DataError(f"{where}: palette needs one [R, G, B] (0..255) per class "
                            f"({len(self.classes)}), got {len(palette)} entries")
        object.__setattr__(self, "palette", palette)
        object.__setattr__(self, "splits", tuple(self.splits))
        if self.label_map is not None:
            table = tuple(int(v) for v in self.label_map)
            allowed = set(range(len(self.classes))) | {IGNORE_INDEX, -1}
            if len(table) != 256 or not set(table) <= allowed:
                raise DataError(f"{where}: label_map must have 256 entries, each a class index, "
                                f"{IGNORE_INDEX} (ignore) or -1 (not allowed)")
            object.__setattr__(self, "label_map", table)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def background(self) -> Optional[int]:
        """The index of a class called "background" (left transparent in overlays), if any."""
        names = [c.lower() for c in self.classes]
        return names.index("background") if "background" in names else None

    def colormap(self) -> np.ndarray:
        """(256, 3) uint8: class colours, the ignore colour at 255, VOC colours elsewhere."""
        return _colormap(self.palette)

    def to_dict(self) -> dict:
        """JSON-ready: what manifests and checkpoints store."""
        return {"name": self.name, "classes": list(self.classes), "palette": [list(c) for c in self.palette],
                "ignore_index": self.ignore_index,
                "label_map": None if self.label_map is None else list(self.label_map),
                "splits": list(self.splits), "layout": self.layout}

    @classmethod
    def from_dict(cls, data: Any, where: str = "dataset spec") -> "DatasetSpec":
        if not isinstance(data, Mapping) or not isinstance(data.get("classes"), list) or "name" not in data:
            raise DataError(f"{where}: dataset spec must be a mapping with name and classes")
        known = {f.name for f in dataclasses.fields(cls)}
        try:
            return cls(**{k: v for k, v in data.items() if k in known})
        except DataError as e:
            raise DataError(f"{where}: {e}") from None
        except (TypeError, ValueError) as e:
            raise DataError(f"{where}: bad dataset spec ({e})") from None

    def at(self, root: PathLike) -> "DatasetSpec":
        """The spec of the data under ``root``: built-ins are fixed, ``folder`` reads its files."""
        return folder_spec(root) if self.layout == "folder" and not self.classes else self

    def list_pairs(self, root: PathLike, split: str, label_dir: Optional[str] = None) -> list[Pair]:
        """(id, image path, label path) of ``split`` under ``root``, sorted by id."""
        if self.layout not in LAYOUTS:
            raise DataError(f"dataset {self.name!r}: unknown layout {self.layout!r}; "
                            f"known: {', '.join(LAYOUTS)}")
        return LAYOUTS[self.layout](Path(root), split, label_dir)

    def map_label(self, raw: np.ndarray, name: str) -> np.ndarray:
        """Raw label values -> class indices (255 = ignore), checked: an unknown value names ``name``."""
        if self.label_map is None:
            label = raw
        else:
            table = _lut(self.label_map)
            mapped = table[raw]
            if (mapped < 0).any():
                bad = np.unique(raw[mapped < 0]).tolist()
                raise DataError(f"{name}: label values {bad[:10]} are not in the {self.name} label map")
            label = mapped.astype(np.uint8)
        present = np.unique(label)
        bad = [int(v) for v in present if v >= self.num_classes and v != IGNORE_INDEX]
        if bad:
            raise DataError(f"{name}: label values {bad[:10]} outside 0..{self.num_classes - 1} and {IGNORE_INDEX}"
                            f" ({self.name}: {self.num_classes} classes)")
        return label


@functools.lru_cache(maxsize=16)
def _colormap(palette: tuple[tuple[int, int, int], ...]) -> np.ndarray:
    cmap = voc.voc_colormap(256)
    cmap[: len(palette)] = palette
    cmap[IGNORE_INDEX] = IGNORE_COLOUR
    cmap.flags.writeable = False
    return cmap


@functools.lru_cache(maxsize=16)
def _lut(table: tuple[int, ...]) -> np.ndarray:
    return np.asarray(table, dtype=np.int16)


def table_from_mapping(mapping: Mapping[int, int], default: int = -1) -> tuple[int, ...]:
    """A 256-entry label_map from ``{raw value: class}``; other values get ``default``."""
    table = [default] * 256
    for raw, mapped in mapping.items():
        table[int(raw)] = int(mapped)
    return tuple(table)


# ----------------------------------------------------------------------------- decoding

def decode_image(data: bytes, name: str) -> Image.Image:
    """JPEG (or any PIL image) bytes -> RGB PIL image; a clear DataError when corrupt."""
    try:
        img = Image.open(io.BytesIO(data))
        img.load()  # force the full decode now so truncation is caught here
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise DataError(f"{name}: corrupt or unreadable image ({e})") from None
    return img.convert("RGB")


def read_index_png(data: bytes, name: str) -> np.ndarray:
    """Index PNG bytes -> (H, W) uint8 raw values (palette "P" or grayscale "L"), unchecked.

    Accepts palette and single-channel index images, as VOC's SegmentationClass and SBD's
    SegmentationClassAug use; never converts colour (that would destroy the indices)."""
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


def decode_label(data: bytes, name: str, spec: DatasetSpec) -> np.ndarray:
    """Label PNG bytes -> (H, W) uint8 class indices, mapped through ``spec`` and checked."""
    return spec.map_label(read_index_png(data, name), name)


def load_pair(image_bytes: bytes, label_bytes: bytes, name: str, spec: DatasetSpec,
              files: Optional[tuple[PathLike, PathLike]] = None) -> tuple[Image.Image, np.ndarray]:
    """Decode one (image, label) pair (JPEG or PNG image), mapped; sizes must match.

    Errors name the sample ``name`` and, given ``files`` (image path, label path), the file."""
    image_name, label_name = (f"{name} ({files[0]})", f"{name} ({files[1]})") if files else \
        (f"{name} (image)", f"{name} (label)")
    image = decode_image(image_bytes, image_name)
    label = decode_label(label_bytes, label_name, spec)
    if (label.shape[1], label.shape[0]) != image.size:
        raise DataError(
            f"{name}: image is {image.size[0]}x{image.size[1]} but label is "
            f"{label.shape[1]}x{label.shape[0]} (width x height)")
    return image, label


def decode_target(label: np.ndarray, spec: DatasetSpec) -> np.ndarray:
    """Class-index mask (H, W) -> RGB (H, W, 3) uint8 in the dataset's colours."""
    return spec.colormap()[np.asarray(label, dtype=np.uint8)]


def label_to_png_bytes(label: np.ndarray, spec: DatasetSpec) -> bytes:
    """A class-index mask as a palette PNG in the dataset's colours (indices read back unchanged)."""
    img = Image.fromarray(np.asarray(label, dtype=np.uint8), mode="P")
    img.putpalette(spec.colormap().flatten().tolist())
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def save_label_png(label: np.ndarray, path: PathLike, spec: DatasetSpec) -> None:
    atomic_write_bytes(path, label_to_png_bytes(label, spec))


# ----------------------------------------------------------------------------- layouts

def _voc_pairs(root: Path, split: str, label_dir: Optional[str]) -> list[Pair]:
    dataset = VOCSegmentation(root, split, label_dir=label_dir)
    if not (dataset.root / dataset.label_dir).is_dir():
        raise DataError(f"{dataset.root / dataset.label_dir}: label folder not found "
                        f"(use --label-dir; SBD's train_aug needs SegmentationClassAug)")
    return [(sid, *dataset.paths(i)) for i, sid in enumerate(dataset.ids)]


def _split_dir(folder: Path, split: str, what: str) -> Path:
    if not (folder / split).is_dir():
        have = sorted(p.name for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []
        raise DataError(f"{folder / split}: no {what} folder for split {split!r}"
                        + (f" (available: {', '.join(have)})" if have else ""))
    return folder / split


def _nonempty(pairs: list[Pair], where: Path, split: str) -> list[Pair]:
    if not pairs:
        raise DataError(f"{where}: split {split!r} has no images")
    return pairs


def _cityscapes_pairs(root: Path, split: str, label_dir: Optional[str]) -> list[Pair]:
    images = _split_dir(root / "leftImg8bit", split, "leftImg8bit")
    labels = root / (label_dir or "gtFine") / split
    pairs = []
    for path in sorted(images.glob("*/*_leftImg8bit.png")):
        stem = path.name[: -len("_leftImg8bit.png")]
        pairs.append((stem, path, labels / path.parent.name / f"{stem}_gtFine_labelIds.png"))
    return _nonempty(pairs, images, split)


ADE_SPLIT_DIRS = {"train": "training", "val": "validation"}


def _ade20k_pairs(root: Path, split: str, label_dir: Optional[str]) -> list[Pair]:
    if (root / "ADEChallengeData2016").is_dir():
        root = root / "ADEChallengeData2016"
    folder = ADE_SPLIT_DIRS.get(split, split)
    images = _split_dir(root / "images", folder, "images")
    labels = root / (label_dir or "annotations") / folder
    pairs = [(p.stem, p, labels / f"{p.stem}.png") for p in sorted(images.glob("*.jpg"))]
    return _nonempty(pairs, images, split)


FOLDER_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def _folder_pairs(root: Path, split: str, label_dir: Optional[str]) -> list[Pair]:
    images = _split_dir(root / "images", split, "images")
    labels = root / (label_dir or "masks") / split
    pairs, seen = [], {}
    for path in sorted(p for p in images.iterdir() if p.suffix.lower() in FOLDER_IMAGE_SUFFIXES):
        if path.stem in seen:
            raise DataError(f"{path}: same stem as {seen[path.stem].name}; each image needs its own name")
        seen[path.stem] = path
        pairs.append((path.stem, path, labels / f"{path.stem}.png"))
    return _nonempty(pairs, images, split)


LAYOUTS: dict[str, Callable[[Path, str, Optional[str]], list[Pair]]] = {
    "voc": _voc_pairs, "cityscapes": _cityscapes_pairs, "ade20k": _ade20k_pairs, "folder": _folder_pairs,
}


# ----------------------------------------------------------------------------- built-in specs

VOC = DatasetSpec("voc", voc.CLASSES, splits=("train", "val", "trainval", "train_aug"), layout="voc")

# (labelId, trainId name, colour) of the 19 Cityscapes evaluation classes, in trainId order
# (cityscapesScripts' labels.py); every other labelId is ignored.
_CITYSCAPES = (
    (7, "road", (128, 64, 128)), (8, "sidewalk", (244, 35, 232)), (11, "building", (70, 70, 70)),
    (12, "wall", (102, 102, 156)), (13, "fence", (190, 153, 153)), (17, "pole", (153, 153, 153)),
    (19, "traffic light", (250, 170, 30)), (20, "traffic sign", (220, 220, 0)),
    (21, "vegetation", (107, 142, 35)), (22, "terrain", (152, 251, 152)), (23, "sky", (70, 130, 180)),
    (24, "person", (220, 20, 60)), (25, "rider", (255, 0, 0)), (26, "car", (0, 0, 142)),
    (27, "truck", (0, 0, 70)), (28, "bus", (0, 60, 100)), (31, "train", (0, 80, 100)),
    (32, "motorcycle", (0, 0, 230)), (33, "bicycle", (119, 11, 32)),
)
CITYSCAPES = DatasetSpec(
    "cityscapes", tuple(n for _, n, _ in _CITYSCAPES), tuple(c for _, _, c in _CITYSCAPES),
    label_map=table_from_mapping({label_id: train_id for train_id, (label_id, _, _) in enumerate(_CITYSCAPES)},
                                 default=IGNORE_INDEX),
    splits=("train", "val"), layout="cityscapes")

ADE20K_CLASSES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass", "cabinet",
    "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water",
    "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk",
    "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
    "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand",
    "path", "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge",
    "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove",
    "palm", "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus",
    "towel", "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver",
    "airplane", "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle",
    "buffet", "poster", "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything",
    "swimming pool", "stool", "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven",
    "ball", "food", "step", "tank", "trade name", "microwave", "pot", "animal", "bicycle", "lake",
    "dishwasher", "screen", "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray",
    "ashcan", "fan", "pier", "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator",
    "glass", "clock", "flag",
)
ADE20K = DatasetSpec(
    "ade20k", ADE20K_CLASSES,
    # VOC colours 1..150: index 0's black would hide "wall" in figures.
    palette=tuple(tuple(int(v) for v in rgb) for rgb in voc.voc_colormap(256)[1:151]),
    # The SceneParsing benchmark's reduce_zero_label: 0 ("other objects") is ignored, 1..150 -> 0..149.
    label_map=table_from_mapping({0: IGNORE_INDEX, **{v: v - 1 for v in range(1, 151)}}),
    splits=("train", "val"), layout="ade20k")

# A folder dataset's classes come from its own files (``at(root)`` reads them).
FOLDER = DatasetSpec("folder", (), splits=("train", "val"), layout="folder")

DATASETS: dict[str, DatasetSpec] = {"voc": VOC, "cityscapes": CITYSCAPES, "ade20k": ADE20K, "folder": FOLDER}


def dataset_spec(name: str, root: Optional[PathLike] = None) -> DatasetSpec:
    """The built-in spec ``name``; for ``folder``, read from ``root``'s classes.txt / dataset.yaml."""
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; built-in: {', '.join(DATASETS)}")
    spec = DATASETS[name]
    return spec.at(root) if root is not None else spec


# ----------------------------------------------------------------------------- the VOC folder

class VOCSegmentation:
    """Map-style dataset over a ``VOCdevkit/VOC2012`` folder.

    ``__getitem__`` returns ``(image, mask)`` with ``image`` an RGB PIL image and
    ``mask`` an (H, W) uint8 array of class indices (decoded by ``load_pair`` with the
    ``VOC`` spec), or whatever ``transforms`` makes of that pair. ``ids[i]`` is the VOC id
    of sample ``i``.
    """

    def __init__(self, root: PathLike, split: str = "train",
                 transforms: Optional[Callable] = None, label_dir: Optional[str] = None):
        self.root = Path(root)
        if not (self.root / "JPEGImages").is_dir():
            raise DataError(f"{self.root}: not a VOC root (no JPEGImages folder); "
                            "pass the VOCdevkit/VOC2012 folder")
        self.split = split
        self.label_dir = label_dir or voc.default_label_dir(split)
        self.transforms = transforms
        self.ids = voc.read_split(self.root, split)

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
        image, label = load_pair(*self.load_raw(index), self.ids[index], VOC)
        if self.transforms is not None:
            return self.transforms(image, label)
        return image, label


# ----------------------------------------------------------------------------- folder datasets

FOLDER_YAML = "dataset.yaml"
FOLDER_CLASSES = "classes.txt"


def folder_spec(root: PathLike) -> DatasetSpec:
    """Read a folder dataset's spec: ``dataset.yaml`` if present, else ``classes.txt``.

    dataset.yaml::

        name: mydata              # optional (default: the folder's name)
        classes: [background, car, person]
        palette: [[0, 0, 0], [200, 0, 0], [0, 200, 0]]   # optional (default: VOC colours)
        ignore_index: 255         # optional: the mask value meaning "ignore" (mapped to 255)
        label_map: {0: 0, 10: 1, 20: 2}                   # optional: mask value -> class index

    Without ``label_map`` the mask values are the class indices. With it, values it
    does not list (other than ``ignore_index``) are errors.
    """
    root = Path(root)
    yaml_path, classes_path = root / FOLDER_YAML, root / FOLDER_CLASSES
    name = root.resolve().name or "folder"
    if yaml_path.is_file():
        return _spec_from_yaml(yaml_path, name)
    if not classes_path.is_file():
        raise DataError(f"{classes_path}: missing (a folder dataset needs classes.txt, one class name per "
                        f"line, or {FOLDER_YAML})")
    classes = [line.strip() for line in classes_path.read_text().splitlines() if line.strip()]
    if not classes:
        raise DataError(f"{classes_path}: no class names")
    try:
        return DatasetSpec(name, tuple(classes), splits=_folder_splits(root), layout="folder")
    except DataError as e:
        raise DataError(f"{classes_path}: {e}") from None


def _folder_splits(root: Path) -> tuple[str, ...]:
    images = root / "images"
    return tuple(sorted(p.name for p in images.iterdir() if p.is_dir())) if images.is_dir() else ()


def _spec_from_yaml(path: Path, default_name: str) -> DatasetSpec:
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise DataError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict) or not isinstance(data.get("classes"), list) or not data["classes"]:
        raise DataError(f"{path}: needs a 'classes' list of class names")
    unknown = set(data) - {"name", "classes", "palette", "ignore_index", "label_map"}
    if unknown:
        raise DataError(f"{path}: unknown keys {sorted(unknown)} (allowed: name, classes, palette, "
                        "ignore_index, label_map)")
    try:
        void = int(data.get("ignore_index", IGNORE_INDEX))
        mapping = data.get("label_map")
        if mapping is None and void == IGNORE_INDEX:
            table = None
        elif mapping is None:  # identity on the classes, the void value -> ignore
            table = table_from_mapping({i: i for i in range(len(data["classes"]))} | {void: IGNORE_INDEX})
        else:
            if not isinstance(mapping, dict):
                raise DataError("label_map must map mask values to class indices")
            table = table_from_mapping({int(k): int(v) for k, v in mapping.items()} | {void: IGNORE_INDEX})
        return DatasetSpec(str(data.get("name") or default_name), tuple(data["classes"]),
                           tuple(map(tuple, data.get("palette") or ())), label_map=table,
                           splits=_folder_splits(path.parent), layout="folder")
    except DataError as e:
        raise DataError(f"{path}: {e}") from None
    except (TypeError, ValueError, IndexError) as e:
        raise DataError(f"{path}: bad dataset spec ({e})") from None


# ----------------------------------------------------------------------------- specs stored elsewhere

def spec_from_manifest(manifest: Mapping[str, Any], where: str = "manifest") -> DatasetSpec:
    """The spec a manifest carries; older manifests (no ``dataset``) are VOC's."""
    if "dataset" in manifest:
        spec = DatasetSpec.from_dict(manifest["dataset"], where)
        if list(spec.classes) != list(manifest["class_names"]):
            raise DataError(f"{where}: class_names disagree with the dataset spec's classes")
        return spec
    return _fallback(list(manifest["class_names"]), where)


def spec_from_checkpoint(ckpt: Mapping[str, Any], where: str = "checkpoint") -> DatasetSpec:
    """The spec a checkpoint was trained on; checkpoints without one (older segtrain, converted
    VainF/torchvision weights) are taken as VOC when they have 21 classes."""
    num_classes = int(ckpt["model_config"]["num_classes"])
    if ckpt.get("dataset") is not None:
        spec = DatasetSpec.from_dict(ckpt["dataset"], where)
        if spec.num_classes != num_classes:
            raise DataError(f"{where}: dataset spec has {spec.num_classes} classes, the model {num_classes}")
        return spec
    names = list(VOC.classes) if num_classes == VOC.num_classes else [f"class_{i}" for i in range(num_classes)]
    return _fallback(names, where)


def _fallback(names: Sequence[str], where: str) -> DatasetSpec:
    if list(names) == list(VOC.classes):
        return VOC
    try:
        return DatasetSpec("unknown", tuple(names))
    except DataError as e:
        raise DataError(f"{where}: {e}") from None
