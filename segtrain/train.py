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
config.yaml, metrics.jsonl, checkpoints/step_*/, best.pt, final.pt, wandb/ (segtrain.checkpoints.RunDir).
"""
from __future__ import annotations

if __name__ == "__main__" and not __package__:
    # Run as a file (`accelerate launch segtrain/train.py`): Python put segtrain/ first on sys.path. Put
    # the repository root there instead (before any import: os and sys are loaded already), so the
    # package's modules are only ever segtrain.X, never a top-level module shadowing a library's.
    import os
    import sys
    _here = os.path.dirname(os.path.realpath(__file__))
    sys.path[:] = [os.path.dirname(_here), *(p for p in sys.path if os.path.realpath(p or ".") != _here)]

if __name__ == "__main__":  # the training process itself: see the end of this file
    import gc
    gc.disable()

import contextlib
import dataclasses
import os
import time
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from accelerate import Accelerator, PartialState
from accelerate.state import AcceleratorState
from accelerate.utils import parse_flag_from_env, set_seed
from tqdm import tqdm

from segtrain import autotune, distributed, hardware, loaders, preempt, trackers
from segtrain.cli import check_launch, errors_of_rank, user_errors
from segtrain.config import TrainConfig, config_to_dict, parse_config, save_config, update_saved_config
from segtrain.inference import evaluate
from segtrain.checkpoints import MetricsLog, TrainState, init_from_checkpoint, save_checkpoint, save_training_state, summary
from segtrain.files import ConfigError, atomic_link
from segtrain.losses import build_loss
from segtrain.model import PretrainedWeightsUnavailable, build_model
from segtrain.plan import LAYOUT_KEYS, RunPlan, plan_run
from segtrain.schedule import lr_factor
from segtrain.transforms import normalization_tensors, normalize


# ----------------------------------------------------------------------------- optimisation

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


# ----------------------------------------------------------------------------- setting up

def build_training(plan: RunPlan, accelerator: Accelerator) -> tuple[torch.nn.Module, torch.optim.Optimizer,
                                                                     torch.nn.Module]:
    """Model, optimizer (both prepared by Accelerate) and loss; a bad backbone, loss or weights
    file is a ConfigError."""
    cfg = plan.cfg
    try:
        model = build_model(cfg.arch, cfg.backbone, cfg.num_classes, cfg.output_stride, cfg.pretrained,
                            cfg.backbone_weights, cfg.separable, aux_head=cfg.aux_loss_weight > 0)
        if cfg.init_from and plan.resume_from is None:  # a resumed run has its own weights
            fresh = init_from_checkpoint(model, cfg.init_from)
            accelerator.print(f"initialised from {cfg.init_from}" + (f"; kept fresh: {', '.join(fresh)}" if fresh else ""))
        criterion = build_loss(cfg.loss, cfg.num_classes, class_pixel_counts=plan.class_pixel_counts,
                               options=plan.loss_options)
    except (ValueError, FileNotFoundError, PretrainedWeightsUnavailable) as e:
        raise ConfigError(str(e)) from None
    # On the device once: class weights / focal alpha are not copied host-to-device every step.
    criterion = criterion.to(accelerator.device)
    if cfg.sync_bn and plan.world_size > 1:  # timm's: keeps BatchNormAct2d's activation (torch's drops it)
        from timm.layers import convert_sync_batchnorm  # (loaded by segtrain.model, without wandb)
        model = convert_sync_batchnorm(model)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(param_groups(model, cfg), lr=cfg.lr, momentum=cfg.momentum,
                                weight_decay=cfg.weight_decay)
    model, optimizer = accelerator.prepare(model, optimizer)
    return model, optimizer, criterion


def compile_after_prepare(model: torch.nn.Module, accelerator: Accelerator) -> bool:
    """Compile the bare module inside the prepared one, in place (checkpoints and unwrap_model see
    the plain module).

    The inner module, not the DDP wrapper: dynamo graph-breaks at DDP's own forward in torch 2.14,
    so a compiled wrapper compiles nothing on 2+ processes (0 graphs with 2 gloo processes). The
    inner module runs inside DDP's forward, where dynamo finds the active DDP module and splits
    the graph at its gradient buckets (DDPOptimizer), so all-reduces still overlap the backward
    pass. Whether a compiled graph really ran is known after the first step (``confirm_compiled``).
    """
    return hardware.compile_model(accelerator.unwrap_model(model), accelerator.print)


def confirm_compiled(model: torch.nn.Module, plan: RunPlan, accelerator: Accelerator) -> RunPlan:
    """After the first step: 'compiled' in the run's record is what dynamo's counters say ran
    (returned as the plan from here on, and written to config.yaml)."""
    compiled, line = hardware.compile_outcome(accelerator.unwrap_model(model))
    accelerator.print(line)
    plan = plan.with_runtime(compiled=compiled)
    if accelerator.is_main_process and plan.resume_from is None:
        update_saved_config(plan.run_dir.config, resolved=plan.resolved)
    return plan


def start_run(plan: RunPlan, accelerator: Accelerator) -> tuple[TrainState, MetricsLog]:
    """The run directory and its config.yaml, the resume: all before the first step."""
    cfg, run_dir = plan.cfg, plan.run_dir
    if accelerator.is_main_process:
        run_dir.root.mkdir(parents=True, exist_ok=True)
        if plan.resume_from is None:  # a resumed run keeps the config it was started with
            save_config(cfg, run_dir.config, resolved=plan.resolved)
    state = TrainState(plan.data_order, plan.layouts)
    accelerator.register_for_checkpointing(state)
    log = MetricsLog(run_dir.metrics, enabled=accelerator.is_main_process)
    if plan.resume_from is not None:
        accelerator.load_state(str(plan.resume_from))
        state.check_resume(may_change=LAYOUT_KEYS if plan.resize else ())
        accelerator.print(f"resumed from {plan.resume_from} at step {state.step}")
        if plan.resize:
            resized(plan, accelerator, state.step)
        if accelerator.is_main_process:  # a longer --iterations extends the run: its config.yaml says so
            for key, (old, new) in update_saved_config(run_dir.config, iterations=cfg.iterations).items():
                accelerator.print(f"{run_dir.config}: {key} {old} -> {new}")
    log.truncate_after(state.step)  # also a fresh start of --resume auto over a run stopped before step 1
    return state, log


def resized(plan: RunPlan, accelerator: Accelerator, step: int) -> None:
    """After ``load_state`` of a checkpoint saved by another number of processes: one line of what
    changed, config.yaml's record of it, and every process's RNG seeded afresh (the checkpoint holds
    one RNG state per process that saved it: none for the new ones, and the old ones' would no
    longer be one per process), from the seed and the step: reproducible for a given process count."""
    accelerator.print(plan.resize.line())
    distributed.seed_process(plan.cfg.seed + step)
    if accelerator.is_main_process:
        update_saved_config(plan.run_dir.config, grad_accum=plan.cfg.grad_accum, resolved=plan.resolved)


def micro_batches(plan: RunPlan, rank: int, step: int) -> Iterator[loaders.Batch]:
    """This rank's training micro-batches from optimizer step ``step`` on, epoch after epoch.

    Each batch is a function of (seed, epoch, rank, batch index), which is what makes resuming
    exact: a resumed run starts the loader at its epoch and batch (after a resume on another
    number of processes, the epoch it interrupted goes on with the samples not yet drawn:
    ``RunPlan.epoch_layouts``). One loader serves the whole
    run (its workers start once, not per epoch). The batches of an epoch that do not fill a
    whole step (grad_accum > 1) are left out.
    """
    per_epoch = plan.steps_per_epoch * plan.cfg.grad_accum
    epoch, skip = divmod(step * plan.cfg.grad_accum, per_epoch)
    last_epoch = (plan.cfg.iterations * plan.cfg.grad_accum - 1) // per_epoch  # no reading ahead past the run
    loader, _ = loaders.train_loader(**plan.train_loader, epoch=epoch, rank=rank, skip=skip, take=per_epoch,
                                     endless=True, last_epoch=last_epoch, layouts=plan.epoch_layouts(epoch))
    yield from loader


class LogWindow:
    """Train loss and throughput over the steps since the last log line (validation time excluded);
    ``data_wait`` is the part of that time spent waiting for the loader (the device starving)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.start, self.loss, self.steps = time.perf_counter(), torch.zeros((), device=self.device), 0
        self.data_wait = 0.0
        self.peak_mb = hardware.take_peak_memory_mb(self.device)  # None off CUDA

    def set_peak_aside(self) -> None:
        """Before validation: keep the window's training peak, so validation's is measured alone."""
        if self.peak_mb is not None:
            self.peak_mb = max(self.peak_mb, hardware.take_peak_memory_mb(self.device))

    def peak_memory(self) -> dict:
        """{"max_memory_mb": peak CUDA memory of the window's training steps} (empty off CUDA)."""
        self.set_peak_aside()
        return {} if self.peak_mb is None else {"max_memory_mb": self.peak_mb}

    def take(self, accelerator: Accelerator, images_per_step: int) -> tuple[float, float]:
        """(mean loss over all processes, images/s), and start a new window."""
        mean_loss = accelerator.reduce(self.loss / self.steps, "mean").item()
        images_per_s = images_per_step * self.steps / (time.perf_counter() - self.start)
        self.reset()
        return mean_loss, images_per_s


