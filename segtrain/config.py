"""The one training configuration: a dataclass, overridden by YAML files, then CLI flags.

    python segtrain/train.py --config my_run.yaml --lr 0.02 --loss weighted_ce

Every field is a flag (``--batch-size`` and ``--batch_size`` both work). The
resolved config is saved as ``RUN_DIR/config.yaml`` and sent to the tracker.
Defaults: DeepLabV3+ on an ImageNet ResNet-50 at output stride 16, crop 513, global
batch 8, 5000 SGD steps (lr 0.01, momentum 0.9, wd 1e-4, backbone lr x0.1), StepLR
x0.9 every 1000 steps, cross-entropy. VainF/DeepLabV3Plus-Pytorch's published VOC
models trained longer (30k steps, batch 16, poly): pass those flags to match them.
"""
from __future__ import annotations

import argparse
import dataclasses
import re
import time
import typing
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import yaml

from segtrain import (autotune, distributed, hardware, inference, integrity, losses, model, preempt, schedule,
                      shardcache, trackers)
from segtrain.cli import ArgumentParser
from segtrain.files import ConfigError, atomic_write_bytes

MIXED_PRECISIONS = (None,) + hardware.PRECISIONS  # chosen by segtrain/hardware.py (None: accelerate's config)


def describe(choices: Collection) -> str:
    """``a (what a is) | b (...)`` from an owner's collection of choices."""
    def what(value: Any) -> str:
        text = value if isinstance(value, str) else (getattr(value, "__doc__", None) or "")
        return text.strip().splitlines()[0].rstrip(".") if text.strip() else ""
    items = choices.items() if isinstance(choices, Mapping) else ((c, "") for c in choices if c is not None)
    return " | ".join(f"{name} ({what(value)})" if what(value) else str(name) for name, value in items)


def setting(default: Any, help: str, choices: Optional[Collection] = None,
            minimum: Optional[float] = None) -> Any:
    """A config field: its default, its ``--help`` text and the checks ``validate`` derives.

    ``choices`` is the owner's own collection (``model.HEADS``, ``inference.PROTOCOLS``, ...),
    kept by reference: what the owner accepts is what the config accepts, and a mapping's
    values (descriptions, or classes/functions whose docstring's first line describes
    them) become the help text.
    """
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices, "minimum": minimum})


def loss_option(name: str) -> Any:
    """A field for a loss parameter: default, help and checks come from the loss that declares it."""
    option = losses.LOSS_OPTIONS[name]
    return setting(option.default, option.help, option.choices, option.minimum)


def loss_weight(field: str) -> Any:
    """A field for one loss's coefficient (``dice_weight``): help and check from segtrain/losses.py."""
    return setting(None, losses.WEIGHT_HELP.format(name=losses.LOSS_WEIGHTS[field]), minimum=0)


def with_loss_weights(cls: type) -> type:
    """Insert after ``loss`` a field per entry of ``losses.LOSS_WEIGHTS`` (``dice_weight``:
    ``--dice-weight``), so a loss added to ``losses.LOSSES`` has its weight flag with nothing
    listed here. Applied to the plain class, before ``@dataclass`` reads its annotations."""
    annotations = {}
    for name, hint in cls.__annotations__.items():
        annotations[name] = hint
        if name == "loss":
            for field in losses.LOSS_WEIGHTS:
                annotations[field] = "Optional[float]"
                setattr(cls, field, loss_weight(field))
    cls.__annotations__ = annotations
    return cls


