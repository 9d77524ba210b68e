"""DeepLabV3 / DeepLabV3+ on a timm backbone, and the model rebuilt from a checkpoint file.

The heads follow VainF/DeepLabV3Plus-Pytorch module for module (torchvision's
DeepLabV3 head has the same layout), so parameter counts match theirs exactly
and their checkpoints map onto ours by renaming keys (see ``segtrain.convert``).

    model = build_model("deeplabv3plus", "resnet50", num_classes=21, output_stride=16)
    logits = model(images)["out"]          # (N, C, H, W), same H, W as the input
    checkpoints.save_checkpoint("ckpt.pt", model, step=1000)
    model, ckpt = load_checkpoint("ckpt.pt")

The file format itself (save/read, safe loading, fine-tuning starts) is ``segtrain.checkpoints``.
"""
from __future__ import annotations

import sys
import warnings
from collections.abc import Mapping
from typing import Any, ClassVar, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.segmentation.fcn import FCNHead

# timm imports wandb whenever it is installed (timm.utils.summary, for its own training scripts'
# logging, which segtrain never calls): ~380 modules with pydantic and protobuf, a second or more
# of every process's start. Hide it while timm loads, so that only a run whose tracker is wandb
# imports it (the tracker does, when it starts); an already imported wandb is left alone.
_WANDB_HIDDEN = "wandb" not in sys.modules
if _WANDB_HIDDEN:
    sys.modules["wandb"] = None  # type: ignore[assignment]  # `import wandb` raises ImportError
try:
    import timm
finally:
    if _WANDB_HIDDEN and sys.modules.get("wandb", False) is None:
        del sys.modules["wandb"]
from timm.layers import SeparableConv2d  # noqa: E402
from timm.models import FeatureInfo  # noqa: E402

from segtrain.checkpoints import CheckpointError, load_weights, read_checkpoint, set_normalization, torch_load
from segtrain.files import PathLike
from segtrain.transforms import IMAGENET_MEAN, IMAGENET_STD


# Atrous rates double when the output stride halves, so the branches see the same image area.
ASPP_RATES = {16: (6, 12, 18), 8: (12, 24, 36)}
OUTPUT_STRIDES = tuple(sorted(ASPP_RATES))  # --output-stride
ASPP_CHANNELS = 256
LOW_LEVEL_CHANNELS = 48  # V3+ squeezes stride-4 features to 48 ch so they don't swamp the 256 ASPP ch
CONFIG_KEYS = ("arch", "backbone", "num_classes", "output_stride", "separable", "aux_head")

__all__ = [
    "ASPPConv", "ASPPPooling", "ASPP", "Head", "HEADS", "DeepLabHead", "DeepLabHeadV3Plus", "FCNHead", "DeepLab",
    "build_model", "model_from_state_dict", "load_checkpoint",
]


class PretrainedWeightsUnavailable(RuntimeError):
    """ImageNet weights could not be downloaded; the message says how to get around it."""


def conv3x3(in_channels: int, out_channels: int, dilation: int = 1, separable: bool = False) -> nn.Module:
    """3x3 conv without bias (a BN follows); depthwise + pointwise when ``separable``.

    The separable form is VainF's ``convert_to_separable_conv``: no norm between
    the depthwise and pointwise convs.
    """
    if separable:
        return SeparableConv2d(in_channels, out_channels, 3, dilation=dilation)
    return nn.Conv2d(in_channels, out_channels, 3, padding=dilation, dilation=dilation, bias=False)