# ----------------------------------------------------------------------------- validation and outputs

def validate(model: torch.nn.Module, accelerator: Accelerator, plan: RunPlan, log: MetricsLog,
             tracker: trackers.Tracker, step: int, loader: Iterable) -> dict:
    """Evaluate on the whole validation split (each image once, over all processes), log the
    metrics (and, to the tracker, per-class and per-image results and a fixed set of mask
    overlays), and return them."""
    sync_buffers(model, accelerator)
    cfg = plan.cfg
    bare = accelerator.unwrap_model(model)
    # Per-image results and the mask overlays: the same val images (smallest ids) for any process count.
    samples = tracker.samples(cfg.num_val_images, bare.mean, bare.std)
    with hardware.evaluation_kernels():  # eager, no cuDNN autotuning: image sizes vary
        metrics = evaluate(bare, loader, accelerator.device, num_classes=cfg.num_classes,
                           class_names=plan.spec.classes, protocol=cfg.val_protocol,
                           autocast_dtype=plan.eval_autocast_dtype, accelerator=accelerator,
                           on_batch=samples)
    model.train()
    record = {"step": step, "epoch": step / plan.steps_per_epoch, "val/miou": metrics["miou"],
              "val/pixel_acc": metrics["pixel_acc"], "val/mean_class_acc": metrics["mean_class_acc"],
              "val/fwiou": metrics["fwiou"]}
    if (peak := hardware.take_peak_memory_mb(accelerator.device)) is not None:
        record["val/max_memory_mb"] = peak
    publish(tracker, log, record, file_only={"val/iou": metrics["iou"], "val/class_acc": metrics["class_acc"]})
    tracker.log_validation(step, metrics, samples.gather(accelerator) if samples else None)  # gather: a collective
    return metrics


