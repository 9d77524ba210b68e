"""Convert VainF/DeepLabV3Plus-Pytorch and torchvision DeepLabV3 weights to segtrain checkpoints.

    python tools/convert_checkpoint.py --from vainf best_deeplabv3plus_resnet50_voc_os16.pth --out ckpt.pt
    python tools/convert_checkpoint.py --from torchvision deeplabv3_resnet50_coco-cd0a2569.pth --out ckpt.pt

The modules are the same, only their names differ (segtrain's on the right):

    both                backbone.{conv1,bn1,layer1..4}.*      -> backbone.*  (timm ResNet keys = torchvision's)
    VainF V3+           classifier.{project,aspp,classifier}.* -> head.{project,aspp,classifier}.*
    VainF V3            classifier.classifier.*               -> head.*
    VainF separable     <conv>.body.0 / <conv>.body.1         -> <conv>.conv_dw / <conv>.conv_pw
    torchvision         classifier.*, aux_classifier.*        -> head.*, aux_head.*

Architecture, backbone depth, separable convs, aux head and class count are read
from the keys and shapes. The output stride is not stored in the weights: VainF's
file names carry it (``_os8``/``_os16``), torchvision's model is always stride 8.
"""
from __future__ import annotations

import argparse
import re
import sys
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional

import torch

from segtrain.checkpoints import CheckpointError, save_checkpoint, torch_load
from segtrain.files import PathLike
from segtrain.model import HEADS, OUTPUT_STRIDES, DeepLab, model_from_state_dict
from segtrain.cli import user_errors

SOURCES = ("vainf", "torchvision")
DEFAULT_VAINF_OUTPUT_STRIDE = 16  # VainF's training default

# (blocks per stage, bottleneck blocks) -> torchvision/timm ResNet name
RESNET_DEPTHS = {
    ((2, 2, 2, 2), False): "resnet18",
    ((3, 4, 6, 3), False): "resnet34",
    ((3, 4, 6, 3), True): "resnet50",
    ((3, 4, 23, 3), True): "resnet101",
    ((3, 8, 36, 3), True): "resnet152",
}


