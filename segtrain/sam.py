"""Segment Anything (SAM) next to the semantic models.

SAM cuts an image into class-agnostic masks; DeepLab labels every pixel with a class.
This module draws SAM's masks and gives them classes from a semantic prediction in two
ways, so the two kinds of model can be compared on the same images:

* ``assign_majority``: every mask of SAM's automatic generator takes the majority
  class of the semantic prediction inside it ("SAM-refined (majority)");
* ``refine_with_boxes``: every connected blob of a non-background class in the
  semantic prediction becomes a box prompt, and SAM's mask for that box is painted
  with the blob's class ("SAM-refined (boxes)").

    python -m segtrain.sam --sam-checkpoint sam_vit_b_01ec64.pth --model-type vit_b \\
        --data shards/voc-val.json --num 5 --semantic runs/x/best.pt --out runs/x/sam

writes ``ID_sam.png`` (SAM's masks) per image and, with ``--semantic``,
``ID_semantic.png``, ``ID_sam_majority.png``, ``ID_sam_boxes.png`` and the mIoU /
pixel accuracy of the three maps in ``sam_metrics.json``.

SAM's image encoder always runs at 1024x1024: on a CPU one image costs 10-25 s and
~3.6 GB (vit_b), on a GPU well under a second. Each image is encoded once and the
embedding is shared by the automatic generator and the box prompts.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import PIL.Image
import torch
from segment_anything import SamAutomaticMaskGenerator, SamPredictor, sam_model_registry
from segment_anything.modeling import Sam
from torch import nn
from tqdm import tqdm

from segtrain import autotune, hardware
from segtrain.cli import user_errors
from segtrain.datasets import IGNORE_INDEX, VOC, DatasetSpec, decode_target, spec_from_checkpoint
from segtrain.files import PathLike, atomic_write_bytes, save_image
from segtrain.inference import predict_mask
from segtrain.metrics import confusion_matrix, segmentation_metrics, to_jsonable
from segtrain.checkpoints import CheckpointError, check_fits_data, load_weights, torch_load
from segtrain.loaders import iter_samples
from segtrain.model import load_checkpoint
from segtrain.sources import DataSource, class_names, resolve_data
from segtrain.visualize import covering_ids, overlay

__all__ = [
    "MODEL_TYPES", "CHECKPOINT_HELP", "METHODS", "load_sam", "sam_model_type", "resolve_device",
    "mask_generator", "sam_masks", "draw_sam_masks", "mask_outline", "assign_majority",
    "connected_components", "box_prompts", "refine_with_boxes", "SamMaps", "segment_with_sam",
    "report_columns", "run_sam_comparison", "format_comparison", "main",
]

# Image-encoder width of each SAM size: it tells a checkpoint's model type before building anything.
ENCODER_WIDTH = {"vit_b": 768, "vit_l": 1024, "vit_h": 1280}
MODEL_TYPES = tuple(ENCODER_WIDTH)
WIDTH_KEY = "image_encoder.patch_embed.proj.weight"
OFFICIAL_CHECKPOINTS = {"vit_b": "sam_vit_b_01ec64.pth", "vit_l": "sam_vit_l_0b3195.pth",
                        "vit_h": "sam_vit_h_4b8939.pth"}
CHECKPOINT_HELP = (
    "official SAM checkpoints: https://github.com/facebookresearch/segment-anything#model-checkpoints ("
    + ", ".join(f"{name} for --model-type {t}" for t, name in OFFICIAL_CHECKPOINTS.items())
    + ", from https://dl.fbaipublicfiles.com/segment_anything/)")

# The maps compared against the ground truth, with their names in tables and figures.
METHODS = {"semantic": "semantic", "sam_majority": "SAM-refined (majority)",
           "sam_boxes": "SAM-refined (boxes)"}
BACKGROUND = 0
MIN_BOX_AREA = 64  # blobs smaller than this (pixels) are specks: not worth a SAM prompt


# --------------------------------------------------------------------------- loading

def resolve_device(device: str = "auto") -> torch.device:
    """``auto``: CUDA when present, else CPU; ``cuda`` without a GPU is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but no CUDA GPU is available; use --device cpu")
    return torch.device(device)