def publish(tracker: trackers.Tracker, log: MetricsLog, record: dict, file_only: Optional[dict] = None) -> None:
    """One record (with its "step") to metrics.jsonl, plus ``file_only`` fields, and to the tracker."""
    log.write(record | (file_only or {}))
    tracker.log(record)


def save_model(accelerator: Accelerator, model: torch.nn.Module, plan: RunPlan, name: str, step: int,
               metrics: dict) -> None:
    """RUN_DIR's ``name`` model file ("best": best.pt, "final": final.pt): the bare model's weights, the config and the metrics
    (main process)."""
    if accelerator.is_main_process:
        save_checkpoint(plan.run_dir.model_file(name), accelerator.unwrap_model(model), config=config_to_dict(plan.cfg),
                        resolved=plan.runtime.to_dict(), dataset=plan.spec.to_dict(), step=step, metrics=summary(metrics))


# ----------------------------------------------------------------------------- one step

def to_device(images: torch.Tensor, masks: torch.Tensor, device: torch.device,
              normalization: tuple[torch.Tensor, torch.Tensor], channels_last: bool) -> tuple[torch.Tensor,
                                                                                               torch.Tensor]:
    """A loader batch on the device: the loader ships uint8 (a quarter of the bytes to copy), so
    the images are normalised here with the model's own statistics (its backbone's
    pretrained_cfg, or the --init-from checkpoint's), in the run's memory format."""
    images = normalize(images.to(device, non_blocking=True), *normalization)
    masks = masks.to(device, non_blocking=True).long()
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, masks


