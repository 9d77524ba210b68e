"""The run plan: everything a training run derives from its config, and every up-front check.

    plan = plan_run(cfg, world_size=accelerator.num_processes, device_type=accelerator.device.type,
                    runtime=autotune.training_runtime(cfg, state))

``plan_run`` is a function of its arguments and of the files they name (manifests, the
run directory): it starts no process, builds no model and opens no loader, so tests
check its arithmetic and its errors directly. A bad config fails here, with one
ConfigError/DataError, before anything is written. New checks of a run belong here.

Each data source is resolved here, once (``sources.resolve_data``): the loader arguments
are kept as the very keyword arguments ``train()`` passes to ``loaders.train_loader`` /
``loaders.val_loader``, the resolved ``DataSource`` among them (``RunPlan.train_source``,
``val_source``); the record a resume compares (``RunPlan.data_order``) is built from them,
so it cannot drift from what the loader gets.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from segtrain import distributed, hardware, integrity, loaders
from segtrain.inference import loader_protocol
from segtrain.autotune import Runtime
from segtrain.checkpoints import RunDir, read_train_state, resolve_resume
from segtrain.files import ConfigError
from segtrain.losses import LOSS_OPTIONS
from segtrain.datasets import DatasetSpec
from segtrain.sources import DataSource, resolve_data
from segtrain.voc import read_split


# A segtrain.config.TrainConfig. Not imported: config.py borrows its choices from modules (the
# trackers) that take a RunPlan, and no import may go round in a circle, TYPE_CHECKING's included.
TrainConfig = Any


# The data-order settings a resume on another number of processes changes (keeping their product,
# the global batch): the loader's processes and per-process batch, and the accumulation.
LAYOUT_KEYS = ("world_size", "batch_size", "grad_accum")


@dataclass(frozen=True)
class Resize:
    """A resume on another number of processes: the checkpoint's (processes, per-process batch,
    accumulation) and this run's, their product (the global batch) the same."""

    before: tuple[int, int, int]
    after: tuple[int, int, int]

    def line(self) -> str:
        """What changed, in one line."""
        names = ("processes", "per-process batch", "accumulation")
        changed = ", ".join(f"{name} {a} -> {b}" for name, a, b in zip(names, self.before, self.after) if a != b)
        return (f"resume on another number of processes: {changed} (global batch {math.prod(self.after)} as "
                "before); the interrupted epoch goes on with the samples it had not used; dropout's RNG "
                "re-seeded per process from the seed and step")


