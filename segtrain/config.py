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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import yaml

from .io import ConfigError, atomic_write_bytes


@dataclass
class TrainConfig:
    # data: a manifest (shards/voc-train.json, shards/cityscapes-train.json, ...), a shard
    # pattern, or a VOCdevkit root. The classes come from the data (the manifest's dataset spec).
    data: str = "shards/voc-train.json"
    val_data: Optional[str] = None  # default: `data` (voc-train.json stands for its voc-val.json)
    train_split: Optional[str] = None  # default: the split of the manifest --data names, else train
    val_split: str = "val"
    workers: int = 4
    # run
    run_dir: Optional[str] = None  # default: runs/<name>
    name: Optional[str] = None     # default: <arch>-<backbone>-<loss>-<time>
    seed: int = 0
    # model
    arch: str = "deeplabv3plus"
    backbone: str = "resnet50.tv_in1k"  # timm name; the tag picks ImageNet weights
    pretrained: bool = True
    backbone_weights: Optional[str] = None  # local timm/torchvision state dict; no download
    output_stride: int = 16
    separable: bool = False
    aux_loss_weight: float = 0.0  # > 0 adds torchvision's auxiliary FCN head
    num_classes: Optional[int] = None  # default: the data's class count; another value is refused
    init_from: Optional[str] = None  # segtrain checkpoint to start from (classifier re-initialised if classes differ)
    channels_last: bool = True  # faster convolutions on GPUs (tensor cores) and on CPUs with bf16
    # optimisation (iterations count optimizer steps, whatever the number of processes)
    iterations: int = 5000
    batch_size: int = 8  # global: processes x per-process batch x grad_accum
    crop_size: int = 513
    scale_min: float = 0.5
    scale_max: float = 2.0
    color_jitter: bool = False
    lr: float = 0.01
    backbone_lr_mult: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    lr_schedule: str = "step"  # step | poly | constant
    step_size: int = 1000
    step_gamma: float = 0.9
    poly_power: float = 0.9
    warmup_iters: int = 0
    grad_accum: int = 1
    grad_clip: float = 0.0  # max global grad norm; 0 = off
    mixed_precision: Optional[str] = None  # no | bf16 | fp16; None = accelerate's config
    sync_bn: bool = False
    # loss (see segtrain/losses.py)
    loss: str = "ce"
    class_weighting: str = "enet"  # for weighted_ce: enet (bounded) | median_frequency | inverse
    focal_gamma: float = 2.0
    ohem_thresh: float = 0.7
    ohem_min_kept: int = 100000
    # validation, checkpoints, logging
    val_protocol: str = "whole"  # whole | center-crop | ms-flip (see segtrain/evaluate.py)
    val_every: int = 0  # optimizer steps between validations; 0 = every epoch
    checkpoint_every: int = 1000
    keep_checkpoints: int = 3
    resume: Optional[str] = None  # latest | PATH to a checkpoints/step_* folder
    tracker: str = "wandb"  # wandb | none
    wandb_project: str = "segtrain"
    log_every: int = 10
    num_val_images: int = 4  # val images with mask overlays sent to the tracker

    def resolved_run_dir(self) -> Path:
        return Path(self.run_dir) if self.run_dir else Path("runs") / self.name


CHOICES = {
    "arch": ("deeplabv3", "deeplabv3plus"),
    "output_stride": (8, 16),
    "lr_schedule": ("step", "poly", "constant"),
    "mixed_precision": (None, "no", "bf16", "fp16"),
    "class_weighting": ("inverse", "median_frequency", "enet"),
    "val_protocol": ("whole", "center-crop", "ms-flip"),
    "tracker": ("wandb", "none"),
}
POSITIVE = ("iterations", "batch_size", "crop_size", "step_size", "grad_accum",
            "checkpoint_every", "keep_checkpoints", "log_every", "num_classes")
NON_NEGATIVE = ("workers", "lr", "weight_decay", "momentum", "warmup_iters", "grad_clip", "val_every",
                "aux_loss_weight", "num_val_images", "backbone_lr_mult", "focal_gamma")


def _field_type(f: dataclasses.Field) -> type:
    """The base type of a field (``Optional[int]`` -> ``int``)."""
    hint = typing.get_type_hints(TrainConfig)[f.name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def _coerce(name: str, value: Any) -> Any:
    f = FIELDS[name]
    kind = _field_type(f)
    if value is None or (f.default is None and isinstance(value, str) and value.lower() in ("none", "null")):
        if f.default is None:
            return None
        raise ConfigError(f"{name}: needs a value ({kind.__name__}), got none")
    if kind is bool:
        if isinstance(value, bool):
            return value
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
    for name, allowed in CHOICES.items():
        if getattr(cfg, name) not in allowed:
            shown = ", ".join(str(a) for a in allowed if a is not None)
            raise ConfigError(f"{name}: must be one of {shown}, got {getattr(cfg, name)!r}")
    for name in POSITIVE:
        if getattr(cfg, name) is not None and getattr(cfg, name) < 1:
            raise ConfigError(f"{name}: must be >= 1, got {getattr(cfg, name)}")
    for name in NON_NEGATIVE:
        if getattr(cfg, name) < 0:
            raise ConfigError(f"{name}: must be >= 0, got {getattr(cfg, name)}")
    if not 0 < cfg.scale_min <= cfg.scale_max:
        raise ConfigError(f"scale_min/scale_max: need 0 < scale_min <= scale_max, got {cfg.scale_min}, {cfg.scale_max}")
    if cfg.crop_size < 33:
        raise ConfigError(f"crop_size: must be >= 33 (the model downsamples 16x), got {cfg.crop_size}")
    return cfg


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
    return data


def apply_overrides(cfg: TrainConfig, overrides: dict, source: str) -> TrainConfig:
    updates = {}
    for key, value in overrides.items():
        name = str(key).replace("-", "_")
        if name not in FIELDS:
            close = [k for k in FIELDS if k.startswith(name[:4])]
            raise ConfigError(f"{source}: unknown key {key!r}" + (f" (did you mean {', '.join(close)}?)" if close else ""))
        updates[name] = _coerce(name, value)
    return dataclasses.replace(cfg, **updates)


def parse_config(argv: Optional[list[str]] = None) -> TrainConfig:
    """Defaults <- each ``--config`` YAML in order <- ``--key value`` flags."""
    ap = argparse.ArgumentParser(
        prog="segtrain/train.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        argument_default=argparse.SUPPRESS)
    ap.add_argument("--config", action="append", default=[], help="YAML file of config keys (repeatable)")
    for f in dataclasses.fields(TrainConfig):
        flags = sorted({f"--{f.name}", f"--{f.name.replace('_', '-')}"})
        ap.add_argument(*flags, dest=f.name, metavar=_field_type(f).__name__.upper(),
                        help=f"default: {f.default}")
    args = vars(ap.parse_args(argv))
    cfg = TrainConfig()
    for path in args.pop("config"):
        cfg = apply_overrides(cfg, load_yaml(path), f"--config {path}")
    cfg = apply_overrides(cfg, args, "command line")
    if cfg.name is None:
        stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{cfg.arch}-{cfg.backbone}-{cfg.loss}")
        cfg = dataclasses.replace(cfg, name=f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}")
    return validate(cfg)


def config_to_dict(cfg: TrainConfig) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: TrainConfig, path: Path) -> None:
    atomic_write_bytes(path, yaml.safe_dump(config_to_dict(cfg), sort_keys=False).encode())


__all__ = ["TrainConfig", "ConfigError", "parse_config", "save_config", "config_to_dict",
           "apply_overrides", "validate"]