def next_batch(batches: Iterator[loaders.Batch], rank: int, window: LogWindow) -> tuple[torch.Tensor, torch.Tensor]:
    """The next micro-batch (images, masks); the wait for it counts as the window's data wait
    (the first includes starting the loader workers, once per run)."""
    fetch_start = time.perf_counter()
    with errors_of_rank(rank):  # this rank's share of the data
        images, masks, _ = next(batches)
    window.data_wait += time.perf_counter() - fetch_start
    return images, masks


def train_step(model: torch.nn.Module, criterion: torch.nn.Module, optimizer: torch.optim.Optimizer,
               accelerator: Accelerator, cfg: TrainConfig, step: int, batches: Iterator[loaders.Batch],
               normalization: tuple[torch.Tensor, torch.Tensor], window: LogWindow) -> None:
    """Optimizer step ``step`` -> ``step + 1``: the learning rate, then ``grad_accum``
    micro-batches (forward, loss, backward), clipping and the update. The summed loss
    goes to ``window`` without a sync (no ``.item()`` per micro-batch)."""
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * lr_factor(step, cfg)
    for micro in range(cfg.grad_accum):
        images, masks = to_device(*next_batch(batches, accelerator.process_index, window), accelerator.device,
                                  normalization, cfg.channels_last)
        # Gradients are all-reduced only on the last micro-batch of a step.
        last = micro == cfg.grad_accum - 1
        with contextlib.nullcontext() if last else accelerator.no_sync(model):
            out = model(images)
            loss = criterion(out["out"], masks)
            if "aux" in out:
                loss = loss + cfg.aux_loss_weight * criterion(out["aux"], masks)
            accelerator.backward(loss / cfg.grad_accum)
        window.loss += loss.detach() / cfg.grad_accum
    if cfg.grad_clip > 0:
        accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    window.steps += 1


def log_train(accelerator: Accelerator, plan: RunPlan, log: MetricsLog, tracker: trackers.Tracker,
              optimizer: torch.optim.Optimizer, window: LogWindow, step: int) -> dict:
    """The log line of the window that ends at ``step`` (loss, learning rates, throughput)."""
    data_wait, peak_memory = window.data_wait, window.peak_memory()
    mean_loss, images_per_s = window.take(accelerator, plan.cfg.batch_size)
    record = {"step": step, "epoch": step / plan.steps_per_epoch, "train/loss": mean_loss,
              "lr/backbone": optimizer.param_groups[0]["lr"], "lr/head": optimizer.param_groups[1]["lr"],
              "images_per_s": images_per_s, "data_wait_s": data_wait} | peak_memory
    publish(tracker, log, record)
    return record


def validate_and_keep_best(model: torch.nn.Module, accelerator: Accelerator, plan: RunPlan, log: MetricsLog,
                           tracker: trackers.Tracker, state: TrainState, window: LogWindow,
                           val_batches: Iterable) -> dict:
    """Validate at ``state.step``; a better mIoU becomes best.pt. The time it takes is not the
    window's training time, and its peak memory is logged on its own."""
    val_start = time.perf_counter()
    window.set_peak_aside()
    metrics = validate(model, accelerator, plan, log, tracker, state.step, val_batches)
    if metrics["miou"] > state.best_miou:
        state.best_miou = metrics["miou"]
        save_model(accelerator, model, plan, "best", state.step, metrics)
        tracker.log_checkpoint(plan.run_dir.best, state.step)
    accelerator.print(f"step {state.step}: val mIoU {metrics['miou']:.4f}, pixel acc {metrics['pixel_acc']:.4f} "
                      f"(best {state.best_miou:.4f})")
    window.start += time.perf_counter() - val_start
    return metrics


