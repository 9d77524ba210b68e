#!/usr/bin/env python
"""segtrain on one GPU, every figure from one call (issue 12). Run it through the wrapper:

    bench/gpu_check.sh OUT_DIR          # one GPU (H200): ResNet-50, crop 513, batch 8 and 16, <= 8 minutes
    bench/gpu_check.sh OUT_DIR --cpu    # the same code at toy sizes on a CPU (the test suite runs this)

Sections, in this order, each in its own process with its own time limit, so that one
that fails, hangs or poisons the CUDA context leaves the others' figures intact:

  env      GPU, driver, torch / CUDA / cuDNN and library versions, CPU, date
  data     synthetic VOC-like images (segtrain.synthetic) packed into shards (segtrain.pack)
  peak     bf16 matrix-product rate (torch.matmul, random data): the denominator of MFU
  model    one training step (bench/model_bench.py's bench()): fp32, bf16, bf16+cl at each
           batch (bf16 at the profile's bf16_batches: the CPU's first only); FLOPs of
           forward + backward counted by torch.utils.flop_counter
  train    segtrain's own loop, shards -> loader workers -> Accelerate train() (bench/
           train_bench.py's segtrain_loop), default precision: images/s, peak memory and the
           time spent waiting for batches (metrics.jsonl's data_wait_s); the loader alone
  syncs    train() steps that do not log, run under torch.cuda.set_sync_debug_mode("error"),
           with every loss summed: any host-device synchronisation in a step is an error row
  plain    bench/train_bench.py's reference-style fp32 loop, for the speed-up ratio
  eval     segtrain.evaluate, whole and ms-flip protocols, fp32 and bf16
  sam      SAM vit_b with random weights: automatic mask generation, seconds per image
  compile  the model step in bf16+cl+torch.compile

Time: each section may run up to its limit, but never into the shares reserved for the
sections after it (their limits scaled to fit the run's budget): a slow section cannot
starve the rest, and time a section leaves unused passes on to the next. Loader workers
pass batches through /dev/shm: when it is under 1 GiB (a container's 64 MB default) the
workers are lowered, with a message, instead of dying mid-run.

OUT_DIR receives gpu_check.md (header, goals, every table), gpu_check.json (every figure)
and, from the wrapper, gpu_check.log; both are rewritten after each section, so a run
stopped part-way still leaves the sections done so far. Exit status 0 when every
section ran, 1 when one failed (its one-line error is in the tables).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

REFERENCE_MB = 6861  # the course reference run's GPU memory, DeepLabV3+ R50, crop 513, batch 8
GOAL_SPEEDUP, GOAL_MFU = 2.0, 0.30
STEP_MODES = ("fp32", "bf16", "bf16+cl")  # names of bench/model_bench.py's MODES
COMPILE_MODE = "bf16+cl+compile"


@dataclass(frozen=True)
class Profile:
    """The sizes of one kind of run: the GPU's real ones, or toy ones that exercise the same code on a CPU."""
    name: str
    backbone: str
    crop: int
    batches: tuple[int, ...]
    step_warmup: int           # untimed model steps (compile happens in them)
    step_seconds: float        # timed seconds aimed at per model-step row (steps counted from the last s/step)
    step_range: tuple[int, int]
    train_warmup: int          # untimed steps of each training loop
    train_steps: int           # timed steps of each training loop
    unique_images: int         # synthetic train images rendered; the train split repeats them
    train_images: int
    val_images: int
    image_size: tuple[int, int]
    shard_size: int
    workers: int               # loader workers (train() caps them at the CPU count)
    sam_model: str             # vit_b, or "tiny" (tiny_sam(): a 2-block encoder at 256 px) for the CPU
    sam_points: int            # points per side of the automatic generator
    sam_images: int            # timed images (one more is the untimed warm-up)
    matmul_n: int
    matmul_iters: int
    budget_s: float            # the whole run
    bf16_batches: tuple[int, ...]  # the batches at which the model section times its bf16 modes
    threads: Optional[int]     # OMP_NUM_THREADS of each section (None: torch's default)
    limits: dict               # seconds each section may take at most


GPU = Profile(
    name="gpu", backbone="resnet50", crop=513, batches=(8, 16), step_warmup=3, step_seconds=5.0,
    # 2048 train images: an epoch of 128 (batch 16) or 256 steps, so neither the timed steps nor the
    # loader-alone figure is dominated by workers starting; 40 val images in 3 shards (3 loader workers).
    step_range=(5, 60), train_warmup=5, train_steps=30, unique_images=48, train_images=2048, val_images=40,
    image_size=(350, 500), shard_size=16, workers=os.cpu_count() or 4, sam_model="vit_b", sam_points=32,
    sam_images=5, matmul_n=8192, matmul_iters=30, budget_s=450, bf16_batches=(8, 16), threads=None,
    limits={"env": 60, "data": 90, "peak": 45, "model": 150, "train": 150, "syncs": 90, "plain": 75, "eval": 60,
            "sam": 75, "compile": 240})
CPU = Profile(
    # Toy sizes, for the test suite: every section's code at the least work that still gives each row a
    # figure (one timed model step and no untimed one, two val images); crop 33 is the smallest
    # DeepLabV3+ OS16 input used in the tests.
    name="cpu", backbone="resnet18", crop=33, batches=(2, 4), step_warmup=0, step_seconds=0.1,
    step_range=(1, 1), train_warmup=1, train_steps=1, unique_images=4, train_images=8, val_images=2,
    image_size=(40, 64), shard_size=4, workers=1, sam_model="tiny", sam_points=2, sam_images=1,
    matmul_n=256, matmul_iters=2, budget_s=680,
    # bf16 is emulated on a CPU without avx512_bf16/AMX (20-50x slower than fp32): its model-step
    # modes at the first batch only.
    bf16_batches=(2,),
    # One thread: on a small machine shared with other jobs, two spinning OpenMP threads per
    # process made a forward pass 25x slower (1.36 s against 0.053 s).
    threads=1,
    # 3-5x what each section took on the 2-core development machine under a load average of 5 (2-20 s),
    # adding up to the budget (none scaled down): unused time costs nothing, and a loaded machine slows
    # the sections without cutting rows short.
    limits={"env": 40, "data": 45, "peak": 45, "model": 100, "train": 100, "syncs": 100, "plain": 80, "eval": 80,
            "sam": 60, "compile": 30})
