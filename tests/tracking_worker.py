"""One rank of test_tracking's multi-process test: the wandb id decision and the overlay gather.

    accelerate launch ... tests/tracking_worker.py OUT_DIR TRAIN_MANIFEST
Writes OUT_DIR/rank<k>.json: the id this rank got and (rank 0) the overlay ids picked over all ranks.
"""
import json
import sys
from pathlib import Path

from accelerate import Accelerator

from segtrain import loaders, tracking
from segtrain.sources import resolve_data

out, data = Path(sys.argv[1]), sys.argv[2]
accelerator = Accelerator(cpu=True)
run_dir = out / "run"
if accelerator.is_main_process:
    run_dir.mkdir(parents=True, exist_ok=True)
run_id, _ = tracking.shared_run_id(accelerator, run_dir, resuming=False)
picker = tracking.OverlayPicker(3, (0.5,) * 3, (0.25,) * 3)
for images, masks, ids in loaders.val_loader(resolve_data(data, "val"), num_workers=1,
                                             rank=accelerator.process_index, world_size=accelerator.num_processes):
    picker(images.float(), masks, masks, ids)
picks = picker.gather(accelerator)
(out / f"rank{accelerator.process_index}.json").write_text(json.dumps(
    {"id": run_id, "overlays": [p["id"] for p in picks]}))