@dataclass(frozen=True)
class RunPlan:
    """What ``train()`` needs besides the config (``cfg``, with ``train_split`` resolved)."""

    cfg: TrainConfig                  # train_split resolved
    run_dir: RunDir                   # every path the run writes
    resume_from: Optional[Path]       # the checkpoint folder --resume names, checked to exist
    world_size: int                   # processes
    per_process_batch: int            # images per process per micro-batch
    steps_per_epoch: int              # optimizer steps
    train_loader: dict[str, Any]      # loaders.train_loader's keyword arguments (source: the DataSource), but
                                      # epoch and rank
    val_loader: dict[str, Any]        # loaders.val_loader's keyword arguments (source: the DataSource), but rank
    loss_options: dict[str, Any]      # build_loss(options=...): the config's value of every loss option
    class_pixel_counts: Optional[list[int]]  # for weighted_ce, from the train manifest
    eval_autocast_dtype: Optional[torch.dtype]  # validation runs under the training precision
    runtime: Runtime                  # what "auto" settings became here (saved in config.yaml, checkpoints)
    spec: DatasetSpec                 # what the data is (classes, palette, ...): into the checkpoints
    notes: tuple[str, ...] = ()       # warnings for the user (the run can go on)
    resize: Optional[Resize] = None   # a resume on another number of processes: what changed
    layouts: tuple[tuple[int, int, int], ...] = ()  # (step, processes, per-process batch) from the step
                                      # each began, this run's last: the TrainState keeps them (epoch_layouts)

    @property
    def data_order(self) -> dict[str, Any]:
        """Every setting the sequence of batches depends on: a resume must match them all (the
        loader workers and pinning are not among them: a resume may run on other hardware). The
        data is recorded as the user named it (``--data``) and the split it resolved to."""
        order = {k: v for k, v in self.train_loader.items() if k not in loaders.ORDER_FREE and k != "source"}
        return dict(order, data=self.cfg.data, split=self.train_source.split, grad_accum=self.cfg.grad_accum)

    @property
    def resolved(self) -> dict[str, Any]:
        """config.yaml's ``resolved:`` record: the runtime's choices and the process layout."""
        return self.runtime.to_dict() | {"processes": self.world_size, "per_process_batch": self.per_process_batch}

    @property
    def train_source(self) -> DataSource:
        return self.train_loader["source"]

    @property
    def val_source(self) -> DataSource:
        return self.val_loader["source"]

    @property
    def workers(self) -> int:
        return self.train_loader["num_workers"]

    def epoch_layouts(self, epoch: int) -> tuple[tuple[int, loaders.Layout], ...]:
        """The process layouts that dealt ``epoch`` (``train_loader(layouts=...)``): each with the
        global sample of the epoch it began at, the first at 0; one, usually."""
        start, found = epoch * self.steps_per_epoch, []
        for step, processes, batch in self.layouts:
            offset = max(step - start, 0) * self.cfg.batch_size
            if found and found[-1][0] == offset:  # the earlier one dealt none of this epoch
                found.pop()
            if not found or found[-1][1] != loaders.Layout(processes, batch):
                found.append((offset, loaders.Layout(processes, batch)))
        return tuple(found)

    def with_runtime(self, **changes: Any) -> RunPlan:
        """This plan with ``runtime`` fields changed (``compiled``, known after the first step)."""
        return dataclasses.replace(self, runtime=dataclasses.replace(self.runtime, **changes))

    def logs_at(self, step: int) -> bool:
        return step % self.cfg.log_every == 0 or step == self.cfg.iterations

    def validates_at(self, step: int) -> bool:
        every = self.cfg.val_every or self.steps_per_epoch
        return step % every == 0 or step == self.cfg.iterations

    def checkpoints_at(self, step: int) -> bool:
        return step % self.cfg.checkpoint_every == 0 or step == self.cfg.iterations


def plan_run(cfg: TrainConfig, world_size: int = 1, device_type: str = "cpu",
             runtime: Optional[Runtime] = None) -> RunPlan:
    """Derive the run's plan from ``cfg`` for ``world_size`` processes on ``device_type``
    devices (``accelerator.device.type``) with ``runtime``, what autotune.training_runtime chose
    for this machine (default: fp32)."""
    runtime = runtime or Runtime()
    run_dir = RunDir(cfg.resolved_run_dir())
    resume_from = resolve_resume(cfg.resume, run_dir) if cfg.resume else None
    record = read_train_state(resume_from) if resume_from else None
    cfg, resize = fit_to_processes(cfg, world_size, saved_layout(record))
    per_process_batch, notes = check_batch(cfg, world_size, device_type)
    # --resume auto and no checkpoint yet: the run stopped before its first one; start it afresh.
    if resume_from is None and cfg.resume != "auto" and run_dir.metrics.exists():
        raise ConfigError(f"run_dir: {run_dir} already holds a run; pass --resume latest (or auto) to continue "
                          "it, or choose another --run-dir")

    train_source = resolve_data(cfg.data, cfg.train_split)  # None: the split the manifest names, else train
    cfg = dataclasses.replace(cfg, train_split=train_source.split)
    val_source = resolve_data(cfg.val_data or cfg.data, cfg.val_split)  # voc-train.json stands for voc-val.json
    check_disjoint(train_source, val_source)
    workers = loader_workers(cfg.workers)
    if workers > 1 and not train_source.local and not cfg.remote_cache_gb:
        # The batch order is fixed whatever the worker count (exact resume), so every worker reads
        # the rank's whole share and decodes only its own batches: without the node's copy
        # (segtrain/shardcache.py) that is W fetches over the network.
        notes = notes + (f"remote training data with --remote-cache-gb 0: each of the {workers} loader workers "
                         "fetches this process's share of every shard per epoch; a cache fetches each once",)
    pin = device_type == "cuda"  # pinned batches: .to(device, non_blocking=True) copies asynchronously
    train_loader = dict(source=train_source, batch_size=per_process_batch, crop_size=cfg.crop_size,
                        num_workers=workers, seed=cfg.seed, world_size=world_size,
                        color_jitter=cfg.color_jitter, scale=(cfg.scale_min, cfg.scale_max), pin_memory=pin,
                        node_cache_gb=cfg.remote_cache_gb)
    val_loader = dict(source=val_source, num_workers=min(workers, 2), protocol=loader_protocol(cfg.val_protocol),
                      crop_size=cfg.crop_size, world_size=world_size, pin_memory=pin)
    for source in (train_source, val_source):  # damaged shards fail here, before RUN_DIR exists
        integrity.verify_source(source, cfg.verify_shards)
    batches = loaders.batches_per_epoch(train_source, per_process_batch, world_size)
    if batches < cfg.grad_accum:
        raise ConfigError(f"grad_accum: an epoch has only {batches} batches of {per_process_batch} "
                          f"per process, fewer than grad_accum={cfg.grad_accum}")
    manifest = train_source.manifest
    spec = check_classes(cfg, train_source, val_source)
    cfg = dataclasses.replace(cfg, num_classes=spec.num_classes)

    return RunPlan(cfg=cfg, run_dir=run_dir, resume_from=resume_from, world_size=world_size,
                   per_process_batch=per_process_batch, steps_per_epoch=batches // cfg.grad_accum,
                   train_loader=train_loader, val_loader=val_loader,
                   loss_options={name: getattr(cfg, name) for name in LOSS_OPTIONS},
                   class_pixel_counts=manifest["class_pixel_counts"] if manifest else None,
                   eval_autocast_dtype=hardware.autocast_dtype(runtime.mixed_precision, device_type), spec=spec,
                   runtime=runtime, notes=notes, resize=resize,
                   layouts=layout_history(record, world_size, per_process_batch))