SHM_MIN_BYTES = 2**30      # below this, loader workers are lowered
SHM_PER_WORKER = 2**28     # /dev/shm room per loader worker (prefetched batches of 16 images at 513 px, twice over)


def fit_workers_to_shm(profile: Profile, shm_path: str = "/dev/shm") -> tuple[Profile, Optional[str]]:
    """The profile with loader workers lowered when /dev/shm is small, and the message saying so.

    DataLoader workers hand batches to the main process through shared memory; a container's
    64 MB /dev/shm makes them die with "bus error" / "No space left on device" mid-run.
    Each worker gets SHM_PER_WORKER of it; with less than that for one, loading runs in the
    main process (0 workers), slower but whole.
    """
    try:
        size = shutil.disk_usage(shm_path).total
    except OSError:
        return profile, None
    if size >= SHM_MIN_BYTES or profile.workers == 0:
        return profile, None
    workers = min(profile.workers, size // SHM_PER_WORKER)
    message = (f"/dev/shm is {size / 2**20:.0f} MiB (< {SHM_MIN_BYTES // 2**20} MiB): loader workers lowered from "
               f"{profile.workers} to {workers} (each needs ~{SHM_PER_WORKER // 2**20} MiB there; in docker, "
               "--shm-size=8g or --ipc=host restores them)")
    return dataclasses.replace(profile, workers=workers), message


def section_timeouts(names: list[str], limits: dict, budget: float) -> dict[str, float]:
    """Each section's reserved share of the budget: its limit, scaled down when the limits add up
    to more than the budget (see the module docstring)."""
    scale = min(1.0, budget / max(1.0, sum(limits[n] for n in names)))
    return {n: limits[n] * scale for n in names}


# ----------------------------------------------------------------------------- one section (child process)

@dataclass
class Context:
    profile: Profile
    work: Path
    deadline: float                    # time.time() by which the section should wrap up
    results: dict                      # the result files of the sections run before this one
    rows: list = dataclasses.field(default_factory=list)
    notes: list = dataclasses.field(default_factory=list)
    save: Callable[[], None] = lambda: None

    @property
    def manifest(self) -> Path:
        return self.work / "shards" / "voc-train.json"

    @property
    def val_manifest(self) -> Path:
        return self.work / "shards" / "voc-val.json"

    @property
    def voc_root(self) -> Path:
        return self.work / "voc" / "VOCdevkit" / "VOC2012"

    def time_left(self) -> float:
        return self.deadline - time.time()

    def add(self, row: dict) -> None:
        """Keep a row and write it out at once: a section killed at its limit keeps the rows it finished."""
        self.rows.append(row)
        self.save()

    def attempt(self, keys: dict, measure: Callable[[], dict]) -> None:
        """One row: ``keys`` plus what ``measure`` returns, or its one-line error; the next row still runs."""
        if self.time_left() <= 0:
            self.add(keys | {"error": "skipped: the section's time limit was reached"})
            return
        try:
            self.add(keys | measure())
        except (Exception, SystemExit) as e:  # a row's failure is a figure too (argparse exits); traceback to the log
            traceback.print_exc()
            self.add(keys | {"error": one_line(e)})


def one_line(error: BaseException) -> str:
    try:
        from segtrain.cli import one_line as message  # unwraps DataLoader worker errors
        text = message(error)
    except Exception:
        text = (str(error).strip().splitlines() or [""])[0]
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def device():
    import torch
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def synchronize() -> None:
    """segtrain.steptime.sync's wait for the GPU, without importing segtrain.steptime (timm,
    torchvision: seconds of a CPU-mode section that needs only torch, e.g. peak)."""
    import torch
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def reset_peak() -> None:
    from model_bench import reset_peak_memory
    reset_peak_memory(device())


def peak_mb() -> Optional[float]:
    """torch.cuda.max_memory_allocated in MB; None on a CPU (the loops report no CPU memory)."""
    import torch
    return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None


def section_env(ctx: Context) -> None:
    import importlib.metadata as md
    import torch
    info: dict[str, Any] = {"date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                            "commit": os.environ.get("SEGTRAIN_COMMIT", "unknown"),
                            "python": platform.python_version(), "torch": torch.__version__,
                            "torch_cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version()}
    for package in ("torchvision", "timm", "accelerate", "webdataset", "segment-anything", "numpy"):
        try:
            info[package] = md.version(package)
        except md.PackageNotFoundError:
            info[package] = "missing"
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info |= {"gpu": props.name, "gpu_memory_mib": props.total_memory // 2**20,
                 "multiprocessors": props.multi_processor_count, "capability": f"{props.major}.{props.minor}",
                 "tf32_matmul": torch.backends.cuda.matmul.allow_tf32, "tf32_cudnn": torch.backends.cudnn.allow_tf32,
                 "cudnn_benchmark": torch.backends.cudnn.benchmark}
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            info["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=30).stdout.strip().splitlines()[0]
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")),
                 platform.processor() or "unknown")
    flags = next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines() if line.startswith("flags")), [])
    with contextlib.suppress(OSError):  # loader workers pass batches through it: a small one breaks them
        info["shm_mib"] = shutil.disk_usage("/dev/shm").total // 2**20
    info |= {"cpu": model, "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
             "cpu_bf16_flags": " ".join(f for f in flags if f in ("avx512_bf16", "amx_bf16", "amx_tile")) or "none"}
    ctx.add(info)