class ASPPConv(nn.Sequential):
    def __init__(self, in_channels: int, out_channels: int, dilation: int, separable: bool = False):
        super().__init__(
            conv3x3(in_channels, out_channels, dilation, separable),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


class ASPPPooling(nn.Sequential):
    """Image-level features: global average, 1x1 conv, BN, ReLU, broadcast back to the map size."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(in_channels, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Bilinear upsampling of a 1x1 map is a constant map: expand says so without the interpolation.
        return super().forward(x).expand(-1, -1, *x.shape[-2:])


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: a 1x1 branch, three atrous 3x3 branches and image pooling."""

    def __init__(self, in_channels: int, atrous_rates: tuple[int, int, int],
                 out_channels: int = ASPP_CHANNELS, separable: bool = False):
        super().__init__()
        self.convs = nn.ModuleList([
            nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, bias=False),
                nn.BatchNorm2d(out_channels),
                nn.ReLU(inplace=True),
            ),
            *(ASPPConv(in_channels, out_channels, rate, separable) for rate in atrous_rates),
            ASPPPooling(in_channels, out_channels),
        ])
        self.project = nn.Sequential(
            nn.Conv2d(len(self.convs) * out_channels, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            nn.Dropout(0.1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(torch.cat([conv(x) for conv in self.convs], dim=1))


class Head:
    """What DeepLab asks of a head (DeepLabHead, DeepLabHeadV3Plus, or a new one added to HEADS).

    Built as ``Head(feature_info, num_classes, separable)`` from the backbone's timm
    ``feature_info`` (channels and stride of each feature level), called on the
    backbone's list of feature maps, it returns class logits at some stride (DeepLab
    upsamples them). ``classifier_path`` names its final 1x1 conv, the only layer whose
    shape depends on the class count: checkpoint conversion and fine-tuning on another
    label set find it there, without an instance (``HEADS[arch].classifier_path``).
    """

    classifier_path: ClassVar[str]

    @property
    def classifier_conv(self) -> nn.Conv2d:
        return self.get_submodule(self.classifier_path)


class DeepLabHead(Head, nn.Sequential):
    """DeepLabV3: ASPP on the deepest features, 3x3 conv, BN, ReLU, 1x1 classifier (logits at the backbone's stride)."""

    classifier_path = "4"

    def __init__(self, feature_info: FeatureInfo, num_classes: int, separable: bool = False):
        super().__init__(
            ASPP(feature_info.channels()[-1], ASPP_RATES[feature_info.reduction()[-1]], separable=separable),
            conv3x3(ASPP_CHANNELS, ASPP_CHANNELS, separable=separable),
            nn.BatchNorm2d(ASPP_CHANNELS),
            nn.ReLU(inplace=True),
            nn.Conv2d(ASPP_CHANNELS, num_classes, 1),
        )

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        return super().forward(features[-1])


class DeepLabHeadV3Plus(Head, nn.Module):
    """DeepLabV3+: ASPP on the deepest features, upsampled to stride 4 and fused with projected
    stride-4 features, then 3x3 conv, BN, ReLU, 1x1 classifier (logits at stride 4)."""

    classifier_path = "classifier.3"

    def __init__(self, feature_info: FeatureInfo, num_classes: int, separable: bool = False):
        super().__init__()
        channels, reductions = feature_info.channels(), feature_info.reduction()
        if 4 not in reductions:
            raise ValueError(f"the backbone has no stride-4 features (strides {reductions}), "
                             "which DeepLabV3+ needs; use arch='deeplabv3'")
        # The last stride-4 level: its index varies by family (1 for ResNets, 0 for ConvNeXt).
        self.low_level_index = max(i for i, r in enumerate(reductions) if r == 4)
        self.project = nn.Sequential(
            nn.Conv2d(channels[self.low_level_index], LOW_LEVEL_CHANNELS, 1, bias=False),
            nn.BatchNorm2d(LOW_LEVEL_CHANNELS),
            nn.ReLU(inplace=True),
        )
        self.aspp = ASPP(channels[-1], ASPP_RATES[reductions[-1]], separable=separable)
        self.classifier = nn.Sequential(
            conv3x3(LOW_LEVEL_CHANNELS + ASPP_CHANNELS, ASPP_CHANNELS, separable=separable),
            nn.BatchNorm2d(ASPP_CHANNELS),
            nn.ReLU(inplace=True),
            nn.Conv2d(ASPP_CHANNELS, num_classes, 1),
        )

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        low_level = self.project(features[self.low_level_index])
        x = F.interpolate(self.aspp(features[-1]), size=low_level.shape[-2:], mode="bilinear", align_corners=False)
        return self.classifier(torch.cat([low_level, x], dim=1))


# --arch: one entry per head. A new head (an FPN, say) is one Head class and one entry here.
HEADS: dict[str, type[Head]] = {"deeplabv3": DeepLabHead, "deeplabv3plus": DeepLabHeadV3Plus}
ARCHS = tuple(HEADS)


def init_head(module: nn.Module) -> None:
    """VainF's head init: Kaiming-normal convs, BN as identity."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class DeepLab(nn.Module):
    """A timm feature backbone + DeepLabV3 or V3+ head (+ optional FCN auxiliary head).

    ``forward(x)`` returns ``{"out": logits}`` (and ``"aux"`` when ``aux_head``),
    each (N, num_classes, H, W) at the input's size, as torchvision's models do.
    ``backbone``, ``head`` and ``aux_head`` are separate attributes so training can
    give the backbone its own learning rate. ``model_config`` rebuilds the model.
    ``mean`` and ``std`` are the input normalisation the backbone expects (its timm
    ``pretrained_cfg``; ImageNet's for torchvision-style weights); checkpoints store them.
    """

    def __init__(self, arch: str = "deeplabv3plus", backbone: str = "resnet50", num_classes: int = 21,
                 output_stride: int = 16, separable: bool = False, aux_head: bool = False,
                 pretrained: bool = False):
        super().__init__()
        self.model_config: dict[str, Any] = dict(
            arch=arch, backbone=backbone, num_classes=num_classes, output_stride=output_stride,
            separable=separable, aux_head=aux_head)
        # Every feature level is returned (the head picks the ones it reads); the extra maps cost no compute.
        self.backbone = create_backbone(backbone, output_stride, pretrained)
        pretrained_cfg = getattr(self.backbone, "pretrained_cfg", None) or {}
        self.mean: tuple[float, ...] = tuple(float(v) for v in pretrained_cfg.get("mean", IMAGENET_MEAN))
        self.std: tuple[float, ...] = tuple(float(v) for v in pretrained_cfg.get("std", IMAGENET_STD))
        info = self.backbone.feature_info
        if info.reduction()[-1] != output_stride:
            raise ValueError(f"backbone {backbone!r} ends at stride {info.reduction()[-1]}, not the requested "
                             f"output_stride {output_stride}; it does not support dilation")
        try:
            self.head = HEADS[arch](info, num_classes, separable)
        except ValueError as e:  # the backbone lacks a level this head needs
            raise ValueError(f"backbone {backbone!r}: {e}") from None
        init_head(self.head)
        # torchvision's auxiliary classifier reads the stage before the last (ResNet layer3).
        self.aux_index = len(info) - 2
        self.aux_head: Optional[nn.Module] = None
        if aux_head:
            self.aux_head = FCNHead(info.channels()[self.aux_index], num_classes)
            init_head(self.aux_head)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        size = x.shape[-2:]
        features = self.backbone(x)
        out = {"out": F.interpolate(self.head(features), size=size, mode="bilinear", align_corners=False)}
        if self.aux_head is not None:
            aux = self.aux_head(features[self.aux_index])
            out["aux"] = F.interpolate(aux, size=size, mode="bilinear", align_corners=False)
        return out

    def classifier_keys(self) -> set[str]:
        """State-dict keys of the final 1x1 convs: the only tensors whose shape depends on num_classes."""
        finals = [self.head.classifier_conv]
        if self.aux_head is not None:
            finals.append(self.aux_head[-1])
        return {f"{name}.{param}" for name, module in self.named_modules()
                if any(module is final for final in finals)
                for param, _ in module.named_parameters(recurse=False)}


def create_backbone(name: str, output_stride: int, pretrained: bool) -> nn.Module:
    """timm feature extractor (all levels); a short, actionable error when weights can't be downloaded."""
    try:
        return timm.create_model(name, pretrained=pretrained, features_only=True, output_stride=output_stride)
    except OSError as e:  # hub failures are OSErrors: huggingface_hub's LocalEntryNotFoundError, urllib's URLError
        if not pretrained:
            raise
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise PretrainedWeightsUnavailable(
            f"could not download pretrained weights for backbone {name!r} ({reason}). Fix: pass "
            "--backbone-weights PATH (a local timm/torchvision state dict), or set HF_HUB_OFFLINE=1 "
            "with the weights already in the Hugging Face cache (HF_HOME), or train from scratch "
            "with --pretrained false"
        ) from None


def build_model(arch: str = "deeplabv3plus", backbone: str = "resnet50", num_classes: int = 21,
                output_stride: int = 16, pretrained: bool = False, backbone_weights: Optional[PathLike] = None,
                separable: bool = False, aux_head: bool = False) -> DeepLab:
    """Build a DeepLab model.

    ``pretrained`` downloads ImageNet weights through timm (a tagged name such as
    ``resnet50.tv_in1k`` picks the weights). ``backbone_weights`` instead loads a
    local timm or torchvision state dict into the backbone and wins over
    ``pretrained``, so nothing is downloaded.
    """
    if arch not in HEADS:
        raise ValueError(f"arch must be one of {tuple(HEADS)}, got {arch!r}")
    if output_stride not in OUTPUT_STRIDES:
        raise ValueError(f"output_stride must be {' or '.join(map(str, OUTPUT_STRIDES))}, got {output_stride!r}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    if not timm.is_model(backbone):
        base = backbone.split(".")[0]
        close = timm.list_models(f"*{base}*")[:8]
        raise ValueError(f"unknown timm backbone {backbone!r}" + (f"; similar: {', '.join(close)}" if close else ""))
    model = DeepLab(arch, backbone, num_classes, output_stride, bool(separable), bool(aux_head),
                    pretrained=pretrained and backbone_weights is None)
    if backbone_weights is not None:
        load_backbone_weights(model.backbone, backbone_weights)
    return model


def load_backbone_weights(backbone: nn.Module, path: PathLike) -> None:
    """Load an ImageNet classifier's state dict (timm or torchvision ResNet keys) into the backbone."""
    state = torch_load(path)
    if isinstance(state, Mapping):
        for wrapper in ("state_dict", "model"):
            if isinstance(state.get(wrapper), Mapping):
                state = state[wrapper]
                break
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{path}: expected a state dict, got {type(state).__name__}")
    # The features_only backbone has no classifier; everything else must fit exactly.
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    load_weights(backbone, state, source=str(path))


def load_checkpoint(path: PathLike, num_classes: Optional[int] = None,
                    map_location: Union[str, torch.device] = "cpu") -> tuple[DeepLab, dict]:
    """Rebuild the model saved by ``save_checkpoint`` and load its weights.

    Returns ``(model, checkpoint)``; ``checkpoint`` holds the extras saved with it
    (``datasets.spec_from_checkpoint(checkpoint)`` gives its classes and colours).
    With ``num_classes`` different from the checkpoint's, the classifier layers are
    re-initialised (with a warning) and every other weight is loaded: fine-tuning
    on a new label set. The model's ``mean``/``std`` are the checkpoint's normalisation
    (checkpoints older than that field: the backbone's pretrained_cfg).
    """
    ckpt = read_checkpoint(path, map_location)
    model = model_from_state_dict(ckpt["model_config"], ckpt["model"], num_classes, source=str(path))
    set_normalization(model, ckpt, str(path))
    return model.to(map_location), ckpt


def model_from_state_dict(model_config: Mapping[str, Any], state: Mapping[str, Any],
                          num_classes: Optional[int] = None, source: str = "state dict") -> DeepLab:
    """Build the model ``model_config`` describes and load ``state`` into it (see ``load_checkpoint``)."""
    if not isinstance(model_config, Mapping) or set(model_config) != set(CONFIG_KEYS):
        got = sorted(model_config) if isinstance(model_config, Mapping) else type(model_config).__name__
        raise CheckpointError(f"{source}: model_config must have keys {list(CONFIG_KEYS)}, got {got}")
    config = dict(model_config)
    reinit = num_classes is not None and num_classes != config["num_classes"]
    if reinit:
        config["num_classes"] = num_classes
    model = build_model(**config)
    skip = model.classifier_keys() if reinit else set()
    load_weights(model, state, source, skip=skip)
    if reinit:
        warnings.warn(f"{source}: checkpoint has {model_config['num_classes']} classes, model has {num_classes}: "
                      f"classifier layers re-initialised ({', '.join(sorted(skip))}); all other weights loaded",
                      stacklevel=2)
    return model
