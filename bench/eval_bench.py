"""Evaluation speed: images/s of the whole and ms-flip protocols, one image per forward pass
(the reference, as before) vs same-size batches (``evaluate --batch-size B``).

    python bench/eval_bench.py                                   # VOC-sized images, ResNet-18, CPU
    python bench/eval_bench.py --backbone resnet50 --images 32 --batch-sizes 1 8 --device cuda

The images are random, at the sizes given (default: VOC val's two common sizes, 500x375
and 375x500, two to one), run through segtrain.inference.evaluate with a random-init model
with non-trivial BatchNorm statistics. Besides images/s it prints, for every batched run,
how many predicted pixels differ from the batch-1 run (float rounding of other kernels)
and whether the confusion matrices are identical. Prints a Markdown table, with the
hardware above it.
"""
from __future__ import annotations

import argparse
import itertools
import platform
import time
from pathlib import Path

import torch

from segtrain.inference import PROTOCOLS, evaluate, same_size_batches
from segtrain.model import build_model
from segtrain.transforms import normalize
from segtrain.voc import IGNORE_INDEX, NUM_CLASSES


def hardware(device: torch.device) -> str:
    if device.type == "cuda":
        return f"GPU: {torch.cuda.get_device_name(device)}"
    model = platform.processor() or "unknown CPU"
    flags: set[str] = set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    simd = " ".join(sorted(f for f in flags if f.startswith(("avx512", "amx", "avx2"))))
    return (f"CPU: {model}; {torch.get_num_threads()} torch threads; ATen capability "
            f"{torch.backends.cpu.get_cpu_capability()}; flags: {simd or 'none of avx2/avx512/amx'}")


def make_samples(sizes: list[tuple[int, int]], count: int, seed: int = 0) -> list[tuple]:
    """``count`` single-image batches (normalised image, mask with some ignore, id) cycling ``sizes``."""
    g = torch.Generator().manual_seed(seed)
    samples = []
    for i, (h, w) in zip(range(count), itertools.cycle(sizes)):
        image = normalize(torch.randint(0, 256, (1, 3, h, w), dtype=torch.uint8, generator=g))
        mask = torch.randint(0, NUM_CLASSES, (1, h, w), generator=g)
        mask[:, :, :4] = IGNORE_INDEX
        samples.append((image, mask, [f"img{i:03d}"]))
    return samples


def run(model, samples, protocol: str, batch_size: int, device: torch.device) -> tuple[float, dict, dict]:
    """Seconds, metrics and {id: prediction} for one evaluation."""
    loader = samples if batch_size == 1 else same_size_batches(iter(samples), batch_size)
    preds: dict[str, torch.Tensor] = {}

    def keep(images, masks, batch_preds, ids):
        for sid, pred in zip(ids, batch_preds):
            preds[sid] = pred.cpu()

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    metrics = evaluate(model, loader, device, protocol=protocol, on_batch=keep)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, metrics, preds


def main() -> None:
    ap = argparse.ArgumentParser(prog="python bench/eval_bench.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="deeplabv3plus")
    ap.add_argument("--backbone", default="resnet18")
    ap.add_argument("--protocols", nargs="+", default=["whole", "ms-flip"], choices=PROTOCOLS)
    ap.add_argument("--sizes", nargs="+", default=["375x500", "375x500", "500x375"],
                    help="HxW, cycled over the images")
    ap.add_argument("--ms-flip-scale", type=float, default=0.5,
                    help="image sizes are multiplied by this for ms-flip (12 passes; 1.0 = VOC size)")
    ap.add_argument("--images", type=int, default=6)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 3])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    device = torch.device(args.device)
    sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes]

    torch.manual_seed(0)
    model = build_model(args.arch, args.backbone, pretrained=False).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # BatchNorm statistics that are not the identity, as in a trained model
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    model.to(device)

    print(hardware(device))
    print(f"{args.arch} {args.backbone}, random init, fp32, {args.images} images of {' / '.join(args.sizes)} "
          f"(ms-flip at x{args.ms_flip_scale}); batch 1 is the reference (the code path before batching)\n")
    print("| protocol | image size | batch | s | images/s | speedup | pixels differing from batch 1 | "
          "confusion matrix |")
    print("|---|---|---|---|---|---|---|---|")
    for protocol in args.protocols:
        scale = args.ms_flip_scale if protocol == "ms-flip" else 1.0
        scaled = [(round(h * scale), round(w * scale)) for h, w in sizes]
        samples = make_samples(scaled, args.images)
        run(model, samples[:1], protocol, 1, device)  # warm-up: allocator, kernel choice
        reference = None
        for batch_size in args.batch_sizes:
            seconds, metrics, preds = run(model, samples, protocol, batch_size, device)
            if reference is None:
                reference = (seconds, metrics, preds)
            ref_seconds, ref_metrics, ref_preds = reference
            differing = sum(int((preds[k] != ref_preds[k]).sum()) for k in preds)
            same = torch.equal(metrics["confusion_matrix"], ref_metrics["confusion_matrix"])
            size = " / ".join(sorted({f"{h}x{w}" for h, w in scaled}))
            print(f"| {protocol} | {size} | {batch_size} | {seconds:.1f} | {args.images / seconds:.3f} | "
                  f"{ref_seconds / seconds:.2f}x | {differing} of {sum(p.numel() for p in preds.values())} | "
                  f"{'identical' if same else 'differs'} |", flush=True)


if __name__ == "__main__":
    main()