def load_sam(checkpoint: PathLike, model_type: str, device: Union[str, torch.device] = "cpu") -> Sam:
    """A SAM model of ``model_type`` with the weights in ``checkpoint``, in eval mode on ``device``.

    segment-anything's own builder unpickles the file without ``weights_only``; here
    the state dict is read safely, its model type checked from the encoder width
    (before building a model of the wrong size), and loaded strictly. Every problem,
    a missing file included, is a one-line ``CheckpointError`` saying where the
    official checkpoints are.
    """
    if model_type not in MODEL_TYPES:
        raise ValueError(f"unknown SAM model type {model_type!r}; use one of {', '.join(MODEL_TYPES)}")
    try:
        state = torch_load(checkpoint)
    except FileNotFoundError:
        raise CheckpointError(f"{checkpoint}: no such SAM checkpoint file; {CHECKPOINT_HELP}") from None
    except CheckpointError as e:
        raise CheckpointError(f"{e}; {CHECKPOINT_HELP}") from None
    width_weight = state.get(WIDTH_KEY) if isinstance(state, Mapping) else None
    if not isinstance(width_weight, torch.Tensor):
        found = ", ".join(sorted(map(str, state))[:5]) if isinstance(state, Mapping) else type(state).__name__
        raise CheckpointError(f"{checkpoint}: not a SAM state dict (no {WIDTH_KEY}; found {found}); "
                              f"{CHECKPOINT_HELP}")
    width = width_weight.shape[0]
    fits = next((t for t, w in ENCODER_WIDTH.items() if w == width), None)
    if fits != model_type:
        what = f"a SAM {fits} checkpoint" if fits else f"a SAM checkpoint with an unknown encoder width {width}"
        hint = f"use --model-type {fits}; " if fits else ""
        raise CheckpointError(f"{checkpoint}: {what} (image encoder width {width}), not {model_type} "
                              f"(width {ENCODER_WIDTH[model_type]}); {hint}{CHECKPOINT_HELP}")
    sam = sam_model_registry[model_type]()  # checkpoint=None: weights come from the safe load below
    try:
        load_weights(sam, state, source=str(checkpoint))
    except CheckpointError as e:
        raise CheckpointError(f"{e}; {CHECKPOINT_HELP}") from None
    return sam.to(device).eval()


def sam_model_type(sam: Sam) -> str:
    """``vit_b``, ``vit_l`` or ``vit_h``, from the width of the model's image encoder."""
    width = sam.image_encoder.patch_embed.proj.out_channels
    return next(t for t, w in ENCODER_WIDTH.items() if w == width)


class SharedEmbeddingPredictor(SamPredictor):
    """A SamPredictor that remembers the last image's embedding.

    The automatic mask generator encodes the image and then resets the predictor;
    the box prompts that follow on the same image would run the image encoder (the
    whole cost of SAM on a CPU) again. Here ``set_image`` on the same pixels restores
    the remembered embedding instead.
    """

    def __init__(self, sam_model: Sam):
        super().__init__(sam_model)
        self.remembered: Optional[tuple] = None  # (image key, features, original_size, input_size)

    def set_image(self, image: np.ndarray, image_format: str = "RGB") -> None:
        key = (image.shape, image_format, hashlib.blake2b(np.ascontiguousarray(image).data).digest())
        if self.remembered is not None and self.remembered[0] == key:
            self.features, self.original_size, self.input_size = self.remembered[1:]
            self.is_image_set = True
            return
        super().set_image(image, image_format)
        self.remembered = (key, self.features, self.original_size, self.input_size)


