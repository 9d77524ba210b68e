#!/usr/bin/env python
"""What ``--mixed-precision auto`` measures on this CPU, what it picks, and what the measurement costs.

    python bench/autotune_bench.py                       # the demo's model and a ResNet-50 run's
    python bench/autotune_bench.py --shapes resnet18:129:8

For each model (backbone:crop:batch, DeepLabV3+ OS16, 21 classes) it runs the autotune
with an empty cache in a temporary folder (segtrain/autotune.py: every candidate timed
round-robin, the crop capped at 129), and prints the candidates' s/step, the choice, the
wall and CPU seconds the measurement took, and the load average, so the cost can be set
against a run's length (the demo trains ~3 minutes).
"""
import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

if __package__ in (None, ""):  # python bench/autotune_bench.py: import segtrain from this checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from segtrain import autotune
from segtrain.hardware import describe
from segtrain.steptime import ModelShape


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=["resnet18:129:8", "resnet50:513:8"],
                    help="backbone:crop:per-process batch of each training run to tune for")
    args = ap.parse_args()
    os.environ.pop(autotune.ENV_OFF, None)
    print(describe())
    print("| model | crop (timed) | batch | " + " | ".join(["fp32+cl", "fp32", "bf16+cl", "bf16"])
          + " | choice | measurement wall s | CPU s | load at end |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for spec in args.shapes:
        backbone, crop, batch = spec.split(":")
        crop, batch = int(crop), int(batch)
        with tempfile.TemporaryDirectory() as tmp:
            os.environ["XDG_CACHE_HOME"] = tmp
            shape = ModelShape(backbone=backbone)
            timed_crop = min(crop, autotune.TRAIN_CROP_CAP)
            wall, cpu = time.perf_counter(), time.process_time()
            choice = autotune.decide("auto", None, torch.device("cpu"), shape, timed_crop, batch)
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        figures = [" ".join(f"{t:.2f}" for t in choice.measured.get(name, [])) or "-"
                   for name in ("fp32+cl", "fp32", "bf16+cl", "bf16")]
        load = f"{os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else "-"
        print(f"| {backbone} | {crop} ({timed_crop}) | {batch} | " + " | ".join(figures)
              + f" | {autotune.setting_text(choice.precision, choice.channels_last)} | {wall:.1f} | {cpu:.1f} | {load} |",
              flush=True)


if __name__ == "__main__":
    main()