def convert_state_dict(source: str, state: Mapping[str, Any], output_stride: Optional[int] = None,
                       name: str = "state dict") -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Foreign state dict -> (segtrain model_config, segtrain state dict). ``name`` labels errors."""
    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
    state = _strip_prefix(dict(state), "module.")  # saved from a DataParallel-wrapped model
    if source == "vainf":
        config, renamed = _from_vainf(state, name)
        config["output_stride"] = output_stride or _vainf_output_stride(name)
    else:
        if output_stride not in (None, 8):
            raise ValueError(f"torchvision's deeplabv3 runs at output stride 8; got --output-stride {output_stride}")
        config, renamed = _from_torchvision(state, name)
        config["output_stride"] = 8
    config["backbone"] = _resnet_name(renamed, name)
    config["num_classes"] = int(renamed[f"head.{HEADS[config['arch']].classifier_path}.weight"].shape[0])
    return config, renamed


def convert_checkpoint(source: str, src: PathLike, dst: PathLike, num_classes: Optional[int] = None,
                       output_stride: Optional[int] = None) -> DeepLab:
    """Convert the file ``src`` and write a segtrain checkpoint to ``dst``; returns the model.

    A ``num_classes`` other than the source's re-initialises the classifier (with a warning).
    """
    ckpt = torch_load(src)
    state = ckpt.get("model_state" if source == "vainf" else "model", ckpt) if isinstance(ckpt, Mapping) else ckpt
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{src}: expected a state dict of tensors (or {{'model_state'/'model': ...}}), "
                              f"got {type(state).__name__}")
    config, state = convert_state_dict(source, state, output_stride, name=str(src))
    model = model_from_state_dict(config, state, num_classes, source=str(src))
    save_checkpoint(dst, model, converted_from={"format": source, "file": Path(src).name})
    return model


def _from_vainf(state: dict, name: str) -> tuple[dict[str, Any], dict]:
    if "classifier.project.0.weight" in state:
        arch, head_prefix = "deeplabv3plus", "classifier."
    elif "classifier.classifier.0.convs.0.0.weight" in state:
        arch, head_prefix = "deeplabv3", "classifier.classifier."
    else:
        raise CheckpointError(f"{name}: not a VainF DeepLabV3/V3+ checkpoint (no 'classifier.project.*' "
                              "or 'classifier.classifier.0.convs.*' keys)")
    renamed = {}
    for key, value in state.items():
        if key.startswith(head_prefix):
            key = "head." + key[len(head_prefix):]
        renamed[key.replace(".body.0.", ".conv_dw.").replace(".body.1.", ".conv_pw.")] = value
    separable = any(".body." in key for key in state)
    return dict(arch=arch, separable=separable, aux_head=False), renamed


def _from_torchvision(state: dict, name: str) -> tuple[dict[str, Any], dict]:
    if "classifier.0.convs.0.0.weight" not in state:
        raise CheckpointError(f"{name}: not a torchvision deeplabv3 state dict (no 'classifier.0.convs.*' keys)")
    prefixes = {"classifier.": "head.", "aux_classifier.": "aux_head."}
    renamed = {}
    for key, value in state.items():
        for old, new in prefixes.items():
            if key.startswith(old):
                key = new + key[len(old):]
                break
        renamed[key] = value
    aux = any(key.startswith("aux_head.") for key in renamed)
    return dict(arch="deeplabv3", separable=False, aux_head=aux), renamed


def _strip_prefix(state: dict, prefix: str) -> dict:
    if state and all(key.startswith(prefix) for key in state):
        return {key[len(prefix):]: value for key, value in state.items()}
    return state


def _vainf_output_stride(name: str) -> int:
    found = re.search(r"_os(8|16)(?!\d)", Path(name).name)
    return int(found.group(1)) if found else DEFAULT_VAINF_OUTPUT_STRIDE


def _resnet_name(state: Mapping[str, Any], name: str) -> str:
    blocks: dict[int, set[str]] = {stage: set() for stage in range(1, 5)}
    for key in state:
        found = re.match(r"backbone\.layer([1-4])\.(\d+)\.", key)
        if found:
            blocks[int(found.group(1))].add(found.group(2))
    depths = tuple(len(blocks[stage]) for stage in range(1, 5))
    bottleneck = "backbone.layer1.0.conv3.weight" in state
    if (depths, bottleneck) not in RESNET_DEPTHS:
        raise CheckpointError(f"{name}: backbone is not a ResNet-18/34/50/101/152 "
                              f"(blocks per stage {depths}, bottleneck={bottleneck}); only ResNets convert")
    return RESNET_DEPTHS[depths, bottleneck]


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python tools/convert_checkpoint.py",
        description="Convert VainF/DeepLabV3Plus-Pytorch or torchvision deeplabv3_resnet50 weights "
                    "into a segtrain checkpoint (weights + model_config).")
    parser.add_argument("--from", dest="source", choices=SOURCES, required=True,
                        help="layout of SRC: VainF checkpoint ({'model_state': ...}) or torchvision state dict")
    parser.add_argument("src", type=Path, metavar="SRC", help="checkpoint to convert")
    parser.add_argument("--out", type=Path, required=True, metavar="DST", help="segtrain checkpoint to write")
    parser.add_argument("--num-classes", type=int, default=None,
                        help="class count of the new model; if it differs from SRC's, the classifier "
                             "is re-initialised (fine-tuning on another label set)")
    parser.add_argument("--output-stride", type=int, choices=OUTPUT_STRIDES, default=None,
                        help="VainF: the stride the weights were trained at (default: _os8/_os16 in the "
                             f"file name, else {DEFAULT_VAINF_OUTPUT_STRIDE}); torchvision: always 8")
    args = parser.parse_args(argv)

    with user_errors(ValueError), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = convert_checkpoint(args.source, args.src, args.out, args.num_classes, args.output_stride)
    for warning in caught:
        print(f"convert_checkpoint: note: {warning.message}", file=sys.stderr)
    c = model.model_config
    print(f"wrote {args.out}: {c['arch']} {c['backbone']}, output stride {c['output_stride']}, "
          f"{c['num_classes']} classes, separable={c['separable']}, aux_head={c['aux_head']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