def mask_generator(sam: Sam, points_per_side: int = 32) -> SamAutomaticMaskGenerator:
    """SAM's automatic generator (a ``points_per_side``^2 grid of point prompts, SAM's default
    thresholds) whose predictor shares each image's embedding with ``refine_with_boxes``."""
    generator = SamAutomaticMaskGenerator(sam, points_per_side=points_per_side)
    generator.predictor = SharedEmbeddingPredictor(sam)
    return generator


def sam_masks(generator: SamAutomaticMaskGenerator, image: np.ndarray) -> list[dict[str, Any]]:
    """SAM's mask records for an (H, W, 3) uint8 RGB image, largest first.

    Each record has ``segmentation`` ((H, W) bool), ``area``, ``bbox`` (XYWH),
    ``predicted_iou`` and ``stability_score``. May be empty (e.g. random weights).
    """
    records = generator.generate(np.ascontiguousarray(image))
    return sorted(records, key=lambda r: r["area"], reverse=True)


# --------------------------------------------------------------------------- drawing

def mask_outline(mask: np.ndarray) -> np.ndarray:
    """Pixels of ``mask`` with a 4-neighbour outside it (pixels on the image border count)."""
    inner = np.pad(mask, 1, constant_values=False)
    eroded = inner[1:-1, 1:-1] & inner[:-2, 1:-1] & inner[2:, 1:-1] & inner[1:-1, :-2] & inner[1:-1, 2:]
    return mask & ~eroded


def draw_sam_masks(image: np.ndarray, masks: Sequence[np.ndarray], alpha: float = 0.5,
                   seed: int = 0) -> np.ndarray:
    """Each mask filled in its own colour (blended with the image) and outlined, as (H, W, 3) uint8.

    Masks are drawn largest first so small ones stay visible on top. Colours come
    from a palette seeded with ``seed`` by area rank, so figures are reproducible.
    """
    out = np.array(image, dtype=np.uint8, copy=True)
    order = sorted(range(len(masks)), key=lambda i: int(masks[i].sum()), reverse=True)
    palette = np.random.default_rng(seed).integers(40, 256, size=(len(masks), 3))  # no near-black
    for colour, i in zip(palette, order):
        mask = np.asarray(masks[i], dtype=bool)
        out[mask] = np.round((1 - alpha) * image[mask] + alpha * colour).astype(np.uint8)
        out[mask_outline(mask)] = colour
    return out


# --------------------------------------------------------------------------- class assignment

def assign_majority(sam_masks: Sequence[np.ndarray], semantic: np.ndarray) -> np.ndarray:
    """"SAM-refined (majority)": each SAM mask takes the majority class of ``semantic`` inside it.

    Pixels no mask covers keep the semantic prediction. Where masks overlap, the
    smaller mask wins: masks are painted largest first, so a part (a wheel) keeps
    its own vote inside the whole (a bicycle). Votes always count the original
    semantic prediction, never earlier paint; a tie goes to the lower class index.
    """
    refined = semantic.copy()
    for mask in sorted(sam_masks, key=lambda m: int(m.sum()), reverse=True):
        if mask.any():
            refined[mask] = np.bincount(semantic[mask].ravel()).argmax()
    return refined


def connected_components(mask: np.ndarray) -> list[np.ndarray]:
    """8-connected components of a bool (H, W) mask, each as a bool mask, in raster order.

    (A plain flood fill: scipy/OpenCV are not dependencies, and the cost, well under a
    second per VOC image, is nothing next to SAM's.)
    """
    height, width = mask.shape
    todo = np.asarray(mask, dtype=bool).ravel().copy()  # pixels not yet in a component
    components = []
    for start in np.flatnonzero(todo):
        if not todo[start]:
            continue
        todo[start] = False
        stack, members = [int(start)], []
        while stack:
            pixel = stack.pop()
            members.append(pixel)
            y, x = divmod(pixel, width)
            for ny in range(max(y - 1, 0), min(y + 2, height)):
                for nx in range(max(x - 1, 0), min(x + 2, width)):
                    neighbour = ny * width + nx
                    if todo[neighbour]:
                        todo[neighbour] = False
                        stack.append(neighbour)
        component = np.zeros(height * width, dtype=bool)
        component[members] = True
        components.append(component.reshape(height, width))
    return components