def section_data(ctx: Context) -> None:
    from segtrain.pack import pack_split
    from segtrain.synthetic import generate
    p = ctx.profile
    start = time.perf_counter()
    root = generate(ctx.work / "voc", num_train=p.unique_images, num_val=p.val_images, seed=0,
                    min_size=p.image_size[0], max_size=p.image_size[1])
    repeat_train_split(root, p.train_images)
    rendered = time.perf_counter()
    for split in ("train", "val"):
        manifest = pack_split(root, split, ctx.work / "shards", shard_size=p.shard_size,
                              workers=max(1, min(8, (os.cpu_count() or 1) - 1)), progress=False)
        ctx.add({"split": split, "images": manifest["num_samples"], "shards": len(manifest["shards"]),
                 "sizes_px": f"{p.image_size[0]}-{p.image_size[1]}"})
    ctx.notes.append(f"rendered in {rendered - start:.1f} s, packed in {time.perf_counter() - rendered:.1f} s; "
                     f"the train split repeats {p.unique_images} rendered images (augmentation differs per draw)")


def repeat_train_split(root: Path, count: int) -> None:
    """Make the train split ``count`` images long by linking the rendered ones under new ids.

    Rendering is the slow part of making data; a long train split keeps loader workers
    from being restarted every few steps (a new epoch), which would not be the steady state.
    """
    from segtrain.files import atomic_write_bytes
    split_file = root / "ImageSets" / "Segmentation" / "train.txt"
    ids = split_file.read_text().split()
    out = []
    for i in range(count):
        sid = ids[i % len(ids)]
        new = sid if i < len(ids) else f"{sid}_r{i // len(ids)}"
        for folder, ext in (("JPEGImages", ".jpg"), ("SegmentationClass", ".png")):
            target = root / folder / f"{new}{ext}"
            if not target.exists():
                os.link(root / folder / f"{sid}{ext}", target)
        out.append(new)
    atomic_write_bytes(split_file, ("\n".join(out) + "\n").encode())


def section_peak(ctx: Context) -> None:
    import torch
    p, dev = ctx.profile, device()
    for dtype in (torch.bfloat16, torch.float32):
        def measure() -> dict:
            a, b = (torch.randn(p.matmul_n, p.matmul_n, device=dev, dtype=dtype) for _ in range(2))
            out = torch.empty_like(a)
            for _ in range(3):
                torch.matmul(a, b, out=out)
            synchronize()
            start = time.perf_counter()
            for _ in range(p.matmul_iters):
                torch.matmul(a, b, out=out)
            synchronize()
            seconds = (time.perf_counter() - start) / p.matmul_iters
            return {"ms": seconds * 1e3, "tflop_s": 2 * p.matmul_n**3 / seconds / 1e12}
        ctx.attempt({"dtype": str(dtype).removeprefix("torch."), "n": p.matmul_n}, measure)
    ctx.notes.append(f"{p.matmul_n}^3 torch.matmul on random data, mean of {p.matmul_iters} after 3 warm-ups; "
                     "the bf16 rate is the MFU denominator")


def bf16_peak_flops(ctx: Context) -> Optional[float]:
    rows = ctx.results.get("peak", {}).get("rows", [])
    return next((r["tflop_s"] * 1e12 for r in rows if r.get("dtype") == "bfloat16" and "tflop_s" in r), None)


def count_train_flops(backbone: str, crop: int, batch: int) -> int:
    """FLOPs of one forward + backward of DeepLabV3+ with CE loss (torch.utils.flop_counter; optimizer excluded)."""
    import torch
    import torch.nn.functional as F
    from torch.utils.flop_counter import FlopCounterMode
    from segtrain.model import build_model
    from segtrain.voc import NUM_CLASSES
    dev = device()
    model = build_model("deeplabv3plus", backbone, NUM_CLASSES, output_stride=16).to(dev).train()
    images = torch.randn(batch, 3, crop, crop, device=dev)
    labels = torch.randint(0, NUM_CLASSES, (batch, crop, crop), device=dev)
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(model(images)["out"], labels).backward()
    del model, images, labels
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return counter.get_total_flops()


def model_step_rows(ctx: Context, modes: tuple[str, ...]) -> None:
    """bench/model_bench.py's bench() for each batch x mode; steps sized to ~step_seconds from the last row."""
    import model_bench
    p, dev = ctx.profile, device()
    peak = bf16_peak_flops(ctx)
    if peak is None:
        ctx.notes.append("no bf16 peak measured (peak section failed or not run): MFU left out")
    seconds_per_image: dict[str, float] = {}  # by mode, from the last batch; "last": any mode
    for batch in p.batches:
        try:
            flops = count_train_flops(p.backbone, p.crop, batch)
        except Exception as e:
            traceback.print_exc()
            flops = None
            ctx.notes.append(f"batch {batch}: FLOPs not counted ({one_line(e)})")
        for mode in [m for m in modes if batch in p.bf16_batches or model_bench.MODES[m][0] is None]:
            def measure() -> dict:
                known = seconds_per_image.get(mode, seconds_per_image.get("last"))
                guess = p.step_seconds / (known * batch) if known else p.step_range[0]
                steps = int(min(max(guess, p.step_range[0]), p.step_range[1]))
                if mode == COMPILE_MODE:  # compile each batch afresh: a dynamo cache hit would recompile
                    import torch              # with a dynamic batch dimension (other kernels)
                    torch._dynamo.reset()
                start = time.perf_counter()
                seconds, fastest, gib, compile_s = model_bench.bench("deeplabv3plus", p.backbone, mode, p.crop,
                                                                     batch, steps, p.step_warmup, dev)
                total = time.perf_counter() - start
                seconds_per_image[mode] = seconds_per_image["last"] = seconds / batch
                row = {"steps": steps, "s_per_step": seconds, "fastest_s": fastest, "images_per_s": batch / seconds,
                       "peak_mem_mb": gib * 1024, "setup_warmup_s": total - steps * seconds,
                       "compile_s": compile_s}
                if flops:
                    row |= {"gflop_per_image": flops / batch / 1e9, "tflop_s": flops / seconds / 1e12}
                    if peak:
                        row["mfu"] = flops / seconds / peak
                return row
            ctx.attempt({"batch": batch, "mode": mode}, measure)
    memory = "torch.cuda.max_memory_allocated" if dev.type == "cuda" else "peak RSS of the process (CPU)"
    if set(p.batches) - set(p.bf16_batches):
        ctx.notes.append(f"bf16 modes at batch {', '.join(map(str, p.bf16_batches))} only (the {p.name} "
                         "profile: bf16 is emulated on most CPUs)")
    ctx.notes.append(f"DeepLabV3+ {p.backbone} OS16, crop {p.crop}, SGD step, CE loss, random data; "
                     f"{p.step_warmup} untimed warm-up steps; memory = {memory}; MFU = counted model FLOPs "
                     "/ s/step / measured bf16 matmul peak (fp32 rows too)")


