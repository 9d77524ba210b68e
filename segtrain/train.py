"""Train DeepLabV3 / DeepLabV3+ on packed data (VOC, Cityscapes, ADE20K, your own folder)
with Hugging Face Accelerate.

One process:        python segtrain/train.py --data shards/voc-train.json
Fine-tune:          ... --data shards/mine-train.json --init-from runs/voc/best.pt
One or more GPUs:   accelerate launch --config_file accelerate_configs/multi_gpu.yaml segtrain/train.py ...
Resume exactly:     ... --run-dir runs/X --resume latest

Config: segtrain/config.py (defaults = the reference recipe; --config YAML and
--key value flags override). The loop below is the whole training procedure:
data -> model -> optimizer -> [step: lr, forward, backward, clip, update, log,
checkpoint, validate] -> best.pt. The class count, names and colours come from the
data's dataset spec and are stored, with the input normalisation, in best.pt and
final.pt. Everything a run writes lives in RUN_DIR:
config.yaml, metrics.jsonl, checkpoints/step_*/, best.pt, final.pt, wandb/.
"""
from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    # Run as a script (accelerate launch segtrain/train.py): import the package from the
    # repository root, and keep segtrain/ itself off sys.path so its module names
    # (model, shards, ...) can never shadow a library's.
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import contextlib
import dataclasses
import itertools
import json
import math
import os
import shutil
import time
import uuid
import warnings
from dataclasses import dataclass
from typing import Any, Optional

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import set_seed
from tqdm import tqdm

from segtrain import shards
from segtrain.cli import check_launch, user_errors
from segtrain.config import TrainConfig, config_to_dict, parse_config, save_config
from segtrain.evaluate import evaluate, loader_protocol
from segtrain.io import ConfigError, atomic_write_bytes, checkpoint_dirs, read_manifest, read_metrics_log
from segtrain.losses import build_loss
from segtrain.metrics import to_jsonable
from segtrain.model import PretrainedWeightsUnavailable, build_model, init_from_checkpoint, save_checkpoint
from segtrain.transforms import denormalize, normalize
from segtrain.voc import read_split


# ----------------------------------------------------------------------------- schedule