@dataclass
@with_loss_weights
class TrainConfig:
    # data
    data: str = setting("shards/voc-train.json", "a manifest (shards/voc-train.json, "
                        "shards/cityscapes-train.json, ...), a shard pattern, or a VOCdevkit root; the classes "
                        "come from the data (the manifest's dataset spec)")
    val_data: Optional[str] = setting(None, "validation data; default: `data` (voc-train.json stands for "
                                      "its voc-val.json)")
    train_split: Optional[str] = setting(None, "default: the split of the manifest --data names, else train")
    val_split: str = setting("val", "split to validate on")
    workers: int = setting(4, "data loading workers per process (capped at the CPUs per process)", minimum=0)
    verify_shards: str = setting(integrity.DEFAULT_VERIFY, integrity.VERIFY_HELP, choices=integrity.VERIFY_MODES)
    remote_cache_gb: float = setting(shardcache.DEFAULT_GB, shardcache.HELP, minimum=0)
    # run
    run_dir: Optional[str] = setting(None, "where the run writes everything; default: runs/<name>")
    name: Optional[str] = setting(None, "run name; default: <arch>-<backbone>-<loss>-<time>")
    seed: int = setting(0, "seed of weights init, data order and augmentation")
    # model
    arch: str = setting("deeplabv3plus", "segmentation head", choices=model.HEADS)
    backbone: str = setting("resnet50.tv_in1k", "timm model name; the tag picks ImageNet weights")
    pretrained: bool = setting(True, "start the backbone from ImageNet weights (downloaded by timm)")
    backbone_weights: Optional[str] = setting(None, "local timm/torchvision state dict for the backbone; "
                                              "no download")
    output_stride: int = setting(16, "stride of the deepest features (atrous convolutions beyond it)",
                                 choices=model.OUTPUT_STRIDES)
    separable: bool = setting(False, "depthwise-separable 3x3 convs in the head (VainF's option)")
    aux_loss_weight: float = setting(0.0, "> 0 adds torchvision's auxiliary FCN head with this loss weight",
                                     minimum=0)
    num_classes: Optional[int] = setting(None, "classes the model predicts; default: the data's class count "
                                         "(another value is refused)", minimum=1)
    init_from: Optional[str] = setting(None, "segtrain checkpoint to start from (backbone and head; the "
                                       "classifier is re-initialised when the class count differs)")
    channels_last: Optional[bool] = setting(None, autotune.CHANNELS_LAST_HELP + "; none = auto")
    # optimisation (iterations count optimizer steps, whatever the number of processes)
    iterations: int = setting(5000, "optimizer steps", minimum=1)
    batch_size: int = setting(8, "global batch: processes x per-process batch x grad_accum", minimum=1)
    crop_size: int = setting(513, "training crop (pixels, square)", minimum=1)
    scale_min: float = setting(0.5, "smallest random rescale factor")
    scale_max: float = setting(2.0, "largest random rescale factor")
    color_jitter: bool = setting(False, "add colour jitter to the augmentation")
    lr: float = setting(0.01, "base learning rate (the head's)", minimum=0)
    backbone_lr_mult: float = setting(0.1, "backbone lr = lr x this", minimum=0)
    momentum: float = setting(0.9, "SGD momentum", minimum=0)
    weight_decay: float = setting(1e-4, "SGD weight decay", minimum=0)
    lr_schedule: str = setting("step", "learning-rate schedule", choices=schedule.SCHEDULES)
    step_size: int = setting(1000, "step schedule: steps between decays", minimum=1)
    step_gamma: float = setting(0.9, "step schedule: decay factor")
    poly_power: float = setting(0.9, "poly schedule: exponent")
    warmup_iters: int = setting(0, "linear warmup steps", minimum=0)
    grad_accum: int = setting(1, "micro-batches per optimizer step", minimum=1)
    grad_clip: float = setting(0.0, "max global grad norm; 0 = off", minimum=0)
    mixed_precision: Optional[str] = setting("auto", hardware.PRECISION_HELP + "; none = accelerate launch's config",
                                             choices=MIXED_PRECISIONS)
    compile: bool = setting(False, "torch.compile the model for training and validation (falls back to eager "
                                   "with one line if compiling fails; measured no faster on CPU)")
    sync_bn: bool = setting(False, "SyncBatchNorm across processes (GPUs only)")
    dist_timeout_min: float = setting(distributed.DIST_TIMEOUT_MIN, distributed.DIST_TIMEOUT_HELP, minimum=1)
    # loss (see segtrain/losses.py)
    loss: str = setting("ce", "loss names joined by '+', each with an optional coefficient (e.g. "
                        f"ce+0.5*dice); names: {describe(losses.LOSSES)}; a later source's --loss "
                        "clears the --NAME-weight values of earlier ones (a --config file's)")
    # here: one --NAME-weight field per loss (with_loss_weights)
    class_weighting: str = loss_option("class_weighting")
    focal_gamma: float = loss_option("focal_gamma")
    ohem_thresh: float = loss_option("ohem_thresh")
    ohem_min_kept: int = loss_option("ohem_min_kept")
    # validation, checkpoints, logging
    val_protocol: str = setting("whole", "validation protocol", choices=inference.PROTOCOLS)
    val_every: int = setting(0, "optimizer steps between validations; 0 = every epoch", minimum=0)
    checkpoint_every: int = setting(1000, "optimizer steps between resumable checkpoints", minimum=1)
    keep_checkpoints: int = setting(3, "resumable checkpoints kept (the newest)", minimum=1)
    resume: Optional[str] = setting(None, "auto (the newest checkpoint of RUN_DIR if any, else a fresh start: "
                                    "for jobs that may be requeued) | latest | PATH to a checkpoints/step_* folder")
    stop_signals: str = setting("TERM+USR1", preempt.STOP_HELP, choices=preempt.STOP_SIGNALS)
    tracker: str = setting(trackers.DEFAULT_TRACKER, trackers.TRACKER_HELP, choices=trackers.TRACKERS)
    wandb_project: str = setting("segtrain", "wandb project")
    group: Optional[str] = setting(None, trackers.GROUP_HELP)
    tags: Optional[str] = setting(None, trackers.TAGS_HELP)
    notes: Optional[str] = setting(None, trackers.NOTES_HELP)
    log_model: str = setting(trackers.DEFAULT_LOG_MODEL, "checkpoints sent to wandb as model artifacts",
                             choices=trackers.LOG_MODEL)
    log_every: int = setting(10, "optimizer steps between log lines", minimum=1)
    num_val_images: int = setting(4, "val images with mask overlays sent to the tracker (the smallest ids; "
                                  "per-image IoU and accuracy go for every val image)", minimum=0)

    def resolved_run_dir(self) -> Path:
        return Path(self.run_dir) if self.run_dir else Path("runs") / self.name