def section_model(ctx: Context) -> None:
    model_step_rows(ctx, STEP_MODES)


def section_compile(ctx: Context) -> None:
    if device().type != "cuda":
        ctx.notes.append("torch.compile is measured on the GPU only (Inductor's C++ build takes minutes on a CPU)")
        ctx.add({"mode": COMPILE_MODE, "error": "skipped: CPU mode"})
        return
    model_step_rows(ctx, (COMPILE_MODE,))


def bench_args(ctx: Context, batch: int, precision: Optional[str] = None) -> argparse.Namespace:
    """The namespace bench/train_bench.py's loops read (what its command line would give)."""
    p = ctx.profile
    return argparse.Namespace(backbone=p.backbone, crop=p.crop, batch=batch, warmup=p.train_warmup,
                              steps=p.train_steps, workers=p.workers, precision=precision)


BF16_EMULATED = "skipped: bf16 is emulated on this CPU"


def bf16_emulated(dev) -> bool:
    """A CPU without native bf16 (AVX2): bf16 runs emulated there, ~25x slower than fp32."""
    from segtrain.hardware import cpu_bf16_native
    return dev.type == "cpu" and not cpu_bf16_native()[0]


def section_train(ctx: Context) -> None:
    import train_bench
    from accelerate.state import AcceleratorState
    from segtrain.config import TrainConfig
    from segtrain.checkpoints import read_metrics_log
    p, dev = ctx.profile, device()
    default = TrainConfig().mixed_precision  # what a user who passes no --mixed-precision gets
    resolved: dict[int, str] = {}

    def loop(batch: int, precision: Optional[str]) -> dict:
        run_dir = ctx.work / "runs" / f"train_b{batch}_{precision}"
        reset_peak()  # train() resets it per log window; this also drops what earlier sections left
        images_per_s, peak, _setting = train_bench.segtrain_loop(ctx.manifest, run_dir,
                                                                 bench_args(ctx, batch, str(precision)), dev)
        resolved[batch] = AcceleratorState().mixed_precision  # what Accelerate ran with
        timed = [r for r in read_metrics_log(run_dir / "metrics.jsonl")
                 if "images_per_s" in r and r["step"] > p.train_warmup]
        # segtrain_loop logs every step: each record's window is one step of `batch` images.
        seconds = sum(batch / r["images_per_s"] for r in timed)
        wait = sum(r["data_wait_s"] for r in timed)
        return {"precision": resolved[batch], "steps": len(timed), "images_per_s": images_per_s,
                "peak_mem_mb": peak, "data_wait_pct": 100 * wait / seconds,
                "data_wait_ms_per_step": 1e3 * wait / len(timed)}

    for batch in p.batches:
        ctx.attempt({"loop": "segtrain train()", "batch": batch, "requested": str(default)},
                    lambda: loop(batch, default))
    if resolved.get(p.batches[0], "bf16") != "bf16":  # the default ran another precision: bf16 too, for the ratio
        keys = {"loop": "segtrain train()", "batch": p.batches[0], "requested": "bf16"}
        if bf16_emulated(dev):  # the default (auto) picked fp32 for that reason: no user runs it
            ctx.add(keys | {"error": BF16_EMULATED})
        else:
            ctx.attempt(keys, lambda: loop(p.batches[0], "bf16"))
    ctx.attempt({"loop": "loader alone (no model)", "batch": p.batches[-1]},
                lambda: loader_alone(ctx, p.batches[-1]))
    ctx.notes.append(f"shards -> loaders.train_loader ({p.workers} workers requested, train() caps them at the CPU "
                     f"count) -> train(); {p.train_warmup} warm-up + {p.train_steps} timed steps, logged every step "
                     "(each log syncs the GPU, so time waiting for data is time the GPU sat idle); data wait = time "
                     "in next(batches) and loader start-up (metrics.jsonl data_wait_s)")


SYNC_LOSS = "ce+weighted_ce+focal+dice+lovasz+ohem"  # every loss in one step


