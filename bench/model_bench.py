"""Time one training step (forward + backward + SGD step) and peak memory of DeepLabV3 / V3+.

    python bench/model_bench.py                              # ResNet-50, crop 513, batch 4
    python bench/model_bench.py --crop 129 --batch 2 --steps 2   # small enough for a CPU

Modes: fp32 and bf16 autocast, each in the default (NCHW) and channels_last memory
format, and each with torch.compile (``--modes fp32+compile bf16+compile``; by default
only on CUDA, because on a 2-core CPU compiling takes minutes). For compiled modes
"compile s" is the extra time of the first warm-up step (tracing + code generation);
the step time is the steady state after it. Memory is torch.cuda.max_memory_allocated on CUDA (tensors only) and the process's
peak resident set size on CPU (everything the process holds, reset before each run
where Linux allows it). Prints a Markdown table.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import resource
import sys
from pathlib import Path
from typing import Optional

import torch

if __package__ in (None, ""):  # python bench/model_bench.py: import segtrain from this checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from segtrain import steptime
from segtrain.hardware import compile_model, describe
from segtrain.steptime import ModelShape, sync  # noqa: F401 (bench/gpu_check.py imports sync from here)
from segtrain.voc import NUM_CLASSES

MODES = {  # name: (autocast dtype or None, channels_last, torch.compile)
    "fp32": (None, False, False),
    "fp32+cl": (None, True, False),
    "bf16": (torch.bfloat16, False, False),
    "bf16+cl": (torch.bfloat16, True, False),
    "fp32+compile": (None, False, True),
    "bf16+compile": (torch.bfloat16, False, True),
    "bf16+cl+compile": (torch.bfloat16, True, True),
}


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        # Writing 5 to clear_refs resets the kernel's peak-RSS mark (VmHWM) for this process (Linux).
        with contextlib.suppress(OSError):
            Path("/proc/self/clear_refs").write_text("5")


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20  # kB
    # Elsewhere: the lifetime peak (kB on Linux, bytes on macOS), which never goes down between runs.
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**30


def bench(arch: str, backbone: str, mode: str, crop: int, batch: int, steps: int, warmup: int,
          device: torch.device) -> tuple[float, float, float, float]:
    """Mean and fastest seconds per steady training step, peak memory (GiB), compile seconds (0 eager).

    The step is segtrain/steptime.py's, the one the precision autotune and the demo's budget
    time. The fastest step is the better estimate on a shared machine (load only slows steps down)."""
    amp_dtype, channels_last, compiled = MODES[mode]
    shape = ModelShape(arch, backbone, NUM_CLASSES, 16)
    model = shape.build()
    precision = "bf16" if amp_dtype is not None else "fp32"
    step = steptime.prepare(model, shape, crop, batch, precision, channels_last, "train", device)
    if compiled and not compile_model(model):
        return (float("nan"),) * 4
    timing = steptime.time_calls(step, steps, warmup, device, after_warmup=lambda: reset_peak_memory(device))
    compile_seconds = max(0.0, timing.warmup[0] - timing.mean) if compiled and timing.warmup else 0.0
    return timing.mean, timing.fastest, peak_memory_gib(device), compile_seconds


def bench_interleaved(arch: str, backbone: str, modes: list[str], crop: int, batch: int, steps: int,
                      warmup: int, device: torch.device) -> dict[str, steptime.Timing]:
    """Every eager mode's step timed round-robin (A B C D, A B C D, ...): on a loaded machine the
    ratios between modes stay meaningful, because load that comes and goes hits all of them."""
    shape = ModelShape(arch, backbone, NUM_CLASSES, 16)
    step_of = {mode: steptime.prepare(shape.build(), shape, crop, batch,
                                      "bf16" if MODES[mode][0] is not None else "fp32", MODES[mode][1], "train", device)
               for mode in modes if not MODES[mode][2]}
    return steptime.time_interleaved(step_of, steps, warmup, device)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--crop", type=int, default=513)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5, help="timed steps (after --warmup)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (compile needs >= 1)")
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--archs", nargs="+", default=["deeplabv3", "deeplabv3plus"])
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=None,
                        help="default: all, torch.compile only on CUDA")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--interleave", action="store_true",
                        help="time the eager modes round-robin, one step each per round (robust ratios on a "
                             "shared machine; no memory column)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    modes = args.modes or [m for m in MODES if device.type == "cuda" or not MODES[m][2]]
    if args.interleave:
        return print_interleaved(args, modes, device)

    memory = "max_memory_allocated" if device.type == "cuda" else "peak RSS of the process"
    print(describe())
    print(f"{args.backbone}, crop {args.crop}, batch {args.batch}, mean of {args.steps} steps after "
          f"{args.warmup} warm-up on {device}; memory = {memory}\n")
    print("| arch | mode | s/step | fastest step s | img/s | peak mem (GiB) | compile s |")
    print("|---|---|---|---|---|---|---|")
    for arch in args.archs:
        for mode in modes:
            seconds, fastest, gib, compile_s = bench(arch, args.backbone, mode, args.crop, args.batch,
                                                     args.steps, args.warmup, device)
            print(f"| {arch} | {mode} | {seconds:.3f} | {fastest:.3f} | {args.batch / seconds:.1f} | {gib:.2f} | "
                  f"{compile_s:.1f} |", flush=True)
    return 0


def print_interleaved(args: argparse.Namespace, modes: list[str], device: torch.device) -> int:
    print(describe())
    print(f"{args.backbone}, crop {args.crop}, batch {args.batch}, {args.steps} rounds of one step per mode "
          f"(interleaved) after {args.warmup} warm-up steps each on {device}\n")
    for arch in args.archs:
        timings = bench_interleaved(arch, args.backbone, modes, args.crop, args.batch, args.steps, args.warmup,
                                    device)
        base = timings.get("fp32+cl") or timings.get("fp32")
        print(f"| arch | mode | fastest s/step | mean s/step | fp32{'+cl' if 'fp32+cl' in timings else ''} / mode "
              "(fastest) | all steps |")
        print("|---|---|---|---|---|---|")
        for mode, t in timings.items():
            ratio = f"{base.fastest / t.fastest:.2f}x" if base else "-"
            print(f"| {arch} | {mode} | {t.fastest:.3f} | {t.mean:.3f} | {ratio} | "
                  f"{' '.join(f'{x:.2f}' for x in t.steps)} |", flush=True)
    if hasattr(os, "getloadavg"):
        print(f"load average (1 min) at the end: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