def _field_type(f: dataclasses.Field) -> type:
    """The base type of a field (``Optional[int]`` -> ``int``)."""
    hint = typing.get_type_hints(TrainConfig)[f.name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def _coerce(name: str, value: Any) -> Any:
    f = FIELDS[name]
    kind = _field_type(f)
    optional = type(None) in typing.get_args(typing.get_type_hints(TrainConfig)[f.name])
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null")):
        if optional:
            return None
        raise ConfigError(f"{name}: needs a value ({kind.__name__}), got none")
    if kind is bool:
        if isinstance(value, bool):
            return value
        if optional and str(value).lower() == "auto":  # an optional switch's None is "decide here"
            return None
        if str(value).lower() in ("true", "1", "yes", "on"):
            return True
        if str(value).lower() in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"{name}: expected true or false, got {value!r}")
    try:
        if kind is int and isinstance(value, float) and not value.is_integer():
            raise ValueError
        return kind(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name}: expected {kind.__name__}, got {value!r}") from None


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def validate(cfg: TrainConfig) -> TrainConfig:
    """Check every field against what its owner allows (``setting``'s choices and minimum)."""
    for f in dataclasses.fields(TrainConfig):
        value, choices, minimum = getattr(cfg, f.name), f.metadata["choices"], f.metadata["minimum"]
        if choices is not None and value not in choices:
            shown = ", ".join(str(c) for c in choices if c is not None)
            raise ConfigError(f"{f.name}: must be one of {shown}, got {value!r}")
        if minimum is not None and value is not None and value < minimum:  # None: derived later
            raise ConfigError(f"{f.name}: must be >= {minimum}, got {value}")
    cfg = resolve_loss(cfg)
    if not 0 < cfg.scale_min <= cfg.scale_max:
        raise ConfigError(f"scale_min/scale_max: need 0 < scale_min <= scale_max, got {cfg.scale_min}, {cfg.scale_max}")
    if cfg.crop_size < 33:
        raise ConfigError(f"crop_size: must be >= 33 (the model downsamples 16x), got {cfg.crop_size}")
    return cfg


def resolve_loss(cfg: TrainConfig) -> TrainConfig:
    """``loss`` with the ``--NAME-weight`` values applied (``losses.weigh_terms``), as a normalised
    spec, and every loss's weight as a number (0 for a loss not in the mix): what config.yaml and the
    dashboard record. Resolving a resolved config changes nothing."""
    weights = {field: getattr(cfg, field) for field in losses.LOSS_WEIGHTS}
    try:
        terms = losses.weigh_terms(cfg.loss, weights)
    except ValueError as e:
        raise ConfigError(f"loss: {e}") from None
    coefs = {name: coef for coef, name in terms}
    resolved = {field: coefs.get(name, 0.0) for field, name in losses.LOSS_WEIGHTS.items()}
    return dataclasses.replace(cfg, loss=losses.loss_spec(terms), **resolved)