def section_syncs(ctx: Context) -> None:
    """train() with every loss, the aux head and gradient clipping: steps 1 .. n-2 (neither the
    warm-up step nor the last, which logs, validates and saves) run under
    torch.cuda.set_sync_debug_mode("error"), so any op that makes the host wait for the GPU
    raises there, naming itself. On a CPU the steps run without the check (CUDA only;
    tests/test_syncs.py counts the same ops on a CPU)."""
    import torch
    import segtrain.train as train_module
    from segtrain.config import parse_config
    p, dev = ctx.profile, device()
    iterations = 5
    checked = dev.type == "cuda"
    real_lr_factor = train_module.lr_factor

    def lr_factor(step: int, cfg) -> float:  # called at the start of every step
        if checked:
            torch.cuda.set_sync_debug_mode("error" if 1 <= step <= iterations - 2 else "default")
        return real_lr_factor(step, cfg)

    def measure() -> dict:
        run_dir = ctx.work / "runs" / "syncs"
        flags = ["--data", str(ctx.manifest), "--run-dir", str(run_dir), "--backbone", p.backbone,
                 "--pretrained", "false", "--crop-size", str(p.crop), "--batch-size", str(p.batches[0]),
                 "--iterations", str(iterations), "--log-every", str(iterations), "--val-every", str(iterations),
                 "--checkpoint-every", str(iterations), "--workers", str(p.workers), "--tracker", "none",
                 "--loss", SYNC_LOSS, "--aux-loss-weight", "0.4", "--grad-clip", "1.0"]
        train_module.lr_factor = lr_factor
        try:
            train_module.train(parse_config(flags))
        finally:
            train_module.lr_factor = real_lr_factor
            if checked:
                torch.cuda.set_sync_debug_mode("default")
        precision = yaml_resolved(run_dir)["mixed_precision"]
        return {"precision": precision, "checked_steps": iterations - 2 if checked else 0,
                "result": "no sync" if checked else "not checked (no CUDA)"}
    ctx.attempt({"loss": SYNC_LOSS, "batch": p.batches[0]}, measure)
    ctx.notes.append("set_sync_debug_mode('error') raises at .item(), nonzero, boolean-mask indexing, "
                     "blocking device-to-host copies, ...; fp16 runs would add GradScaler's one inf check per step "
                     "(not run: auto picks bf16 on compute capability >= 8.0)")


def yaml_resolved(run_dir: Path) -> dict:
    import yaml
    return yaml.safe_load((run_dir / "config.yaml").read_text())["resolved"]


def loader_alone(ctx: Context, batch: int) -> dict:
    """Images/s of loaders.train_loader with nothing consuming its batches: the most the loop can be fed."""
    from segtrain import loaders, sources
    p = ctx.profile
    loader, steps = loaders.train_loader(sources.resolve_data(ctx.manifest, "train"), batch, p.crop, num_workers=p.workers, seed=0, epoch=0)
    start = time.perf_counter()
    batches = iter(loader)
    next(batches)
    first = time.perf_counter()
    images = sum(len(images) for images, _, _ in batches)
    return {"steps": steps - 1, "images_per_s": images / (time.perf_counter() - first),
            "startup_s": first - start}


def section_plain(ctx: Context) -> None:
    import train_bench
    for batch in ctx.profile.batches:
        def measure() -> dict:
            images_per_s, peak = train_bench.plain_loop(ctx.voc_root, bench_args(ctx, batch), device())
            return {"precision": "fp32", "images_per_s": images_per_s, "peak_mem_mb": peak}
        ctx.attempt({"loop": "plain reference-style (bench/train_bench.py)", "batch": batch}, measure)
    ctx.notes.append("map-style DataLoader over the VOC folder, fp32, same model, augmentation, batch and steps "
                     "as the train section")


def section_eval(ctx: Context) -> None:
    import torch
    from segtrain.inference import evaluate, loader_protocol
    from segtrain.model import build_model
    from segtrain.loaders import val_loader
    from segtrain.sources import resolve_data
    from segtrain.voc import NUM_CLASSES
    p, dev = ctx.profile, device()
    model = build_model("deeplabv3plus", p.backbone, NUM_CLASSES, output_stride=16).to(dev)
    # ms-flip's 12 passes per image in emulated bf16 would use the section's whole time for a figure
    # no user runs; whole images still time bf16.
    emulated = bf16_emulated(dev)
    for protocol in ("whole", "ms-flip"):
        for precision, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
            if emulated and protocol == "ms-flip" and precision == "bf16":
                ctx.add({"protocol": protocol, "precision": precision, "error": BF16_EMULATED})
                continue
            def measure() -> dict:
                loader = val_loader(resolve_data(ctx.val_manifest, "val"), batch_size=1, num_workers=min(p.workers, 4),
                                    protocol=loader_protocol(protocol))
                first: dict = {}

                def after_batch(images, masks, preds, ids) -> None:
                    if not first:  # the clock starts once the first image is done (start-up excluded)
                        synchronize()
                        first.update(t=time.perf_counter(), n=len(ids))
                reset_peak()
                metrics = evaluate(model, loader, dev, NUM_CLASSES, protocol, autocast_dtype=dtype,
                                   on_batch=after_batch)
                timed = metrics["num_images"] - first["n"]
                return {"images": timed, "images_per_s": timed / (time.perf_counter() - first["t"]),
                        "peak_mem_mb": peak_mb()}
            ctx.attempt({"protocol": protocol, "precision": precision}, measure)
    ctx.notes.append(f"random-init DeepLabV3+ {p.backbone} on the {p.val_images} synthetic val images "
                     f"({p.image_size[0]}-{p.image_size[1]} px), batch 1, loader workers included; "
                     "the first image is untimed")


