"""The one step-timing harness: how long a training (or inference) step of a model takes.

Serves the precision autotune (segtrain/autotune.py), the demo's step budget
(segtrain/budget.py) and the bench scripts (bench/model_bench.py, bench/train_bench.py),
so that all of them time the same thing: a forward pass under autocast (and, in
training, cross-entropy in fp32, backward and an SGD step) on random data of the
real shape, after untimed warm-up steps.

    timing = time_setting(shape, crop=129, batch=8, precision="bf16", channels_last=True)
    timing.fastest, timing.mean   # seconds per step

On a shared machine load only ever slows a step down, so the fastest step is the
better estimate of what the setting can do; ``mean`` is kept for reports.
"""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.nn.functional as F

from segtrain.datasets import IGNORE_INDEX
from segtrain.model import build_model

MODES = ("train", "infer")


@dataclass(frozen=True)
class ModelShape:
    """What a step's cost depends on besides crop and batch: the model's own build arguments
    (``DeepLab.model_config`` without the weights)."""

    arch: str = "deeplabv3plus"
    backbone: str = "resnet18"
    num_classes: int = 21
    output_stride: int = 16
    separable: bool = False
    aux_head: bool = False

    @classmethod
    def of(cls, config: Mapping[str, Any]) -> "ModelShape":
        """From a ``model_config`` (checkpoints) or any mapping with those keys."""
        return cls(**{k: config[k] for k in cls.__dataclass_fields__ if k in config})

    def key(self) -> str:
        return (f"{self.arch}/{self.backbone}/c{self.num_classes}/os{self.output_stride}"
                f"{'/sep' if self.separable else ''}{'/aux' if self.aux_head else ''}")

    def build(self) -> torch.nn.Module:
        torch.manual_seed(0)
        return build_model(self.arch, self.backbone, self.num_classes, self.output_stride,
                           separable=self.separable, aux_head=self.aux_head)


@dataclass
class Timing:
    """Seconds of each timed step (after warm-up), and of each warm-up step."""

    steps: list[float]
    warmup: list[float] = field(default_factory=list)

    @property
    def fastest(self) -> float:
        return min(self.steps)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.steps)


def autocast_dtype(precision: str) -> Optional[torch.dtype]:
    return torch.bfloat16 if precision == "bf16" else torch.float16 if precision == "fp16" else None


def random_batch(batch: int, crop: int, num_classes: int, channels_last: bool,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Images and labels of the real shape (a few ignored rows, as VOC's boundaries)."""
    g = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, crop, crop, generator=g).to(device)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, num_classes, (batch, crop, crop), generator=g).to(device)
    labels[:, :4] = IGNORE_INDEX
    return images, labels


def train_step(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor,
               precision: str) -> Callable[[], None]:
    """One optimizer step as training runs it: autocast forward, fp32 loss, backward, SGD."""
    model.train()
    dtype = autocast_dtype(precision)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(images.device.type, dtype=dtype, enabled=dtype is not None):
            out = model(images)
        loss = F.cross_entropy(out["out"].float(), labels, ignore_index=IGNORE_INDEX)
        if "aux" in out:
            loss = loss + 0.4 * F.cross_entropy(out["aux"].float(), labels, ignore_index=IGNORE_INDEX)
        loss.backward()
        optimizer.step()
    return step


def infer_step(model: torch.nn.Module, images: torch.Tensor, precision: str) -> Callable[[], None]:
    """One forward pass as evaluate/predict run it (eval mode, inference_mode, autocast)."""
    model.eval()
    dtype = autocast_dtype(precision)

    def step() -> None:
        with torch.inference_mode(), torch.autocast(images.device.type, dtype=dtype, enabled=dtype is not None):
            model(images)["out"].argmax(dim=1)
    return step


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(step: Callable[[], None], steps: int, warmup: int = 1, device: torch.device = torch.device("cpu"),
               after_warmup: Optional[Callable[[], None]] = None) -> Timing:
    """Run ``step`` ``warmup`` times untimed-for-the-estimate, then ``steps`` times timed."""
    def timed() -> float:
        start = time.perf_counter()
        step()
        sync(device)
        return time.perf_counter() - start
    warm = [timed() for _ in range(warmup)]
    if after_warmup is not None:
        after_warmup()
    return Timing([timed() for _ in range(steps)], warm)


def is_channels_last(model: torch.nn.Module) -> bool:
    """Whether ``model``'s convolutions are in channels_last (``model.to(memory_format=...)``):
    read from its first weight with a spatial extent (1x1 kernels look the same in both)."""
    for p in model.parameters():
        if p.dim() == 4 and p.shape[2] * p.shape[3] > 1 and p.shape[1] > 1:
            return p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
    return False


def prepare(model: torch.nn.Module, shape: ModelShape, crop: int, batch: int, precision: str,
            channels_last: bool, mode: str = "train",
            device: torch.device = torch.device("cpu")) -> Callable[[], None]:
    """The step function of ``model`` (moved to ``device`` and the memory format) in one setting."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    model = model.to(device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    images, labels = random_batch(batch, crop, shape.num_classes, channels_last, device)
    return train_step(model, images, labels, precision) if mode == "train" else infer_step(model, images, precision)


def time_setting(shape: ModelShape, crop: int, batch: int, precision: str, channels_last: bool,
                 mode: str = "train", steps: int = 3, warmup: int = 2,
                 device: torch.device = torch.device("cpu")) -> Timing:
    """Build ``shape``'s model and time ``steps`` steps of it in one setting."""
    step = prepare(shape.build(), shape, crop, batch, precision, channels_last, mode, device)
    return time_calls(step, steps, warmup, device)


def time_interleaved(steps_of: Mapping[str, Callable[[], None]], rounds: int, warmup: int = 1,
                     device: torch.device = torch.device("cpu"),
                     drop_slower_than: Optional[float] = None) -> dict[str, Timing]:
    """Time several settings round-robin (A B C D, A B C D, ...): load that comes and goes
    then hits every setting alike, instead of whichever happened to run during it.

    ``drop_slower_than``: a setting whose last warm-up step took more than this factor x the
    fastest one's is not timed further; its last warm-up step stands as its figure (a clear
    loser costs no more steps)."""
    timings = {name: time_calls(step, 0, warmup, device) for name, step in steps_of.items()}
    timed = dict(steps_of)
    if drop_slower_than is not None and warmup > 0:
        best = min(t.warmup[-1] for t in timings.values())
        for name, t in timings.items():
            if t.warmup[-1] > drop_slower_than * best:
                del timed[name]
                t.steps.append(t.warmup[-1])
    for _ in range(rounds):
        for name, step in timed.items():
            timings[name].steps.extend(time_calls(step, 1, 0, device).steps)
    return timings


__all__ = ["ModelShape", "Timing", "MODES", "is_channels_last", "random_batch", "train_step", "infer_step",
           "time_calls", "prepare", "time_setting", "time_interleaved", "sync", "autocast_dtype"]