def field_help(f: dataclasses.Field) -> str:
    """The ``--help`` line of a field: its help, its choices as their owner describes them, its default."""
    choices = f.metadata["choices"]
    text = f.metadata["help"] + (f"; one of: {describe(choices)}" if choices is not None else "")
    return f"{text} (default: {f.default})".replace("%", "%%")
# config.yaml also records what "auto" settings became on the machine that ran it
# (segtrain.autotune.training_runtime): information, not input, so reading it back skips it.
RESOLVED_KEY = "resolved"


def load_yaml(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--config {path}: file not found")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"--config {path}: not valid YAML ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: expected a mapping of keys to values")
    data.pop(RESOLVED_KEY, None)
    return data


def apply_overrides(cfg: TrainConfig, overrides: dict, source: str) -> TrainConfig:
    updates = {}
    for key, value in overrides.items():
        name = str(key).replace("-", "_")
        if name not in FIELDS:
            close = [k for k in FIELDS if k.startswith(name[:4])]
            raise ConfigError(f"{source}: unknown key {key!r}" + (f" (did you mean {', '.join(close)}?)" if close else ""))
        updates[name] = _coerce(name, value)
    if "loss" in updates:  # the whole mix: weights from an earlier source (a saved config.yaml) no longer apply
        updates = {field: None for field in losses.LOSS_WEIGHTS} | updates
    return dataclasses.replace(cfg, **updates)


def parse_config(argv: Optional[list[str]] = None) -> TrainConfig:
    """Defaults <- each ``--config`` YAML in order <- ``--key value`` flags."""
    ap = ArgumentParser(
        prog="segtrain/train.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        argument_default=argparse.SUPPRESS)
    ap.add_argument("--config", action="append", default=[], help="YAML file of config keys (repeatable)")
    for f in dataclasses.fields(TrainConfig):
        flags = sorted({f"--{f.name}", f"--{f.name.replace('_', '-')}"})
        ap.add_argument(*flags, dest=f.name, metavar=_field_type(f).__name__.upper(), help=field_help(f))
    args = vars(ap.parse_args(argv))
    cfg = TrainConfig()
    for path in args.pop("config"):
        cfg = apply_overrides(cfg, load_yaml(path), f"--config {path}")
    cfg = validate(apply_overrides(cfg, args, "command line"))
    if cfg.name is None:
        loss = losses.loss_spec(losses.parse_loss_spec(cfg.loss), digits=3)  # a swept 0.7342... reads 0.734
        stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{cfg.arch}-{cfg.backbone}-{loss}")
        # A sweep trial is named by its wandb run id: the agent reruns a preempted trial with the same
        # id, so the rerun finds its RUN_DIR and resumes (--resume auto). Otherwise the job's start
        # time (segtrain.launch's, the same for every restart round of --max_restarts).
        started = time.strftime('%Y%m%d-%H%M%S', time.localtime(distributed.job_start()))
        cfg = dataclasses.replace(cfg, name=f"{stem}-{trackers.sweep_trial_id() or started}")
    return cfg


def config_to_dict(cfg: TrainConfig) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: TrainConfig, path: Path, resolved: Optional[dict] = None) -> None:
    """The config as YAML; ``resolved`` (what auto settings became here) under the key ``resolved``."""
    data = config_to_dict(cfg) | ({RESOLVED_KEY: resolved} if resolved is not None else {})
    atomic_write_bytes(path, yaml.safe_dump(data, sort_keys=False).encode())


def update_saved_config(path: Path, **changes: Any) -> dict:
    """Set keys of a saved config.yaml (atomically; a mapping updates the saved mapping, as
    ``resolved``); returns ``{key: (old, new)}`` for those that changed."""
    saved = yaml.safe_load(path.read_text()) if path.is_file() else None
    if not isinstance(saved, dict):
        return {}
    changes = {k: saved[k] | v if isinstance(v, dict) and isinstance(saved.get(k), dict) else v
               for k, v in changes.items()}
    changed = {k: (saved.get(k), v) for k, v in changes.items() if saved.get(k) != v}
    if changed:
        saved.update({k: new for k, (_, new) in changed.items()})
        atomic_write_bytes(path, yaml.safe_dump(saved, sort_keys=False).encode())
    return changed


__all__ = ["TrainConfig", "ConfigError", "parse_config", "save_config", "config_to_dict",
           "apply_overrides", "validate", "update_saved_config"]
