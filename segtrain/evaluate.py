"""Evaluate a checkpoint on a packed split: mIoU, pixel accuracy, per-class IoU, ...

Class names come from the checkpoint's dataset spec, and the data must have the same
classes; images are normalised with the checkpoint's mean/std.

    python -m segtrain.evaluate --checkpoint runs/x/best.pt --data shards/voc-val.json
    python -m segtrain.evaluate ... --protocol ms-flip --out runs/x/eval_ms_flip.json
    python -m segtrain.evaluate ... --wandb     # also into the training's wandb run (its wandb_id; --tracker X for others)
    accelerate launch segtrain/evaluate.py --checkpoint ... --data ...     # N processes

The protocols, and what is identical on 1 and N processes: ``segtrain.inference`` (this
module is the command line only).
"""
from __future__ import annotations

if __name__ == "__main__" and not __package__:
    # Run as a file (`accelerate launch segtrain/evaluate.py`): Python put segtrain/ first on sys.path. Put
    # the repository root there instead (before any import: os and sys are loaded already), so the
    # package's modules are only ever segtrain.X, never a top-level module shadowing a library's.
    import os
    import sys
    _here = os.path.dirname(os.path.realpath(__file__))
    sys.path[:] = [os.path.dirname(_here), *(p for p in sys.path if os.path.realpath(p or ".") != _here)]

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import torch
from accelerate import Accelerator
from tqdm import tqdm

from segtrain import autotune, distributed, hardware, integrity, trackers
from segtrain.checkpoints import RunDir, check_fits_data
from segtrain.cli import ArgumentParser, check_launch, user_errors
from segtrain.datasets import spec_from_checkpoint
from segtrain.files import atomic_write_bytes
from segtrain.inference import CROP_SIZE, PROTOCOLS, evaluate, loader_protocol, same_size_batches
from segtrain.metrics import format_metrics_table, to_jsonable
from segtrain.model import load_checkpoint
from segtrain.loaders import val_loader
from segtrain.sources import class_names, resolve_data

# --------------------------------------------------------------------------- CLI

def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = ArgumentParser(
        prog="python -m segtrain.evaluate",
        description="Evaluate a segtrain checkpoint (mIoU and friends) on 1 or N processes.")
    parser.add_argument("--checkpoint", required=True, type=Path, help="checkpoint file, e.g. runs/x/best.pt")
    parser.add_argument("--data", required=True,
                        help="shard manifest (shards/voc-val.json), shard pattern or VOCdevkit folder")
    parser.add_argument("--split", help="default: the split the manifest --data names (as training does), "
                                        "else val")
    parser.add_argument("--protocol", choices=PROTOCOLS, default="whole",
                        help="; ".join(f"{name}: {what}" for name, what in PROTOCOLS.items()))
    parser.add_argument("--crop-size", type=int, default=CROP_SIZE, help="for --protocol center-crop")
    parser.add_argument("--out", type=Path,
                        help="metrics JSON (default: eval_{split}_{protocol}.json next to the checkpoint)")
    parser.add_argument("--confusion-matrix", action="store_true",
                        help="also write the raw confusion matrix (rows = ground truth) to the JSON")
    parser.add_argument("--batch-size", type=int, default=1,
                        help="images per forward pass and process, grouped by size (never padded). 1 (the "
                             "default) is the reference; larger is faster and equal up to float rounding")
    parser.add_argument("--workers", type=int, default=2, help="data loading workers per process")
    parser.add_argument("--mixed-precision", choices=hardware.PRECISIONS, default="auto",
                        help=hardware.PRECISION_HELP)
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the model (compiling takes minutes on a CPU; see docs/BENCHMARKS.md)")
    parser.add_argument("--verify-shards", choices=integrity.VERIFY_MODES, default=integrity.DEFAULT_VERIFY,
                        help=integrity.VERIFY_HELP)
    parser.add_argument("--threads", type=int,
                        help="CPU threads per process (default: as started; accelerate launch gives each "
                             "process 1). The same count on 1 and N processes gives bit-identical results")
    parser.add_argument("--tracker", choices=tuple(trackers.TRACKERS), default="none",
                        help="also add the results to the training's run in this tracker (wandb: the run in "
                             "RUN_DIR/wandb_id next to the checkpoint) as eval/<split>/<protocol>/* keys: one row "
                             "with best and final")
    parser.add_argument("--wandb", action="store_const", dest="tracker", const="wandb",
                        help="the same as --tracker wandb")
    args = parser.parse_args(argv)
    if args.batch_size < 1 or args.workers < 0 or args.crop_size < 1 or (args.threads or 1) < 1:
        parser.error("--batch-size, --crop-size and --threads must be >= 1, --workers >= 0")
    return args


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    accelerator = Accelerator(kwargs_handlers=[distributed.process_group_kwargs()])  # ms-flip on slow GPUs
    with user_errors():
        check_launch(accelerator.num_processes)
        result = run(args, accelerator)
    if accelerator.is_main_process:
        run_dir = RunDir.of_checkpoint(args.checkpoint)
        out = args.out or run_dir.eval_result(result["split"], args.protocol)
        atomic_write_bytes(out, (json.dumps(to_jsonable(result), indent=2) + "\n").encode())
        print(f"wrote {out}")
        if args.tracker != "none":
            where = trackers.log_evaluation(args.tracker, run_dir, to_jsonable(result))
            print(f"added to the {args.tracker} run {where}" if where else
                  f"--tracker {args.tracker}: no such run in {run_dir}; the results were not sent")