def save_final(accelerator: Accelerator, model: torch.nn.Module, plan: RunPlan, step: int, metrics: dict,
               best_step: int) -> None:
    """RUN_DIR/final.pt. Where best.pt was written at this very step, it already holds this checkpoint
    (weights, step, metrics, config: nothing changes them after a validation), and final.pt becomes
    a second name of that file (a hard link) instead of a second full write of the weights."""
    if best_step == step and accelerator.is_main_process and atomic_link(plan.run_dir.best, plan.run_dir.final):
        return
    save_model(accelerator, model, plan, "final", step, metrics)


# ----------------------------------------------------------------------------- the loop

@dataclass
class TrainResult:
    model: torch.nn.Module  # the trained model (unwrapped from DDP)
    metrics: dict           # the last validation metrics
    best_miou: float
    run_dir: Path


def prepare_run(cfg: TrainConfig) -> tuple[Accelerator, RunPlan]:
    """The Accelerator and the run's plan. The precision and memory format follow the hardware
    (segtrain/autotune.py: measured on CPUs, once per machine and run); the device is known
    before the Accelerator, which needs them."""
    # Accelerate keeps one AcceleratorState per process and refuses a second precision;
    # clear it (not the distributed PartialState) so that every train() call in one
    # process (notebooks, bench scripts, tests) configures its own run.
    AcceleratorState._reset_state()
    # cpu= as Accelerator would pass it: a PartialState made without it on a CPU-only
    # `accelerate launch --multi_gpu` run stays one unconnected process, and Accelerator reuses it.
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"),
                         timeout=distributed.process_group_timeout(cfg.dist_timeout_min))
    check_launch(state.num_processes)  # before any measuring: a GPU launch that sees no GPU is an error
    cfg = distributed.agree_on_run_name(cfg)  # before anything uses RUN_DIR (the autotune reads a resumed run's)
    runtime = autotune.training_runtime(cfg, state)
    cfg = dataclasses.replace(cfg, channels_last=runtime.channels_last)
    accelerator = Accelerator(mixed_precision=hardware.accelerate_precision(runtime.mixed_precision))
    plan = plan_run(cfg, accelerator.num_processes, accelerator.device.type, runtime)
    accelerator.print(autotune.choice_line(runtime))
    for note in plan.notes:
        warnings.warn(note)
    return accelerator, plan


def run_line(plan: RunPlan, device: torch.device) -> str:
    """What is about to run, in one line."""
    cfg = plan.cfg
    return (f"run {cfg.name}: {plan.world_size} process(es) on {device.type}, precision "
            f"{plan.runtime.mixed_precision}, {plan.per_process_batch} images/process x {cfg.grad_accum} "
            f"accumulation = global batch {cfg.batch_size}, {plan.steps_per_epoch} steps/epoch, "
            f"{cfg.iterations} steps -> {plan.run_dir}")