def _class_blobs(semantic: np.ndarray, background: int) -> list[tuple[int, np.ndarray]]:
    """(class, component mask) for every non-background class, largest first (then by class, raster order)."""
    blobs = [(int(c), component) for c in np.unique(semantic) if c != background
             for component in connected_components(semantic == c)]
    return sorted(blobs, key=lambda blob: int(blob[1].sum()), reverse=True)


def mask_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) of a non-empty mask, max inclusive (SAM's own mask-to-box convention)."""
    ys, xs = np.nonzero(mask)
    return int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())


def box_prompts(semantic: np.ndarray, min_area: int = MIN_BOX_AREA,
                background: int = BACKGROUND) -> list[tuple[int, tuple[int, int, int, int]]]:
    """(class, XYXY box) for every 8-connected blob of a non-background class with at least
    ``min_area`` pixels, largest blob first: two blobs of one class give two boxes."""
    return [(c, mask_box(blob)) for c, blob in _class_blobs(semantic, background) if blob.sum() >= min_area]


def refine_with_boxes(predictor: SamPredictor, image: np.ndarray, semantic: np.ndarray,
                      min_area: int = MIN_BOX_AREA, background: int = BACKGROUND) -> np.ndarray:
    """"SAM-refined (boxes)": SAM's mask for the box of each semantic blob, painted with the blob's class.

    Everything else is ``background``. Blobs are painted largest first, so smaller
    objects stay on top. A blob keeps its own pixels where SAM returns an empty
    mask, and when it is smaller than ``min_area`` (not prompted).
    """
    predictor.set_image(image)
    refined = np.full(semantic.shape, background, dtype=semantic.dtype)
    for class_id, blob in _class_blobs(semantic, background):
        paint = blob
        if blob.sum() >= min_area:
            masks, _, _ = predictor.predict(box=np.array(mask_box(blob)), multimask_output=False)
            if masks[0].any():
                paint = masks[0]
        refined[paint] = class_id
    return refined


@dataclass
class SamMaps:
    """SAM on one image: its masks (largest first) and, given a semantic map, both refinements."""

    masks: list[np.ndarray]
    seconds: float  # wall time of SAM (generator + box prompts)
    semantic: Optional[np.ndarray] = None
    sam_majority: Optional[np.ndarray] = None
    sam_boxes: Optional[np.ndarray] = None


def fill_class(spec: DatasetSpec) -> int:
    """What SAM-refined (boxes) paints outside the boxes: the background class, or ignore (255)
    for datasets without one (every class is then prompted)."""
    return spec.background if spec.background is not None else IGNORE_INDEX


def segment_with_sam(generator: SamAutomaticMaskGenerator, image: np.ndarray,
                     semantic: Optional[np.ndarray] = None, min_box_area: int = MIN_BOX_AREA,
                     background: int = BACKGROUND) -> SamMaps:
    """Run the automatic generator on ``image`` and, with ``semantic``, both refinements.

    The box prompts reuse the generator's predictor, so the image is encoded once.
    """
    start = time.perf_counter()
    masks = [r["segmentation"] for r in sam_masks(generator, image)]
    if semantic is None:
        return SamMaps(masks, time.perf_counter() - start)
    boxes = refine_with_boxes(generator.predictor, image, semantic, min_box_area, background)
    return SamMaps(masks, time.perf_counter() - start, semantic, assign_majority(masks, semantic), boxes)


# --------------------------------------------------------------------------- comparison