def loader_workers(requested: int) -> int:
    """``requested`` loader workers per process, at most this process's share of the CPUs it may
    use (its affinity: a SLURM/cgroup limit) among this machine's processes: more only contend."""
    if requested == 0:
        return 0
    return min(requested, max(1, distributed.usable_cpus() // distributed.local_processes()))


def saved_layout(record: Optional[dict]) -> Optional[tuple[int, int, int]]:
    """(processes, per-process batch, accumulation) of the run that saved a TrainState ``record``."""
    order = (record or {}).get("data_order") or {}
    try:
        return int(order["world_size"]), int(order["batch_size"]), int(order["grad_accum"])
    except (KeyError, TypeError, ValueError):
        return None


def layout_history(record: Optional[dict], world_size: int, batch: int) -> tuple[tuple[int, int, int], ...]:
    """The run's process layouts (step, processes, per-process batch) with this one, from the step
    it resumes at when it differs from the last (a fresh run: just this one, from step 0)."""
    saved = saved_layout(record)
    if record is None or saved is None:
        return ((0, world_size, batch),)
    history = [tuple(map(int, entry)) for entry in record.get("layouts") or [(0, saved[0], saved[1])]]
    if history[-1][1:] != (world_size, batch):
        history.append((int(record["step"]), world_size, batch))
    return tuple(history)


def fit_to_processes(cfg: TrainConfig, world_size: int,
                     saved: Optional[tuple[int, int, int]]) -> tuple[TrainConfig, Optional[Resize]]:
    """A resume of a checkpoint ``saved`` by (processes, per-process batch, accumulation) on
    ``world_size`` processes: the same global batch, with the accumulation that keeps the
    per-process batch (its memory) as large as it was but no larger where one can; a global batch
    that does not split over ``world_size`` processes is one line naming the counts that work."""
    if saved is None or saved[0] == world_size:
        return cfg, None
    total, least = math.prod(saved), 1 if cfg.sync_bn and world_size > 1 else 2  # ASPP's pooling BN: check_batch
    if cfg.batch_size != total:
        raise ConfigError(f"batch_size: the checkpoint was trained with a global batch of {total} "
                          f"({' x '.join(map(str, saved))}), this run asks for {cfg.batch_size}; resume with "
                          f"--batch-size {total}")
    batches = [total // (world_size * a) for a in range(1, total + 1)
               if total % (world_size * a) == 0 and total // (world_size * a) >= least]
    if not batches:
        works = [n for n in range(1, total + 1) if total % n == 0 and total // n >= least]
        raise ConfigError(f"resume: the checkpoint's global batch {total} does not split into {world_size} "
                          f"processes x at least {least} images; resume on {', '.join(map(str, works))} "
                          "process(es), or start a new run with --init-from RUN_DIR/best.pt")
    fitting = [b for b in batches if b <= saved[1]]
    batch = max(fitting) if fitting else min(batches)
    accum = total // (world_size * batch)
    return dataclasses.replace(cfg, grad_accum=accum), Resize(saved, (world_size, batch, accum))


def check_batch(cfg: TrainConfig, world_size: int, device_type: str) -> tuple[int, tuple[str, ...]]:
    """The per-process batch, and notes on BatchNorm statistics; errors for batches that cannot work."""
    if cfg.batch_size % (world_size * cfg.grad_accum):
        raise ConfigError(f"batch_size: the global batch {cfg.batch_size} must be divisible by "
                          f"processes x grad_accum = {world_size} x {cfg.grad_accum}")
    per_process_batch = cfg.batch_size // (world_size * cfg.grad_accum)
    sync_bn = cfg.sync_bn and world_size > 1
    if per_process_batch < 2 and not sync_bn:
        raise ConfigError(f"batch_size: {per_process_batch} image per process and step; the image-pooling "
                          "BatchNorm of ASPP needs at least 2 (raise --batch-size, lower --grad-accum, "
                          "or use --sync-bn true on GPUs)")
    if sync_bn and device_type == "cpu":
        raise ConfigError("sync_bn: PyTorch's SyncBatchNorm runs only on GPUs (CUDA, XPU, HPU); "
                          "drop --sync-bn for CPU processes")
    if world_size > 1 and not cfg.sync_bn and per_process_batch < 8 and device_type != "cpu":
        return per_process_batch, (f"{per_process_batch} images per process and --sync-bn off: BatchNorm "
                                   "statistics come from very few images; consider --sync-bn true (its cost: "
                                   "torch's SyncBatchNorm waits for the device once per BatchNorm layer, ~60 "
                                   "host-device syncs per DeepLabV3+ R50 step)",)
    return per_process_batch, ()


def check_classes(cfg: TrainConfig, train_source: DataSource,
                  val_source: DataSource) -> DatasetSpec:
    """The data says what the classes are (its manifest's dataset spec; VOC without one): a
    --num-classes that differs, or validation data with another label set, is refused."""
    spec = train_source.spec
    if cfg.num_classes is not None and cfg.num_classes != spec.num_classes:
        raise ConfigError(f"num_classes: {cfg.num_classes}, but the labels of {cfg.data} have {spec.num_classes} "
                          f"classes ({spec.name}: {', '.join(spec.classes[:5])}"
                          f"{', ...' if spec.num_classes > 5 else ''}); drop --num-classes to take it from the data")
    if val_source.spec.classes != spec.classes:
        raise ConfigError(f"val_data: {val_source.location} is {val_source.spec.name} with "
                          f"{val_source.spec.num_classes} classes, but the training data {train_source.location} "
                          f"is {spec.name} with {spec.num_classes}; validate on the same label set")
    return spec


def sample_ids(source: DataSource) -> Optional[set]:
    """The sample ids a data source holds, when it says (manifests and VOC folders do)."""
    if source.manifest is not None:
        return {sid for shard in source.manifest["shards"] for sid in shard.get("ids", ())} or None
    if source.voc_root is not None:
        return set(read_split(source.voc_root, source.split))
    return None


def check_disjoint(train_source: DataSource, val_source: DataSource) -> None:
    """Refuse to validate (and pick best.pt) on images the model trains on."""
    train_ids, val_ids = sample_ids(train_source), sample_ids(val_source)
    if train_ids is None or val_ids is None:
        if train_source.urls and train_source.urls == val_source.urls:
            raise ConfigError("val_data: shard patterns carry no split, so validation would read the "
                              "training shards; pass --val-data")
        return
    shared = train_ids & val_ids
    if shared:
        raise ConfigError(f"val_data: {len(shared)} validation images are also training images "
                          f"(e.g. {sorted(shared)[0]}; train {train_source.location}, val "
                          f"{val_source.location}); validate on a disjoint split with --val-data")
