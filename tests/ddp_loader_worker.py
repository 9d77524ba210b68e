"""Run by tests/test_shards.py under ``accelerate launch`` with 2 CPU processes.

Each rank runs every requested training and validation loader (rank and world size
come from torch.distributed, as in real training) and writes what it saw to
``OUT/rank{R}.json``; the test compares the ranks.

    --train NAME=DATA   training loader: batches per epoch, their sizes, ids, warnings
    --val NAME=DATA     validation loader: every id this rank evaluated
"""
import argparse
import json
import warnings
from pathlib import Path

from accelerate import Accelerator

from segtrain.files import atomic_write_bytes
from segtrain.loaders import train_loader, val_loader
from segtrain.sources import resolve_data


def named(spec: str) -> tuple[str, str]:
    name, data = spec.split("=", 1)
    return name, data


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--train", type=named, action="append", default=[])
    ap.add_argument("--val", type=named, action="append", default=[])
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--crop", type=int, default=65)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()

    # As in training: Accelerator() initialises torch.distributed (gloo on CPU), and the
    # loaders take rank and world size from there. (A bare PartialState() reports
    # DistributedType.NO and rank 0 on every process under this launch recipe.)
    state = Accelerator()
    result = {"rank": state.process_index, "world_size": state.num_processes, "train": {}, "val": {}}
    for name, data in args.train:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loader, steps = train_loader(resolve_data(data, "train"), args.batch_size, args.crop,
                                         num_workers=args.workers)
            batches = [{"ids": ids, "images": list(images.shape), "masks": list(masks.shape)}
                       for images, masks, ids in loader]
        result["train"][name] = {"steps": steps, "batches": batches,
                                 "warnings": [str(w.message) for w in caught if w.category is UserWarning]}
        state.wait_for_everyone()
    for name, data in args.val:
        ids = []
        for images, masks, batch_ids in val_loader(resolve_data(data, "val"), batch_size=args.batch_size,
                                                   num_workers=args.workers):
            assert images.shape[0] == masks.shape[0] == len(batch_ids)
            ids += batch_ids
        result["val"][name] = ids
        state.wait_for_everyone()
    atomic_write_bytes(Path(args.out) / f"rank{state.process_index}.json", json.dumps(result).encode())


if __name__ == "__main__":
    main()
