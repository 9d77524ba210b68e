"""Evaluate a checkpoint on a packed split: mIoU, pixel accuracy, per-class IoU, ...

Class names come from the checkpoint's dataset spec, and the data must have the same
classes; images are normalised with the checkpoint's mean/std.

    python -m segtrain.evaluate --checkpoint runs/x/best.pt --data shards/voc-val.json
    python -m segtrain.evaluate ... --protocol ms-flip --out runs/x/eval_ms_flip.json
    accelerate launch segtrain/evaluate.py --checkpoint ... --data ...     # N processes

Protocols:

* ``whole``: each image at its own size (the standard VOC protocol; batch size 1 is
  exact, larger batches pad images to a common size, which changes the context the
  model sees near the padding);
* ``center-crop``: shorter side resized to 513, centre crop 513 (VainF's evaluation);
* ``ms-flip``: softmax averaged over scales 0.5-1.75 and horizontal flips, each
  pass's logits resized back to the image's size first (mmsegmentation's "ms+flip").

On N processes every image is counted exactly once: the validation loader gives each
rank disjoint samples, each rank fills its own confusion matrix with forward passes on
the bare model (a DDP wrapper syncs buffers on forward and hangs when one rank has run
out of batches), and the matrices are summed once after the loop.
"""
from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    # Run as a script (accelerate launch segtrain/evaluate.py): Python put segtrain/ on
    # sys.path, where sibling names (model, shards, ...) could shadow real libraries.
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse
import os
import json
from collections.abc import Callable, Sequence
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import nn
from tqdm import tqdm

from segtrain.metrics import ConfusionMatrix, format_metrics_table, to_jsonable
from segtrain.model import load_checkpoint
from segtrain.shards import resolve_data, val_loader
from segtrain.cli import OtherProcessFailed, check_launch, user_errors
from segtrain.datasets import IGNORE_INDEX, check_same_classes, spec_from_checkpoint
from segtrain.io import atomic_write_bytes

PROTOCOLS = ("whole", "center-crop", "ms-flip")
MS_SCALES = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)  # mmsegmentation's ratios for VOC / ADE20K
CROP_SIZE = 513


OnBatch = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, list], None]

__all__ = ["PROTOCOLS", "MS_SCALES", "OtherProcessFailed", "evaluate", "predict_logits", "ms_flip_logits",
           "loader_protocol", "class_names_for", "main"]


def ms_flip_logits(model: nn.Module, images: torch.Tensor, scales: Sequence[float] = MS_SCALES,
                   flip: bool = True) -> torch.Tensor:
    """Multi-scale + flip test-time augmentation, as mmsegmentation's ``aug_test``.

    The batch is resized by each ratio (bilinear, sizes rounded half up as mmcv does)
    and, with ``flip``, also mirrored; each pass's logits are flipped back, resized to
    the input size and turned into probabilities, which are averaged. Returns the log
    of that average: valid logits (softmax gives the averaged probabilities back) whose
    argmax is the prediction. float32 (N, C, H, W).
    """
    height, width = images.shape[-2:]
    prob_sum: Optional[torch.Tensor] = None
    passes = 0
    for scale in scales:
        size = (max(1, int(height * scale + 0.5)), max(1, int(width * scale + 0.5)))
        scaled = images if size == (height, width) else F.interpolate(
            images, size=size, mode="bilinear", align_corners=False)
        # One forward for both orientations: the mirrored copies ride along in the batch.
        batch = torch.cat([scaled, scaled.flip(-1)]) if flip else scaled
        logits = model(batch)["out"]
        if flip:
            plain, mirrored = logits.chunk(2)
            logits = torch.cat([plain, mirrored.flip(-1)])
        logits = F.interpolate(logits.float(), size=(height, width), mode="bilinear", align_corners=False)
        probs = logits.softmax(dim=1)
        probs = probs.view(2, -1, *probs.shape[1:]).sum(0) if flip else probs
        prob_sum = probs if prob_sum is None else prob_sum + probs
        passes += 2 if flip else 1
    return (prob_sum / passes).log()


def check_protocol(protocol: str) -> None:
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown evaluation protocol {protocol!r}; use one of {', '.join(PROTOCOLS)}")