def report_columns(sam_checkpoint: PathLike, model_type: str, images: Sequence[np.ndarray],
                   semantic: Optional[PathLike] = None, device: Union[str, torch.device] = "cpu",
                   points_per_side: int = 32, min_box_area: int = MIN_BOX_AREA,
                   progress: bool = True, semantic_autocast: Optional[torch.dtype] = None) -> dict[str, list]:
    """SAM columns for the report's prediction grid.

    ``images``: (H, W, 3) uint8 RGB arrays. Returns ``{"titles": [...], "images": rows}``
    with one row per image: SAM's masks drawn over the image and, with a ``semantic``
    checkpoint, the two SAM-refined class maps in its dataset's colours.
    """
    sam = load_sam(sam_checkpoint, model_type, device)
    generator = mask_generator(sam, points_per_side)
    model, spec = None, VOC
    if semantic is not None:
        model, ckpt = load_checkpoint(semantic, map_location=sam.device)
        model.eval()
        spec = spec_from_checkpoint(ckpt, str(semantic))
    titles = ["SAM masks"] + ([] if model is None else [METHODS["sam_majority"], METHODS["sam_boxes"]])
    rows = []
    for image in tqdm(images, desc="SAM", unit="img", disable=not progress):
        semantic_map = None if model is None else predict_mask(model, PIL.Image.fromarray(image), sam.device,
                                                               autocast_dtype=semantic_autocast)
        maps = segment_with_sam(generator, image, semantic_map, min_box_area, fill_class(spec))
        row = [draw_sam_masks(image, maps.masks)]
        if model is not None:
            row += [decode_target(maps.sam_majority, spec), decode_target(maps.sam_boxes, spec)]
        rows.append(row)
    return {"titles": titles, "images": rows}


def run_sam_comparison(sam: Sam, source: DataSource, ids: Sequence[str], out_dir: PathLike,
                       semantic_model: Optional[nn.Module] = None, points_per_side: int = 32,
                       min_box_area: int = MIN_BOX_AREA, progress: bool = True,
                       semantic_autocast: Optional[torch.dtype] = None,
                       spec: Optional[DatasetSpec] = None) -> dict[str, Any]:
    """SAM on ``ids``: overlays in ``out_dir`` and, with ``semantic_model``, metrics of the
    semantic map and both SAM refinements against the ground truth.

    Writes ``ID_sam.png`` per image, plus ``ID_semantic.png``, ``ID_sam_majority.png`` and
    ``ID_sam_boxes.png`` with a semantic model, and ``sam_metrics.json`` (returned too).
    ``spec`` (class names, colours; default: the data's) must be the semantic model's.
    """
    out_dir = Path(out_dir)
    generator = mask_generator(sam, points_per_side)
    if semantic_model is not None:
        semantic_model = semantic_model.to(sam.device).eval()
    spec = spec or source.spec
    num_classes = spec.num_classes
    confusion = {m: torch.zeros(num_classes, num_classes, dtype=torch.int64) for m in METHODS}
    per_image = {}
    samples = iter_samples(source, ids)
    for sid, pil_image, label in tqdm(samples, total=len(ids), desc="SAM", unit="img", disable=not progress):
        image = np.asarray(pil_image)
        semantic = None if semantic_model is None else predict_mask(semantic_model, pil_image, sam.device,
                                                                    autocast_dtype=semantic_autocast)
        maps = segment_with_sam(generator, image, semantic, min_box_area, fill_class(spec))
        save_image(PIL.Image.fromarray(draw_sam_masks(image, maps.masks)), out_dir / f"{sid}_sam.png")
        per_image[sid] = {"num_masks": len(maps.masks), "sam_seconds": maps.seconds}
        if semantic is None:
            continue
        target = torch.from_numpy(label)
        for method in METHODS:
            prediction = getattr(maps, method)
            save_image(PIL.Image.fromarray(overlay(image, prediction, spec=spec)), out_dir / f"{sid}_{method}.png")
            cm = confusion_matrix(torch.from_numpy(prediction), target, num_classes)
            confusion[method] += cm
            per_image[sid][method] = segmentation_metrics(cm)["miou"]
    result: dict[str, Any] = {
        "ids": list(per_image), "split": source.split, "model_type": sam_model_type(sam),
        "points_per_side": points_per_side, "device": str(sam.device), "per_image": per_image,
    }
    if semantic_model is not None:
        result["min_box_area"] = min_box_area
        result["metrics"] = {m: segmentation_metrics(confusion[m], spec.classes) for m in METHODS}
    atomic_write_bytes(out_dir / "sam_metrics.json", json.dumps(to_jsonable(result), indent=2).encode())
    return result