def train(cfg: TrainConfig) -> TrainResult:
    """Train with ``cfg``. Called on every process; each gets the same result."""
    accelerator, plan = prepare_run(cfg)
    cfg, device, say = plan.cfg, accelerator.device, accelerator.print
    set_seed(cfg.seed)
    model, optimizer, criterion = build_training(plan, accelerator)
    if cfg.compile:  # see compile_after_prepare; confirmed after the first step
        plan = plan.with_runtime(compiled=compile_after_prepare(model, accelerator))
    distributed.seed_process(cfg.seed)  # same init above; per-rank dropout masks from here
    bare = accelerator.unwrap_model(model)  # its mean/std normalise the batches
    state, log = start_run(plan, accelerator)
    if state.step >= cfg.iterations:  # a finished run resumed (a resubmitted --resume auto job): keep final.pt
        accelerator.end_training()
        say(f"{plan.run_dir} has trained all {cfg.iterations} steps; nothing to do (a longer --iterations extends it)")
        return TrainResult(bare, {}, state.best_miou, plan.run_dir.root)
    tracker = trackers.open_tracker(plan, accelerator.is_main_process)  # after: a finished job opens no run
    tracker.start(state.step)
    say(run_line(plan, device))

    model.train()
    step = first_step = state.step
    metrics: dict[str, Any] = {}
    best_step = -1  # the step best.pt was written at by this process
    batches = micro_batches(plan, accelerator.process_index, step)
    # One val loader for the run: its workers start at the first validation and serve the rest
    # (a fork per validation can hang on CPython <= 3.11.7: loaders.val_loader).
    val_batches = loaders.val_loader(**plan.val_loader, rank=accelerator.process_index, mean=bare.mean,
                                     std=bare.std, persistent_workers=True)
    normalization = normalization_tensors(bare.mean, bare.std, device)  # once: no host-to-device copy per batch
    # Training crops are one fixed size: cuDNN's autotuning pays off (validation turns it off).
    torch.backends.cudnn.benchmark = device.type == "cuda"
    window = LogWindow(device)
    progress = tqdm(total=cfg.iterations, initial=step, disable=not accelerator.is_main_process,
                    dynamic_ncols=True, desc="train")
    stopper = preempt.StopOnSignal(cfg.stop_signals, plan.world_size,  # SIGTERM/USR1: checkpoint, exit 75
                                   distributed.process_group_timeout(cfg.dist_timeout_min))
    try:
        while step < cfg.iterations:
            train_step(model, criterion, optimizer, accelerator, cfg, step, batches, normalization, window)
            step = state.step = step + 1
            progress.update(1)
            if cfg.compile and step == first_step + 1:
                plan = confirm_compiled(model, plan, accelerator)
            if plan.logs_at(step):
                record = log_train(accelerator, plan, log, tracker, optimizer, window, step)
                progress.set_postfix(loss=f"{record['train/loss']:.4f}", lr=f"{record['lr/head']:.2e}",
                                     img_s=f"{record['images_per_s']:.1f}")
            if plan.validates_at(step):
                progress.clear()
                best_before = state.best_miou
                metrics = validate_and_keep_best(model, accelerator, plan, log, tracker, state, window, val_batches)
                best_step = step if state.best_miou != best_before else best_step  # a better mIoU: best.pt written
            # After validation, so the checkpoint carries the best mIoU it just measured. Asked every
            # step (the agreement needs it); a stop on the last step is the normal end.
            stop = stopper.should_stop(step) and step < cfg.iterations
            if plan.checkpoints_at(step) or stop:
                save_training_state(accelerator, plan.run_dir, step, cfg.keep_checkpoints)
            if stop:
                break
    finally:  # also when a step raises: the loader's workers live for the whole run
        progress.close()
        batches.close()
        stopper.close()
    if step < cfg.iterations:  # stopped by a signal: the line and the requeue marker before anything may fail
        preempted = stopper.finish(step, plan.run_dir.step_dir(step), say, accelerator.is_main_process)
        tracker.finish(step, metrics, exit_code=preempt.PREEMPTED_EXIT)  # the run shows as preempted
        accelerator.end_training()
        raise preempted

    sync_buffers(model, accelerator)
    save_final(accelerator, model, plan, step, metrics, best_step)
    tracker.finish(step, metrics)
    accelerator.end_training()
    say(f"done: best val mIoU {state.best_miou:.4f}; best.pt, metrics.jsonl and config.yaml in {plan.run_dir}")
    return TrainResult(accelerator.unwrap_model(model), metrics, state.best_miou, plan.run_dir.root)


def main(argv: Optional[list[str]] = None) -> None:
    with user_errors(), distributed.peers_lost():  # a dead process is named by segtrain.launch, once
        train(parse_config(argv))


if __name__ == "__main__":
    # The imports above (torch, torchvision, timm, ...: ~630,000 objects the cyclic garbage collector
    # tracks) ran without it: it would have walked them again and again as they grew. Frozen, they
    # are out of its reach for good, so its collections during the run and the interpreter's at
    # exit skip them (together ~2 s of CPU here). They are never garbage: modules live as long as
    # the process.
    gc.freeze()
    gc.enable()
    main()