def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of the base lr at optimizer step ``step`` (0-based).

    A function of the optimizer step alone, set by the loop itself, so the
    schedule is identical on 1 or N processes (a scheduler passed through
    ``accelerator.prepare`` would step once per process).
    """
    if cfg.lr_schedule == "step":
        factor = cfg.step_gamma ** (step // cfg.step_size)
    elif cfg.lr_schedule == "poly":
        factor = (1 - min(step, cfg.iterations) / cfg.iterations) ** cfg.poly_power
    else:
        factor = 1.0
    if step < cfg.warmup_iters:
        factor *= (step + 1) / cfg.warmup_iters
    return factor


def param_groups(model: torch.nn.Module, cfg: TrainConfig) -> list[dict]:
    """Backbone at lr x backbone_lr_mult (0.1 in the reference recipe), head(s) at lr."""
    backbone = list(model.backbone.parameters())
    ids = {id(p) for p in backbone}
    head = [p for p in model.parameters() if id(p) not in ids]
    return [{"name": "backbone", "params": backbone, "lr": cfg.lr * cfg.backbone_lr_mult,
             "base_lr": cfg.lr * cfg.backbone_lr_mult},
            {"name": "head", "params": head, "lr": cfg.lr, "base_lr": cfg.lr}]


def sync_buffers(model: torch.nn.Module, accelerator: Accelerator) -> None:
    """Give every rank rank 0's BatchNorm running statistics.

    DDP broadcasts buffers at the START of each forward, so after a step every rank
    holds statistics updated by its own batch. Validation and the saved weights must
    use the same, authoritative ones (the ones DDP itself would broadcast next).
    """
    if accelerator.num_processes > 1:
        for buffer in accelerator.unwrap_model(model).buffers():
            torch.distributed.broadcast(buffer, src=0)


# ----------------------------------------------------------------------------- state on disk

class TrainState:
    """What the loop needs to resume besides model, optimizer and RNGs (saved by Accelerate).

    ``data_order`` holds every setting the sequence of batches depends on; a resume
    that changes one of them would continue on different batches, so it is refused.
    """

    def __init__(self, data_order: dict) -> None:
        self.step = 0
        self.best_miou = -1.0
        self.data_order = data_order
        self.saved_data_order: Optional[dict] = None

    def state_dict(self) -> dict:
        return {"step": self.step, "best_miou": self.best_miou, "data_order": self.data_order}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.best_miou = int(state["step"]), float(state["best_miou"])
        self.saved_data_order = state.get("data_order")

    def check_resume(self) -> None:
        changed = {k: (v, self.data_order.get(k)) for k, v in (self.saved_data_order or {}).items()
                   if self.data_order.get(k) != v}
        if changed:
            raise ConfigError("resume: the checkpoint was trained with " + ", ".join(
                f"{k}={old!r} (now {new!r})" for k, (old, new) in changed.items())
                + "; resume with the same settings, or the batches would not continue where they stopped")


class MetricsLog:
    """RUN_DIR/metrics.jsonl: one JSON object per line, the plain-text record reports read."""

    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled = path, enabled

    def truncate_after(self, step: int) -> None:
        """On resume, drop lines a crashed run wrote after the checkpoint it resumes from."""
        if self.enabled and self.path.exists():
            keep = [r for r in read_metrics_log(self.path) if r["step"] <= step]
            atomic_write_bytes(self.path, "".join(json.dumps(r) + "\n" for r in keep).encode())

    def write(self, record: dict) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(to_jsonable(record), allow_nan=False) + "\n")


def resolve_resume(resume: str, run_dir: Path) -> Path:
    if resume == "latest":
        found = checkpoint_dirs(run_dir)
        if not found:
            raise ConfigError(f"resume: no checkpoint in {run_dir / 'checkpoints'} to resume from")
        return found[-1]
    path = Path(resume)
    if not (path / "custom_checkpoint_0.pkl").is_file():  # the TrainState that save_state writes
        raise ConfigError(f"resume: {path} is not a checkpoint folder (expected RUN_DIR/checkpoints/step_*)")
    return path


def sample_ids(source: shards.DataSource) -> Optional[set]:
    """The sample ids a data source holds, when it says (manifests and VOC folders do)."""
    if source.manifest is not None:
        return {sid for shard in source.manifest["shards"] for sid in shard.get("ids", ())} or None
    if source.voc_root is not None:
        return set(read_split(source.voc_root, source.split))
    return None


def check_disjoint(train_source: shards.DataSource, val_source: shards.DataSource) -> None:
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


def save_training_state(accelerator: Accelerator, run_dir: Path, step: int, keep: int) -> None:
    """``save_state`` into a temp folder, then rename: a crash never leaves a half checkpoint
    that ``--resume latest`` would pick. Assumes RUN_DIR is on a filesystem all nodes share."""
    root = run_dir / "checkpoints"
    final, tmp = root / f"step_{step:07d}", root / f".step_{step:07d}.tmp"
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in checkpoint_dirs(run_dir)[:-keep]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()


def summary(metrics: dict) -> dict:
    """The JSON-safe scalar and per-class metrics stored in best.pt / final.pt."""
    keep = ("miou", "pixel_acc", "mean_class_acc", "fwiou", "iou", "class_acc", "num_images")
    return to_jsonable({k: metrics[k] for k in keep if k in metrics})


# ----------------------------------------------------------------------------- tracking

def wandb_init_kwargs(cfg: TrainConfig, run_dir: Path) -> dict:
    """Go offline when no credentials exist, instead of failing after a network timeout.

    The wandb run id lives in RUN_DIR/wandb_id: a resumed run continues its own wandb
    run, and a new run never merges into an older one that had the same --name.
    """
    if not ({"WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL"} & os.environ.keys()):
        netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
        if not (netrc.exists() and "api.wandb.ai" in netrc.read_text()):
            os.environ["WANDB_MODE"] = "offline"
    id_file = run_dir / "wandb_id"
    if not id_file.exists():
        atomic_write_bytes(id_file, uuid.uuid4().hex[:16].encode())
    return {"wandb": {"dir": str(run_dir), "name": cfg.name, "id": id_file.read_text().strip(),
                      "resume": "allow"}}


def log_val_media(accelerator: Accelerator, step: int, metrics: dict, examples: list[dict],
                  class_names: tuple[str, ...]) -> None:
    """Per-class IoU table and GT/prediction mask overlays for the wandb dashboard."""
    run = accelerator.get_tracker("wandb", unwrap=True)
    import wandb

    labels = {i: name for i, name in enumerate(class_names)} | {255: "ignore"}
    table = wandb.Table(columns=["class", "iou"],
                        data=[[n, None if math.isnan(v) else v] for n, v in zip(class_names, metrics["iou"])])
    images = [wandb.Image(ex["image"], caption=ex["id"], masks={
        "predictions": {"mask_data": ex["pred"], "class_labels": labels},
        "ground_truth": {"mask_data": ex["mask"], "class_labels": labels}}) for ex in examples]
    run.log({"val/per_class_iou": table, "val/examples": images}, step=step)


# ----------------------------------------------------------------------------- the loop

@dataclass
class TrainResult:
    model: torch.nn.Module  # the trained model (unwrapped from DDP)
    metrics: dict           # the last validation metrics
    best_miou: float
    run_dir: Path


def train(cfg: TrainConfig) -> TrainResult:
    """Train with ``cfg``. Called on every process; each gets the same result."""
    if cfg.train_split is None:
        # --data voc-train_aug.json means train_aug: never silently its voc-train.json sibling.
        named = cfg.data.endswith(".json") and read_manifest(cfg.data)["split"]
        cfg = dataclasses.replace(cfg, train_split=named or "train")
    run_dir = cfg.resolved_run_dir()
    # Accelerate keeps one AcceleratorState per process and refuses a second precision;
    # clear it (not the distributed PartialState) so that every train() call in one
    # process (notebooks, bench scripts, tests) configures its own run.
    AcceleratorState._reset_state()
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision,
                              log_with="wandb" if cfg.tracker == "wandb" else None)
    check_launch(accelerator.num_processes)
    main = accelerator.is_main_process
    world = accelerator.num_processes
    device = accelerator.device
    say = accelerator.print
    if cfg.batch_size % (world * cfg.grad_accum):
        raise ConfigError(f"batch_size: the global batch {cfg.batch_size} must be divisible by "
                          f"processes x grad_accum = {world} x {cfg.grad_accum}")
    per_process_batch = cfg.batch_size // (world * cfg.grad_accum)
    # More loader workers than CPUs per process only adds contention.
    workers = min(cfg.workers, max(1, (os.cpu_count() or 1) // world)) if cfg.workers else 0
    if accelerator.mixed_precision == "fp16" and device.type == "cpu":
        warnings.warn("mixed_precision fp16 does nothing on CPU (Accelerate runs fp32); use bf16")
    if per_process_batch < 2 and not (cfg.sync_bn and world > 1):
        raise ConfigError(f"batch_size: {per_process_batch} image per process and step; the image-pooling "
                          "BatchNorm of ASPP needs at least 2 (raise --batch-size, lower --grad-accum, "
                          "or use --sync-bn true on GPUs)")
    if cfg.sync_bn and world > 1 and device.type == "cpu":
        raise ConfigError("sync_bn: PyTorch's SyncBatchNorm runs only on GPUs (CUDA, XPU, HPU); "
                          "drop --sync-bn for CPU processes")
    if world > 1 and not cfg.sync_bn and per_process_batch < 8 and device.type != "cpu":
        warnings.warn(f"{per_process_batch} images per process and --sync-bn off: BatchNorm statistics "
                      "come from very few images; consider --sync-bn true")
    if not cfg.resume and (run_dir / "metrics.jsonl").exists():
        raise ConfigError(f"run_dir: {run_dir} already holds a run; pass --resume latest to continue it, "
                          "or choose another --run-dir")
    set_seed(cfg.seed)
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        if not cfg.resume:  # a resumed run keeps the config it was started with
            save_config(cfg, run_dir / "config.yaml")

    # Data. The loader is rebuilt per epoch from (seed, epoch, rank), which is what
    # makes resuming exact: the same epoch replays the same batches.
    def epoch_loader(epoch: int):
        return shards.train_loader(cfg.data, per_process_batch, cfg.crop_size, split=cfg.train_split,
                                   num_workers=workers, seed=cfg.seed, epoch=epoch,
                                   rank=accelerator.process_index, world_size=world,
                                   color_jitter=cfg.color_jitter, scale=(cfg.scale_min, cfg.scale_max))
    _, batches_per_epoch = epoch_loader(0)
    if batches_per_epoch < cfg.grad_accum:
        raise ConfigError(f"grad_accum: an epoch has only {batches_per_epoch} batches of {per_process_batch} "
                          f"per process, fewer than grad_accum={cfg.grad_accum}")
    steps_per_epoch = batches_per_epoch // cfg.grad_accum
    val_data = cfg.val_data or cfg.data  # a train manifest stands for its voc-val.json sibling
    train_source = shards.resolve_data(cfg.data, cfg.train_split)
    val_source = shards.resolve_data(val_data, cfg.val_split)
    check_disjoint(train_source, val_source)
    train_manifest = train_source.manifest
    # The data says what the classes are (its manifest's dataset spec; VOC without one).
    spec = train_source.spec
    num_classes = spec.num_classes
    if cfg.num_classes is not None and cfg.num_classes != num_classes:
        raise ConfigError(f"num_classes: {cfg.num_classes}, but the labels of {cfg.data} have {num_classes} "
                          f"classes ({spec.name}: {', '.join(spec.classes[:5])}"
                          f"{', ...' if num_classes > 5 else ''}); drop --num-classes to take it from the data")
    if val_source.spec.classes != spec.classes:
        raise ConfigError(f"val_data: {val_source.location} is {val_source.spec.name} with "
                          f"{val_source.spec.num_classes} classes, but the training data {train_source.location} "
                          f"is {spec.name} with {num_classes}; validate on the same label set")

    # Model, loss, optimizer.
    try:
        model = build_model(cfg.arch, cfg.backbone, num_classes, cfg.output_stride, cfg.pretrained,
                            cfg.backbone_weights, cfg.separable, aux_head=cfg.aux_loss_weight > 0)
        if cfg.init_from and not cfg.resume:
            fresh = init_from_checkpoint(model, cfg.init_from)
            say(f"initialised from {cfg.init_from}" + (f"; kept fresh: {', '.join(fresh)}" if fresh else ""))
        criterion = build_loss(cfg.loss, num_classes,
                               class_pixel_counts=train_manifest["class_pixel_counts"] if train_manifest else None,
                               weighting=cfg.class_weighting, focal_gamma=cfg.focal_gamma,
                               ohem_thresh=cfg.ohem_thresh, ohem_min_kept=cfg.ohem_min_kept)
    except (ValueError, FileNotFoundError, PretrainedWeightsUnavailable) as e:  # bad backbone/loss/weights
        raise ConfigError(str(e)) from None
    # The model's input normalisation (its backbone's pretrained_cfg, or the --init-from checkpoint's).
    mean, std = model.mean, model.std
    if cfg.sync_bn and world > 1:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(param_groups(model, cfg), lr=cfg.lr, momentum=cfg.momentum,
                                weight_decay=cfg.weight_decay)
    model, optimizer = accelerator.prepare(model, optimizer)
    state = TrainState({"data": cfg.data, "train_split": cfg.train_split, "seed": cfg.seed,
                        "processes": world, "per_process_batch": per_process_batch,
                        "grad_accum": cfg.grad_accum, "workers": workers, "crop_size": cfg.crop_size})
    accelerator.register_for_checkpointing(state)

    log = MetricsLog(run_dir / "metrics.jsonl", enabled=main)
    if cfg.resume:
        path = resolve_resume(cfg.resume, run_dir)
        accelerator.load_state(str(path))
        state.check_resume()
        say(f"resumed from {path} at step {state.step}")
        log.truncate_after(state.step)
    if cfg.tracker == "wandb":
        accelerator.init_trackers(cfg.wandb_project, config=config_to_dict(cfg),
                                  init_kwargs=wandb_init_kwargs(cfg, run_dir))
    say(f"run {cfg.name}: {world} process(es) on {device.type}, precision {accelerator.mixed_precision}, "
        f"{per_process_batch} images/process x {cfg.grad_accum} accumulation = global batch {cfg.batch_size}, "
        f"{steps_per_epoch} steps/epoch, {cfg.iterations} steps -> {run_dir}")

    # Validation runs under the training precision (fp16 autocast exists only on GPUs).
    eval_autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16 if device.type == "cuda" else None
                           }.get(accelerator.mixed_precision)

    def validate(step: int) -> dict:
        sync_buffers(model, accelerator)
        examples: list[dict] = []

        def keep_examples(images, masks, preds, ids):
            # A few val images of the main process for the dashboard's mask overlays.
            for i in range(len(ids)):
                if len(examples) < cfg.num_val_images:
                    examples.append({"id": ids[i], "image": denormalize(images[i], mean, std),
                                     "mask": masks[i].cpu().numpy().astype("uint8"),
                                     "pred": preds[i].cpu().numpy().astype("uint8")})

        loader = shards.val_loader(val_data, split=cfg.val_split, num_workers=min(workers, 2),
                                   protocol=loader_protocol(cfg.val_protocol), crop_size=cfg.crop_size,
                                   rank=accelerator.process_index, world_size=world, mean=mean, std=std)
        metrics = evaluate(accelerator.unwrap_model(model), loader, device, num_classes=num_classes,
                           protocol=cfg.val_protocol, class_names=spec.classes,
                           autocast_dtype=eval_autocast_dtype,
                           accelerator=accelerator, on_batch=keep_examples if main else None)
        record = {"step": step, "epoch": step / steps_per_epoch, "val/miou": metrics["miou"],
                  "val/pixel_acc": metrics["pixel_acc"], "val/mean_class_acc": metrics["mean_class_acc"],
                  "val/fwiou": metrics["fwiou"]}
        log.write(record | {"val/iou": metrics["iou"]})
        accelerator.log({k: v for k, v in record.items() if k != "step"}, step=step)
        if cfg.tracker == "wandb" and main:
            log_val_media(accelerator, step, metrics, examples, spec.classes)
        if metrics["miou"] > state.best_miou:
            state.best_miou = metrics["miou"]
            if main:
                save_checkpoint(run_dir / "best.pt", accelerator.unwrap_model(model), config=config_to_dict(cfg),
                                step=step, metrics=summary(metrics), dataset=spec.to_dict())
        say(f"step {step}: val mIoU {metrics['miou']:.4f}, pixel acc {metrics['pixel_acc']:.4f} "
            f"(best {state.best_miou:.4f})")
        model.train()
        return metrics

    model.train()
    step = state.step
    metrics: dict[str, Any] = {}
    progress = tqdm(total=cfg.iterations, initial=step, disable=not main, dynamic_ncols=True, desc="train")
    images_per_step = cfg.batch_size
    # Logged loss and images/s cover the steps since the last log line, validation time excluded.
    window_start, window_loss, window_steps = time.perf_counter(), torch.zeros((), device=device), 0
    while step < cfg.iterations:
        epoch = step // steps_per_epoch
        loader, _ = epoch_loader(epoch)
        # Resuming mid-epoch: skip the micro-batches the checkpointed run already used.
        batches = itertools.islice(iter(loader), (step - epoch * steps_per_epoch) * cfg.grad_accum, None)
        for _ in range(step - epoch * steps_per_epoch, steps_per_epoch):
            if step >= cfg.iterations:
                break
            factor = lr_factor(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = group["base_lr"] * factor

            for micro in range(cfg.grad_accum):
                images, masks, _ = next(batches)
                # The loader ships uint8 (a quarter of the bytes to copy): normalise on the device.
                images = normalize(images.to(device, non_blocking=True), mean, std)
                masks = masks.to(device, non_blocking=True).long()
                if cfg.channels_last:
                    images = images.contiguous(memory_format=torch.channels_last)
                # Gradients are all-reduced only on the last micro-batch of a step.
                sync = contextlib.nullcontext() if micro == cfg.grad_accum - 1 else accelerator.no_sync(model)
                with sync:
                    out = model(images)
                    loss = criterion(out["out"], masks)
                    if "aux" in out:
                        loss = loss + cfg.aux_loss_weight * criterion(out["aux"], masks)
                    accelerator.backward(loss / cfg.grad_accum)
                window_loss += loss.detach() / cfg.grad_accum  # no .item(): no sync per micro-batch
            if cfg.grad_clip > 0:
                accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            state.step = step
            window_steps += 1
            progress.update(1)

            if step % cfg.log_every == 0 or step == cfg.iterations:
                elapsed = time.perf_counter() - window_start
                mean_loss = accelerator.reduce(window_loss / window_steps, "mean").item()
                record = {"step": step, "epoch": step / steps_per_epoch, "train/loss": mean_loss,
                          "lr/backbone": optimizer.param_groups[0]["lr"], "lr/head": optimizer.param_groups[1]["lr"],
                          "images_per_s": images_per_step * window_steps / elapsed}
                if device.type == "cuda":
                    record["max_memory_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
                log.write(record)
                accelerator.log({k: v for k, v in record.items() if k != "step"}, step=step)
                progress.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{record['lr/head']:.2e}",
                                     img_s=f"{record['images_per_s']:.1f}")
                window_start, window_loss, window_steps = time.perf_counter(), torch.zeros((), device=device), 0
            end_of_epoch = step % steps_per_epoch == 0
            if (end_of_epoch if cfg.val_every == 0 else step % cfg.val_every == 0) or step == cfg.iterations:
                progress.clear()
                val_start = time.perf_counter()
                metrics = validate(step)
                window_start += time.perf_counter() - val_start  # not training throughput
            # After validation, so the checkpoint carries the best mIoU it just measured.
            if step % cfg.checkpoint_every == 0 or step == cfg.iterations:
                save_training_state(accelerator, run_dir, step, cfg.keep_checkpoints)
    progress.close()

    sync_buffers(model, accelerator)
    if main:
        save_checkpoint(run_dir / "final.pt", accelerator.unwrap_model(model), config=config_to_dict(cfg),
                        step=step, metrics=summary(metrics), dataset=spec.to_dict())
    accelerator.end_training()
    if main and cfg.tracker == "wandb" and os.environ.get("WANDB_MODE") == "offline":
        offline = sorted((run_dir / "wandb").glob("offline-run-*"))
        if offline:
            say(f"wandb ran offline; upload this run with:  wandb sync {offline[-1]}")
    say(f"done: best val mIoU {state.best_miou:.4f}; best.pt, metrics.jsonl and config.yaml in {run_dir}")
    return TrainResult(accelerator.unwrap_model(model), metrics, state.best_miou, run_dir)


def main(argv: Optional[list[str]] = None) -> None:
    with user_errors():
        train(parse_config(argv))


if __name__ == "__main__":
    main()