def tiny_sam(image_size: int = 256):
    """SAM built as segment_anything's _build_sam builds vit_b, at CPU size: a 2-block, 64-wide image
    encoder at ``image_size`` px (vit_b: 12 blocks, 768 wide, 1024 px); SAM's own prompt encoder and
    mask decoder, random weights. The generator and segtrain.sam run the same code on it."""
    from functools import partial
    import torch
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer
    grid = image_size // 16  # patch size 16
    encoder = ImageEncoderViT(depth=2, embed_dim=64, img_size=image_size, mlp_ratio=4, num_heads=2, patch_size=16,
                              norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), qkv_bias=True, use_rel_pos=True,
                              global_attn_indexes=[1], window_size=14, out_chans=256)
    prompts = PromptEncoder(embed_dim=256, image_embedding_size=(grid, grid), input_image_size=(image_size, image_size),
                            mask_in_chans=16)
    decoder = MaskDecoder(num_multimask_outputs=3, transformer_dim=256, iou_head_depth=3, iou_head_hidden_dim=256,
                          transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8))
    return Sam(image_encoder=encoder, prompt_encoder=prompts, mask_decoder=decoder,
               pixel_mean=[123.675, 116.28, 103.53], pixel_std=[58.395, 57.12, 57.375]).eval()


def section_sam(ctx: Context) -> None:
    import itertools
    import numpy as np
    from segment_anything import sam_model_registry
    from segtrain.sam import mask_generator, sam_masks
    from segtrain.loaders import iter_samples
    from segtrain.sources import resolve_data
    p, dev = ctx.profile, device()
    sam = tiny_sam() if p.sam_model == "tiny" else sam_model_registry[p.sam_model]()  # no checkpoint: random weights
    generator = mask_generator(sam.to(dev).eval(), points_per_side=p.sam_points)
    samples = list(itertools.islice(iter_samples(resolve_data(ctx.val_manifest, "val")), p.sam_images + 1))
    if len(samples) < p.sam_images + 1:
        raise ValueError(f"need {p.sam_images + 1} val images, the data section made {len(samples)}")
    sam_masks(generator, np.asarray(samples[0][1]))  # warm-up: CUDA kernels, cuDNN, allocator
    for sid, image, _ in samples[1:]:
        def measure() -> dict:
            synchronize()
            start = time.perf_counter()
            masks = sam_masks(generator, np.asarray(image))
            synchronize()
            return {"seconds": time.perf_counter() - start, "masks": len(masks)}
        ctx.attempt({"image": sid, "size": f"{image.width}x{image.height}"}, measure)
    times = [r["seconds"] for r in ctx.rows if "seconds" in r]
    if times:
        ctx.notes.append(f"SAM {p.sam_model} (random weights), automatic generator with {p.sam_points}x"
                         f"{p.sam_points} points, one untimed warm-up image: mean {statistics.mean(times):.3f} s, "
                         f"median {statistics.median(times):.3f} s per image (random weights keep few or no masks, "
                         "so mask post-processing costs little here)")


SECTIONS: dict[str, Callable[[Context], None]] = {
    "env": section_env, "data": section_data, "peak": section_peak, "model": section_model,
    "train": section_train, "syncs": section_syncs, "plain": section_plain, "eval": section_eval, "sam": section_sam,
    "compile": section_compile,
}


def run_section(name: str, profile: Profile, work: Path, deadline: float) -> int:
    """Child process: run one section, keeping WORK/results/NAME.json current."""
    path = work / "results" / f"{name}.json"
    results = {p.stem: json.loads(p.read_text()) for p in sorted((work / "results").glob("*.json")) if p != path}
    ctx = Context(profile, work, deadline, results)
    start = time.perf_counter()

    def save(status: str = "running", error: Optional[str] = None) -> None:
        write_json(path, {"status": status, "seconds": time.perf_counter() - start, "rows": ctx.rows,
                          "notes": ctx.notes, **({"error": error} if error else {})})
    ctx.save = save
    try:
        SECTIONS[name](ctx)
    except Exception as e:
        traceback.print_exc()
        save("error", one_line(e))
        return 1
    failed = [r["error"] for r in ctx.rows if "error" in r and not r["error"].startswith("skipped")]
    save("error" if failed else "ok", f"{len(failed)} row(s) failed, first: {failed[0]}" if failed else None)
    return 1 if failed else 0


# ----------------------------------------------------------------------------- the driver

def write_json(path: Path, data: Any) -> None:
    """Strict JSON (NaN -> null), written atomically: a reader never sees half a file."""
    from segtrain.files import atomic_write_bytes
    from segtrain.metrics import to_jsonable
    atomic_write_bytes(path, (json.dumps(to_jsonable(data), indent=1, default=str, allow_nan=False) + "\n").encode())