def run(args: argparse.Namespace, accelerator: Accelerator) -> dict[str, Any]:
    """Evaluate as ``args`` say; every process returns the same result dict."""
    # Loaded on the CPU, then moved: torch.load cannot map to the "cpu:0" device that
    # Accelerate reports for multi-process CPU runs.
    # No --split: the manifest's split, as training reads --data (else val). Fails early, and
    # identically on every rank.
    source = resolve_data(args.data, args.split, default="val")
    split = source.split
    integrity.verify_source(source, args.verify_shards)
    model, ckpt = load_checkpoint(args.checkpoint)
    check_fits_data(ckpt, args.checkpoint, class_names(source), source.location)
    spec = spec_from_checkpoint(ckpt, str(args.checkpoint))  # class names for the table and the JSON
    model.to(accelerator.device)
    if autotune.Runtime.from_dict(ckpt.get("resolved")).channels_last:  # the run's memory format: its kernels, so
        model.to(memory_format=torch.channels_last)       # the same figures as its validation gave
    precision, reason = autotune.inference_precision(args.mixed_precision, accelerator.device, model,
                                                     accelerator.print, accelerator.state)
    if args.compile:
        hardware.compile_model(model, accelerator.print, dynamic=True)  # image sizes vary: no recompile per size
    num_classes = spec.num_classes
    accelerator.print(f"evaluating the {split} split of {args.data} ({source.num_samples or '?'} images"
                      + (", the split the manifest names; --split chooses another)" if not args.split else ")"))
    loader = val_loader(source, num_workers=args.workers,
                        protocol=loader_protocol(args.protocol),
                        crop_size=args.crop_size, rank=accelerator.process_index,
                        world_size=accelerator.num_processes, mean=model.mean, std=model.std,
                        pin_memory=accelerator.device.type == "cuda")  # async copies to the GPU
    if args.batch_size > 1:
        loader = same_size_batches(loader, args.batch_size)
    # The bar counts the main process's images; its share of the total is only known alone.
    total = source.num_samples if accelerator.num_processes == 1 else None
    with tqdm(total=total, unit="img", desc=f"eval {args.protocol}", dynamic_ncols=True,
              disable=not accelerator.is_main_process) as bar:
        metrics = evaluate(model, loader, accelerator.device, num_classes, args.protocol,
                           autocast_dtype=hardware.autocast_dtype(precision, accelerator.device),
                           accelerator=accelerator, on_batch=lambda *batch: bar.update(len(batch[-1])),
                           threads=args.threads, class_names=spec.classes)
    confusion = metrics.pop("confusion_matrix")
    result = {"checkpoint": str(args.checkpoint), "data": str(args.data), "split": split,
              "protocol": args.protocol, "mixed_precision": precision,
              "precision_reason": reason,
              "num_processes": accelerator.num_processes, **metrics,
              "dataset": spec.name, "class_names": list(spec.classes)}
    if args.confusion_matrix:
        result["confusion_matrix"] = confusion.tolist()
    if accelerator.is_main_process:
        print(f"{args.checkpoint} on {args.data} ({split}, {metrics['num_images']} images, "
              f"protocol {args.protocol})")
        print(format_metrics_table(metrics, result["class_names"]))
    return result


if __name__ == "__main__":
    main()