def format_comparison(metrics: Mapping[str, Mapping[str, Any]]) -> str:
    """mIoU and pixel accuracy (percent) of each map, one row per method."""
    width = max(len(name) for name in METHODS.values())
    lines = [f"{'map':<{width}}    mIoU  pixel acc", "-" * (width + 19)]
    for method, name in METHODS.items():
        m = metrics[method]
        lines.append(f"{name:<{width}}  {100 * m['miou']:6.2f}     {100 * m['pixel_acc']:6.2f}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- CLI

def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m segtrain.sam", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sam-checkpoint", required=True, metavar="PATH",
                    help=f"SAM weights; {CHECKPOINT_HELP}")
    ap.add_argument("--model-type", required=True, choices=MODEL_TYPES, help="SAM size of the checkpoint")
    ap.add_argument("--data", required=True, help="shard manifest (shards/voc-val.json) or VOCdevkit folder")
    ap.add_argument("--split", default="val")
    pick = ap.add_mutually_exclusive_group()
    pick.add_argument("--ids", nargs="+", metavar="ID", help="images to run on")
    pick.add_argument("--num", type=int, default=5,
                      help="without --ids: this many images chosen to cover many classes (default 5)")
    ap.add_argument("--points-per-side", type=int, default=32,
                    help="automatic generator grid: N*N point prompts (default 32; 8 is ~4x faster on a CPU)")
    ap.add_argument("--semantic", metavar="RUN_DIR/best.pt",
                    help="segtrain checkpoint: compare its map with the two SAM refinements")
    ap.add_argument("--min-box-area", type=int, default=MIN_BOX_AREA,
                    help=f"smallest semantic blob (pixels) prompted with a box (default {MIN_BOX_AREA})")
    ap.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    ap.add_argument("--mixed-precision", choices=hardware.PRECISIONS, default="auto",
                    help=f"of the --semantic model: {hardware.PRECISION_HELP}. SAM itself runs in fp32 "
                         "(its mask post-processing goes through NumPy, which has no bf16)")
    ap.add_argument("--out", required=True, metavar="DIR")
    return ap.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    with user_errors(ValueError):
        if args.num < 1 or args.points_per_side < 1:
            raise ValueError("--num and --points-per-side must be at least 1")
        device = resolve_device(args.device)
        # With --ids and no --semantic the data is first needed after SAM loads: a bad SAM
        # checkpoint is said before the data is opened (as it was before data sources existed).
        source = None if args.ids and not args.semantic else resolve_data(args.data, args.split)
        ids = args.ids or covering_ids(source, args.num)
        semantic_model, spec = None, None
        if args.semantic:
            semantic_model, ckpt = load_checkpoint(args.semantic)
            check_fits_data(ckpt, args.semantic, class_names(source), source.location)
            spec = source.spec
        print(f"SAM {args.model_type} from {args.sam_checkpoint} on {device}; images: {', '.join(ids)}")
        amp = (autotune.inference_autocast(args.mixed_precision, device, semantic_model)
               if semantic_model is not None else None)
        sam = load_sam(args.sam_checkpoint, args.model_type, device)
        source = source or resolve_data(args.data, args.split)
        result = run_sam_comparison(sam, source, ids, args.out, semantic_model,
                                    args.points_per_side, args.min_box_area, semantic_autocast=amp, spec=spec)
    if "metrics" in result:
        print(format_comparison(result["metrics"]))
    print(f"wrote overlays of {len(result['ids'])} images and sam_metrics.json to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