def run_child(name: str, args: argparse.Namespace, profile: Profile, work: Path, timeout: float) -> dict:
    """Run one section in a fresh process (its own session, so a timeout ends its loader workers too)."""
    path = work / "results" / f"{name}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--section", name, "--work", str(work),
           "--deadline", str(time.time() + timeout - min(15.0, timeout / 5))] + (["--cpu"] if args.cpu else [])
    start = time.perf_counter()
    print(f"\n=== section {name} (limit {timeout:.0f} s) ===", flush=True)
    env = os.environ | {"TQDM_DISABLE": "1"} | ({"OMP_NUM_THREADS": str(profile.threads)} if profile.threads else {})
    proc = subprocess.Popen(cmd, start_new_session=True, env=env)
    try:
        code = proc.wait(timeout=timeout)
        problem = None if code in (0, 1) else f"the section's process died (exit status {code})"
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        problem = f"timed out after {timeout:.0f} s (rows finished before are kept)"
    result = json.loads(path.read_text()) if path.exists() else {"rows": [], "notes": []}
    if problem:
        result |= {"status": "error", "error": problem}
        write_json(path, result)
    result["seconds"] = time.perf_counter() - start
    print(f"=== section {name}: {result.get('status')} in {result['seconds']:.1f} s"
          + (f" ({result['error']})" if result.get("error") else ""), flush=True)
    return result


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, help="folder for gpu_check.md and gpu_check.json")
    ap.add_argument("--cpu", action="store_true",
                    help=f"toy sizes ({CPU.backbone}, crop {CPU.crop}) that run on a CPU in 1-2 minutes")
    ap.add_argument("--sections", default=",".join(SECTIONS),
                    help="comma-separated subset to run, e.g. to rerun the failed ones (default: all, in order)")
    ap.add_argument("--budget", type=float, help=f"seconds for the whole run (default: {GPU.budget_s:.0f} on a GPU, "
                                                 f"{CPU.budget_s:.0f} with --cpu)")
    ap.add_argument("--work", type=Path, help="scratch folder (data, runs); default a temporary one, removed after")
    ap.add_argument("--section", help=argparse.SUPPRESS)   # internal: run one section in this process
    ap.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    profile, shm_message = fit_workers_to_shm(CPU if args.cpu else GPU)
    if args.section:
        return run_section(args.section, profile, args.work, args.deadline)
    if args.out is None:
        ap.error("--out is required")
    names = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in names if s not in SECTIONS]
    if unknown:
        ap.error(f"unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
    if not args.cpu and not cuda_present():
        print("warning: no CUDA GPU visible; the GPU sizes will be very slow here (use --cpu)", file=sys.stderr)
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.work or Path(tempfile.mkdtemp(prefix="segtrain-gpu-check-"))
    (work / "results").mkdir(parents=True, exist_ok=True)
    if shm_message:
        print(f"warning: {shm_message}", file=sys.stderr)
    started = time.time()
    deadline = started + (args.budget or profile.budget_s)
    shares = section_timeouts(names, profile.limits, deadline - started)
    results: dict[str, dict] = {}
    try:
        for i, name in enumerate(names):
            left = deadline - time.time() - sum(shares[n] for n in names[i + 1:])  # the later ones' shares kept
            if left < 10:
                results[name] = {"status": "skipped", "error": "out of the run's time budget", "rows": [], "notes": []}
            else:
                (work / "results" / f"{name}.json").unlink(missing_ok=True)
                results[name] = run_child(name, args, profile, work, min(profile.limits[name], left))
            if shm_message and name == "env":
                results[name].setdefault("notes", []).append(shm_message)
            report(args.out, profile, results, time.time() - started)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    print("\n" + (args.out / "gpu_check.md").read_text())
    return 0 if all(r.get("status") == "ok" for r in results.values()) else 1


def cuda_present() -> bool:
    return Path("/dev/nvidiactl").exists() or bool(shutil.which("nvidia-smi"))


# ----------------------------------------------------------------------------- tables

COLUMNS = {  # section: (title, [(key, header, format)])
    "peak": ("Matrix-product peak", [("dtype", "dtype", "{}"), ("n", "n", "{}"), ("ms", "ms", "{:.3f}"),
                                     ("tflop_s", "TFLOP/s", "{:.1f}")]),
    "model": ("Model step (bench/model_bench.py)", None),
    "compile": ("Model step, torch.compile", None),
    "train": ("Training loop: segtrain train() on shards", [
        ("loop", "loop", "{}"), ("batch", "batch", "{}"), ("requested", "--mixed-precision", "{}"),
        ("precision", "ran as", "{}"), ("steps", "timed steps", "{}"), ("images_per_s", "images/s", "{:.1f}"),
        ("peak_mem_mb", "peak MB", "{:.0f}"), ("data_wait_pct", "data wait %", "{:.1f}"),
        ("data_wait_ms_per_step", "data wait ms/step", "{:.1f}"), ("startup_s", "loader start s", "{:.2f}")]),
    "syncs": ("Host-device syncs in training steps", [
        ("loss", "loss", "{}"), ("batch", "batch", "{}"), ("precision", "precision", "{}"),
        ("checked_steps", "steps under sync_debug_mode error", "{}"), ("result", "result", "{}")]),
    "plain": ("Plain fp32 reference-style loop", [
        ("loop", "loop", "{}"), ("batch", "batch", "{}"), ("precision", "precision", "{}"),
        ("images_per_s", "images/s", "{:.1f}"), ("peak_mem_mb", "peak MB", "{:.0f}")]),
    "eval": ("Evaluation (segtrain.evaluate)", [
        ("protocol", "protocol", "{}"), ("precision", "precision", "{}"), ("images", "timed images", "{}"),
        ("images_per_s", "images/s", "{:.2f}"), ("peak_mem_mb", "peak MB", "{:.0f}")]),
    "sam": ("SAM automatic mask generation", [
        ("image", "image", "{}"), ("size", "size", "{}"), ("seconds", "s/image", "{:.3f}"), ("masks", "masks", "{}")]),
    "data": ("Synthetic data", [("split", "split", "{}"), ("images", "images", "{}"), ("shards", "shards", "{}"),
                                ("sizes_px", "side px", "{}")]),
}
STEP_COLUMNS = [("batch", "batch", "{}"), ("mode", "mode", "{}"), ("steps", "timed steps", "{}"),
                ("s_per_step", "s/step", "{:.4f}"), ("images_per_s", "images/s", "{:.1f}"),
                ("peak_mem_mb", "peak MB", "{:.0f}"), ("gflop_per_image", "GFLOP/image", "{:.1f}"),
                ("tflop_s", "TFLOP/s", "{:.1f}"), ("mfu", "MFU %", "{:.1%}"),
                ("setup_warmup_s", "build+warm-up s", "{:.1f}")]


def cell(row: dict, key: str, fmt: str) -> str:
    value = row.get(key)
    if value is None:
        return "n/a"
    if fmt == "{:.1%}":
        return f"{100 * value:.1f}"
    return fmt.format(value)


def table(rows: list[dict], columns: list[tuple[str, str, str]]) -> list[str]:
    keys = [c for c in columns if any(c[0] in r for r in rows)]
    has_error = any("error" in r for r in rows)
    lines = ["| " + " | ".join(h for _, h, _ in keys) + (" | error |" if has_error else " |"),
             "|" + "---|" * (len(keys) + has_error)]
    for r in rows:
        cells = [cell(r, k, f) for k, _, f in keys] + ([r.get("error", "")] if has_error else [])
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def header_lines(env: dict, profile: Profile, wall_s: float) -> list[str]:
    info = (env.get("rows") or [{}])[0]
    where = (f"{info.get('gpu')} ({info.get('gpu_memory_mib')} MiB, {info.get('multiprocessors')} SMs, "
             f"capability {info.get('capability')}), driver {info.get('driver', 'unknown')}"
             if info.get("gpu") else f"no GPU: {info.get('cpu', 'unknown CPU')}, {info.get('cpus')} CPUs, "
                                     f"bf16 CPU flags: {info.get('cpu_bf16_flags')}")
    return [f"# segtrain GPU check ({profile.name} mode)", "",
            f"- date: {info.get('date_utc', 'unknown')}; commit {info.get('commit', 'unknown')}; "
            f"whole run {wall_s:.0f} s",
            f"- device: {where}",
            f"- torch {info.get('torch')} (CUDA {info.get('torch_cuda')}, cuDNN {info.get('cudnn')}), "
            f"torchvision {info.get('torchvision')}, timm {info.get('timm')}, accelerate {info.get('accelerate')}, "
            f"webdataset {info.get('webdataset')}, segment-anything {info.get('segment-anything')}, "
            f"Python {info.get('python')}",
            f"- host CPU: {info.get('cpu')}, {info.get('cpus')} CPUs, /dev/shm {info.get('shm_mib', '?')} MiB"
            + (f"; TF32 matmul {info.get('tf32_matmul')}, TF32 cuDNN {info.get('tf32_cudnn')}, "
               f"cudnn.benchmark {info.get('cudnn_benchmark')}" if info.get("gpu") else ""),
            f"- sizes: DeepLabV3+ {profile.backbone} OS16, crop {profile.crop}, batches "
            f"{', '.join(map(str, profile.batches))}"]


def goals(results: dict, profile: Profile) -> list[str]:
    """The issue's goals, judged from this run's own figures."""
    batch = profile.batches[0]
    train = [r for r in results.get("train", {}).get("rows", []) if r.get("loop") == "segtrain train()"
             and r.get("batch") == batch and "images_per_s" in r]
    plain = next((r for r in results.get("plain", {}).get("rows", []) if r.get("batch") == batch
                  and "images_per_s" in r), None)
    steps = [r for name in ("model", "compile") for r in results.get(name, {}).get("rows", []) if "mfu" in r]
    lines = ["| goal | target | measured | met |", "|---|---|---|---|"]
    if train and plain:
        for r in train:
            ratio = r["images_per_s"] / plain["images_per_s"]
            lines.append(f"| train() {r['precision']} (--mixed-precision {r['requested']}) vs plain fp32 loop, "
                         f"images/s, batch {batch} | >= {GOAL_SPEEDUP:.0f}x | {ratio:.2f}x "
                         f"({r['images_per_s']:.1f} / {plain['images_per_s']:.1f}) | "
                         f"{'yes' if ratio >= GOAL_SPEEDUP else 'no'} |")
    else:
        lines.append(f"| train() vs plain fp32 loop, batch {batch} | >= {GOAL_SPEEDUP:.0f}x | not measured | n/a |")
    default = train[0] if train else None  # the run at the default precision comes first
    if default and default.get("peak_mem_mb") is not None:
        lines.append(f"| peak memory, train() default precision, batch {batch} | < {REFERENCE_MB} MB | "
                     f"{default['peak_mem_mb']:.0f} MB | {'yes' if default['peak_mem_mb'] < REFERENCE_MB else 'no'} |")
    else:
        lines.append(f"| peak memory, batch {batch} | < {REFERENCE_MB} MB | not measured (no CUDA) | n/a |")
    if steps:
        best = max(steps, key=lambda r: r["mfu"])
        lines.append(f"| best MFU (model step) | >= {GOAL_MFU:.0%} | {best['mfu']:.1%} ({best['mode']}, batch "
                     f"{best['batch']}) | {'yes' if best['mfu'] >= GOAL_MFU else 'no'} |")
    else:
        lines.append(f"| best MFU (model step) | >= {GOAL_MFU:.0%} | not measured | n/a |")
    if profile.name != "gpu":
        lines.append("")
        lines.append("(CPU mode: toy sizes; the goals are for crop 513 on one GPU.)")
    return lines


def report(out: Path, profile: Profile, results: dict, wall_s: float) -> None:
    lines = header_lines(results.get("env", {}), profile, wall_s)
    lines += ["", "## Goals (issue 12)", ""] + goals(results, profile)
    lines += ["", "## Sections", "", "| section | status | seconds | error |", "|---|---|---|---|"]
    lines += [f"| {n} | {r.get('status')} | {r.get('seconds', 0):.1f} | {r.get('error', '')} |"
              for n, r in results.items()]
    for name, (title, columns) in COLUMNS.items():
        if name not in results:
            continue
        result = results[name]
        lines += ["", f"## {title}", ""]
        if result.get("rows"):
            lines += table(result["rows"], columns or STEP_COLUMNS)
        if result.get("error"):
            lines += ["", f"**{result.get('status')}**: {result['error']}"]
        lines += [""] + [f"- {note}" for note in result.get("notes", [])]
    from segtrain.files import atomic_write_bytes
    atomic_write_bytes(out / "gpu_check.md", ("\n".join(lines) + "\n").encode())
    write_json(out / "gpu_check.json", {"profile": dataclasses.asdict(profile), "wall_s": wall_s,
                                        "goals": {"speedup": GOAL_SPEEDUP, "reference_mb": REFERENCE_MB,
                                                  "mfu": GOAL_MFU},
                                        "sections": results})


if __name__ == "__main__":
    sys.exit(main())
