"""One rank of test_trackers' multi-process test: the validation samples' gather to rank 0.

    accelerate launch ... tests/trackers_worker.py OUT_DIR TRAIN_MANIFEST
Writes OUT_DIR/rank<k>.json: the overlay ids and per-image ids this rank got (rank 0: all ranks').
"""
import json
import sys
from pathlib import Path

from accelerate import Accelerator

from segtrain import loaders, trackers
from segtrain.sources import resolve_data

out, data = Path(sys.argv[1]), sys.argv[2]
accelerator = Accelerator(cpu=True)
samples = trackers.ValidationSamples(3, (0.5,) * 3, (0.25,) * 3, num_classes=21)
for images, masks, ids in loaders.val_loader(resolve_data(data, "val"), num_workers=1,
                                             rank=accelerator.process_index, world_size=accelerator.num_processes):
    samples(images.float(), masks, masks, ids)
got = samples.gather(accelerator)
(out / f"rank{accelerator.process_index}.json").write_text(json.dumps(
    {"overlays": [e["id"] for e in got.get("examples", [])], "per_image": [r[0] for r in got.get("per_image", [])]}))
