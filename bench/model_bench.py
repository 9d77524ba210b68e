"""Time one training step (forward + backward + SGD step) and peak memory of DeepLabV3 / V3+.

    python bench/model_bench.py                              # ResNet-50, crop 513, batch 4
    python bench/model_bench.py --crop 129 --batch 2 --steps 2   # small enough for a CPU

Modes: fp32, bf16 autocast, each also in channels_last; on CUDA also torch.compile.
Memory is torch.cuda.max_memory_allocated on CUDA (tensors only) and the process's
peak resident set size on CPU (everything the process holds, reset before each run
where Linux allows it). Prints a Markdown table.
"""
from __future__ import annotations

import argparse
import contextlib
import resource
import sys
import time
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from segtrain.model import build_model
from segtrain.voc import IGNORE_INDEX, NUM_CLASSES

MODES = {  # name: (autocast dtype or None, channels_last, torch.compile)
    "fp32": (None, False, False),
    "fp32+cl": (None, True, False),
    "bf16": (torch.bfloat16, False, False),
    "bf16+cl": (torch.bfloat16, True, False),
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
          device: torch.device) -> tuple[float, float]:
    """Mean seconds per training step and peak memory (GiB) for one configuration."""
    amp_dtype, channels_last, compile_model = MODES[mode]
    torch.manual_seed(0)
    model = build_model(arch, backbone, num_classes=NUM_CLASSES, output_stride=16).to(device).train()
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    step_model = torch.compile(model) if compile_model else model
    images = torch.randn(batch, 3, crop, crop, device=device).contiguous(memory_format=memory_format)
    labels = torch.randint(0, NUM_CLASSES, (batch, crop, crop), device=device)
    labels[:, :4] = IGNORE_INDEX  # a few ignored pixels, as VOC's boundaries

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = step_model(images)["out"]
        F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX).backward()
        optimizer.step()

    for _ in range(warmup):
        step()
    sync(device)
    reset_peak_memory(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    seconds = (time.perf_counter() - start) / steps
    return seconds, peak_memory_gib(device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    modes = args.modes or [m for m in MODES if device.type == "cuda" or not MODES[m][2]]

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    memory = "max_memory_allocated" if device.type == "cuda" else "peak RSS of the process"
    print(f"{args.backbone}, crop {args.crop}, batch {args.batch}, mean of {args.steps} steps after "
          f"{args.warmup} warm-up; {where}; torch {torch.__version__}; memory = {memory}\n")
    print("| arch | mode | s/step | img/s | peak mem (GiB) |")
    print("|---|---|---|---|---|")
    for arch in args.archs:
        for mode in modes:
            seconds, gib = bench(arch, args.backbone, mode, args.crop, args.batch, args.steps, args.warmup, device)
            print(f"| {arch} | {mode} | {seconds:.3f} | {args.batch / seconds:.1f} | {gib:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