def loader_protocol(protocol: str) -> str:
    """The ``val_loader``/``val_transforms`` protocol an evaluation protocol reads its images with.

    ms-flip resizes inside ``ms_flip_logits``, so its loader gives whole images.
    """
    check_protocol(protocol)
    return "whole" if protocol == "ms-flip" else protocol


def predict_logits(model: nn.Module, images: torch.Tensor, protocol: str = "whole") -> torch.Tensor:
    """(N, C, H, W) class logits for normalised (N, 3, H, W) images under ``protocol``.

    ``whole`` and ``center-crop`` are one forward pass (the crop is the loader's job);
    ``ms-flip`` is ``ms_flip_logits``. Call under ``torch.inference_mode()`` and any autocast.
    """
    if protocol == "ms-flip":
        return ms_flip_logits(model, images)
    check_protocol(protocol)
    return model(images)["out"]


def class_names_for(num_classes: int) -> tuple[str, ...]:
    """Placeholder names ``class_0, class_1, ...`` for a model evaluated without a dataset spec."""
    return tuple(f"class_{i}" for i in range(num_classes))


def evaluate(model: nn.Module, loader, device: Union[torch.device, str], num_classes: Optional[int] = None,
             protocol: str = "whole", autocast_dtype: Optional[torch.dtype] = None,
             accelerator: Optional[Accelerator] = None, on_batch: Optional[OnBatch] = None,
             class_names: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """Run ``model`` over ``loader`` and return the metrics of the whole split.

    ``loader`` yields ``(images, masks, ids)`` batches (``shards.val_loader``; with
    ``accelerator``, built for this rank so ranks see disjoint samples). Pass the BARE
    model (``accelerator.unwrap_model(model)``), already on ``device``; it is put in
    eval mode and given back in the mode it came in. With ``accelerator``, the counts
    of all processes are summed once after the loop and every process gets the total.
    Build the loader with ``loader_protocol(protocol)``: center-crop is the loader's job.

    ``on_batch(images, masks, preds, ids)`` is called after each batch with the
    normalised images, the (N, H, W) int64 masks and predictions (on ``device``) and the
    sample ids: for progress bars or grabbing a few images to log.

    ``num_classes`` defaults to the model's; ``class_names`` (for the per-class table)
    to ``class_0, class_1, ...``: pass the dataset spec's.

    Returns ``metrics.segmentation_metrics`` (miou, pixel_acc, mean_class_acc, fwiou,
    iou, class_acc, num_pixels, per_class) plus ``num_images`` and ``confusion_matrix``
    (int64 CPU tensor, rows = ground truth).
    """
    check_protocol(protocol)
    device = torch.device(device)
    if num_classes is None:
        num_classes = model.model_config["num_classes"]
    confusion = ConfusionMatrix(num_classes, IGNORE_INDEX, device=device)
    num_images = 0
    failure: Optional[BaseException] = None
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), torch.autocast(device.type, dtype=autocast_dtype,
                                                    enabled=autocast_dtype is not None):
            for images, masks, ids in loader:
                images = images.to(device, non_blocking=True)
                masks = masks.to(device, non_blocking=True)
                preds = predict_logits(model, images, protocol).argmax(dim=1)
                confusion.update(preds, masks)
                num_images += len(ids)
                if on_batch is not None:
                    on_batch(images, masks, preds, ids)
    except Exception as e:
        # Alone, fail now. With other processes, first tell them: a rank that stops
        # before the collective below would leave the others waiting in it forever.
        if accelerator is None or accelerator.num_processes == 1:
            raise
        failure = e
    finally:
        model.train(was_training)

    if accelerator is not None and accelerator.num_processes > 1:
        status = torch.tensor([num_images, failure is not None], dtype=torch.int64, device=accelerator.device)
        num_images, failed_ranks = accelerator.reduce(status, "sum").tolist()
        if failure is not None:
            raise failure
        if failed_ranks:
            raise OtherProcessFailed(f"evaluation failed on {failed_ranks} other process(es); see their error")
        confusion.reduce(accelerator)

    if class_names is None:
        class_names = class_names_for(num_classes)
    metrics = confusion.compute(class_names)
    metrics["num_images"] = int(num_images)
    metrics["confusion_matrix"] = confusion.mat.cpu()
    return metrics


