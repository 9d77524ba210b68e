"""How many training steps fit a wall-time budget on this machine.

    python -m segtrain.budget --seconds 150 --max-steps 150 --backbone resnet18 --crop-size 129 --batch-size 8

Prints the number of steps (stdout) and why (stderr). ``./launch.sh demo`` uses it to keep
its five-minute promise on any CPU: it times a few real training steps of the demo's
model at the demo's size in the setting training will choose (``--mixed-precision auto``:
segtrain/autotune.py times the candidates and caches them, so training does not time them
again), and trains for as many steps as fit, at most ``--max-steps``. On a fast CPU that
is the full recipe; on a slow one, fewer steps, said out loud. Timing the model step is
what varies by two orders of magnitude between CPUs (AVX2 without native bf16, AVX-512,
AMX); the loader runs beside it and ``--loader-factor`` accounts for it.
"""
from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from typing import Optional

import torch

from segtrain import autotune, hardware, steptime


def seconds_per_step(backbone: str, crop_size: int, batch_size: int, precision: str = "auto",
                     num_classes: int = 21, warmup: int = 2, steps: int = 3) -> tuple[float, str]:
    """Mean seconds of a steady training step (forward, backward, SGD) on random data, and the
    setting it ran in: the one training will choose (``autotune.decide``, whose measurement,
    cached, is also the training run's). Timed by the step harness (segtrain/steptime.py)
    where the autotune did not already time that very step."""
    device = torch.device("cpu")
    shape = steptime.ModelShape("deeplabv3plus", backbone, num_classes)
    crop = min(crop_size, autotune.TRAIN_CROP_CAP)
    choice = autotune.decide(precision, None, device, shape, crop, batch_size)
    setting = autotune.setting_text(choice.precision, choice.channels_last)
    if choice.measured and crop == crop_size:
        return choice.seconds(), setting
    timing = steptime.time_setting(shape, crop_size, batch_size, choice.precision, choice.channels_last,
                                   steps=steps, warmup=warmup, device=device)
    return timing.mean, setting


def steps_within(budget_seconds: float, step_seconds: float, max_steps: int, min_steps: int = 1,
                 loader_factor: float = 1.0, reserve_steps: float = 0.0) -> int:
    """The most steps of ``step_seconds`` x ``loader_factor`` that fit ``budget_seconds`` after
    ``reserve_steps`` x ``step_seconds`` kept for the work after training, between ``min_steps``
    and ``max_steps``."""
    fit = math.floor((budget_seconds - reserve_steps * step_seconds) / (step_seconds * loader_factor))
    return max(min_steps, min(max_steps, fit))


def main(argv: Optional[Sequence[str]] = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m segtrain.budget", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, required=True,
                    help="wall time left for training and what follows it (evaluation, figures, report)")
    ap.add_argument("--max-steps", type=int, required=True, help="the full recipe's steps")
    ap.add_argument("--min-steps", type=int, default=1, help="never fewer (say so when the budget needs fewer)")
    ap.add_argument("--backbone", default="resnet18")
    ap.add_argument("--crop-size", type=int, default=129)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--mixed-precision", default="auto", choices=hardware.PRECISIONS)
    ap.add_argument("--loader-factor", type=float, default=1.45,
                    help="training time per step (loader workers sharing the cores, validation each epoch) / "
                         "model step time: 1.45 measured for the demo on 2 cores (docs/BENCHMARKS.md#demo-training)")
    ap.add_argument("--reserve-steps", type=float, default=35,
                    help="the work after training (evaluate, figures, report) in model-step times: 33 measured "
                         "for the demo on 2 cores")
    args = ap.parse_args(argv)
    seconds, precision = seconds_per_step(args.backbone, args.crop_size, args.batch_size, args.mixed_precision)
    steps = steps_within(args.seconds, seconds, args.max_steps, args.min_steps, args.loader_factor,
                         args.reserve_steps)
    why = (f"{seconds:.2f} s per {args.backbone} step (crop {args.crop_size}, batch {args.batch_size}, {precision}) "
           f"on {hardware.cpu_model()}: ")
    if steps == args.max_steps:
        why += f"the full {steps} steps fit in {args.seconds:.0f} s"
    elif (steps * args.loader_factor + args.reserve_steps) * seconds <= args.seconds:
        why += f"{steps} of {args.max_steps} steps fit in {args.seconds:.0f} s"
    else:
        why += f"even {steps} steps take longer than {args.seconds:.0f} s on this CPU"
    print(why, file=sys.stderr)
    print(steps)


if __name__ == "__main__":
    main()