# --------------------------------------------------------------------------- CLI

def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m segtrain.evaluate",
        description="Evaluate a segtrain checkpoint (mIoU and friends) on 1 or N processes.")
    parser.add_argument("--checkpoint", required=True, type=Path, help="checkpoint file, e.g. runs/x/best.pt")
    parser.add_argument("--data", required=True,
                        help="shard manifest (shards/voc-val.json), shard pattern or VOCdevkit folder")
    parser.add_argument("--split", default="val")
    parser.add_argument("--protocol", choices=PROTOCOLS, default="whole")
    parser.add_argument("--crop-size", type=int, default=CROP_SIZE, help="for --protocol center-crop")
    parser.add_argument("--out", type=Path,
                        help="metrics JSON (default: eval_{split}_{protocol}.json next to the checkpoint)")
    parser.add_argument("--confusion-matrix", action="store_true",
                        help="also write the raw confusion matrix (rows = ground truth) to the JSON")
    parser.add_argument("--batch-size", type=int, default=1, help="per process; 1 is the exact protocol")
    parser.add_argument("--workers", type=int, default=2, help="data loading workers per process")
    parser.add_argument("--mixed-precision", choices=("no", "bf16"), default="no")
    args = parser.parse_args(argv)
    if args.batch_size < 1 or args.workers < 0 or args.crop_size < 1:
        parser.error("--batch-size and --crop-size must be >= 1, --workers >= 0")
    return args


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    accelerator = Accelerator()
    with user_errors():
        check_launch(accelerator.num_processes)
        result = run(args, accelerator)
    if accelerator.is_main_process:
        out = args.out or args.checkpoint.parent / f"eval_{args.split}_{args.protocol}.json"
        atomic_write_bytes(out, (json.dumps(to_jsonable(result), indent=2) + "\n").encode())
        print(f"wrote {out}")


def run(args: argparse.Namespace, accelerator: Accelerator) -> dict[str, Any]:
    """Evaluate as ``args`` say; every process returns the same result dict."""
    # Loaded on the CPU, then moved: torch.load cannot map to the "cpu:0" device that
    # Accelerate reports for multi-process CPU runs.
    model, ckpt = load_checkpoint(args.checkpoint)
    model.to(accelerator.device)
    spec = spec_from_checkpoint(ckpt, str(args.checkpoint))
    num_classes = spec.num_classes
    source = resolve_data(args.data, args.split)  # fails early, and identically on every rank
    check_same_classes(spec, source.spec, str(args.checkpoint), source.location)
    loader = val_loader(args.data, split=args.split, batch_size=args.batch_size, num_workers=args.workers,
                        protocol=loader_protocol(args.protocol),
                        crop_size=args.crop_size, rank=accelerator.process_index,
                        world_size=accelerator.num_processes, mean=model.mean, std=model.std)
    # The bar counts the main process's images; its share of the total is only known alone.
    total = source.num_samples if accelerator.num_processes == 1 else None
    with tqdm(total=total, unit="img", desc=f"eval {args.protocol}", dynamic_ncols=True,
              disable=not accelerator.is_main_process) as bar:
        metrics = evaluate(model, loader, accelerator.device, num_classes, args.protocol,
                           autocast_dtype=torch.bfloat16 if args.mixed_precision == "bf16" else None,
                           accelerator=accelerator, on_batch=lambda *batch: bar.update(len(batch[-1])),
                           class_names=spec.classes)
    confusion = metrics.pop("confusion_matrix")
    result = {"checkpoint": str(args.checkpoint), "data": str(args.data), "split": args.split,
              "protocol": args.protocol, "mixed_precision": args.mixed_precision,
              "num_processes": accelerator.num_processes, **metrics,
              "dataset": spec.name, "class_names": list(spec.classes)}
    if args.confusion_matrix:
        result["confusion_matrix"] = confusion.tolist()
    if accelerator.is_main_process:
        print(f"{args.checkpoint} on {args.data} ({args.split}, {metrics['num_images']} images, "
              f"protocol {args.protocol})")
        print(format_metrics_table(metrics, result["class_names"]))
    return result


if __name__ == "__main__":
    main()
