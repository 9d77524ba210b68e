"""Segmentation metrics from a confusion matrix (mIoU, pixel accuracy, ...).

Everything is derived from one (C, C) int64 confusion matrix, rows = ground
truth, columns = prediction, as in torchvision's references/segmentation. A
matrix is a sufficient statistic: matrices from different batches (or
processes) add up, and every metric below is a function of the total.

Classes that occur neither in the ground truth nor in the predictions have no
defined IoU. They are NaN in the per-class lists and left out of every mean
(so mIoU on a subset of VOC that lacks, say, "sheep" is not dragged down by a
0 for sheep). ``to_jsonable`` turns those NaNs into ``null`` for JSON files.
"""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import torch
from torch import Tensor

from segtrain.datasets import IGNORE_INDEX


def confusion_matrix(pred: Tensor, target: Tensor, num_classes: int,
                     ignore_index: int = IGNORE_INDEX) -> Tensor:
    """(num_classes, num_classes) int64 counts; entry [t, p] = pixels of class t predicted as p.

    Pixels whose target is ``ignore_index`` are skipped. ``pred`` and ``target``
    are integer tensors of the same shape on any device; the result lives on
    that device. Out-of-range labels raise instead of being silently dropped
    (torchvision's version drops them), because they mean a broken label or a
    model with the wrong number of outputs.
    """
    if pred.shape != target.shape:
        raise ValueError(f"confusion_matrix: pred shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
    if pred.is_floating_point() or target.is_floating_point():
        raise ValueError("confusion_matrix: pred and target must be integer class indices (argmax the logits first)")
    valid = target != ignore_index
    t = target[valid].long()
    p = pred[valid].long()
    out_of_range = (t < 0) | (t >= num_classes) | (p < 0) | (p >= num_classes)
    if out_of_range.any():
        bad = torch.cat([t[out_of_range], p[out_of_range]]).unique()[:5].tolist()
        raise ValueError(f"confusion_matrix: labels outside 0..{num_classes - 1} (and {ignore_index} in target), e.g. {bad}")
    return torch.bincount(t * num_classes + p, minlength=num_classes ** 2).reshape(num_classes, num_classes)


def segmentation_metrics(cm: Tensor, class_names: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """All metrics of a confusion matrix, as plain Python floats (NaN where undefined).

    Keys:
      miou            mean IoU over classes present in ground truth or prediction
      pixel_acc       correctly classified pixels / labelled pixels
      mean_class_acc  mean per-class recall over classes present in ground truth
      fwiou           frequency-weighted IoU: sum_c (gt pixels of c / all) * IoU_c
      iou, class_acc  per-class lists (NaN where the class is absent as above)
      num_pixels      labelled pixels counted (lets callers check each sample was seen once)
      per_class       {class name: IoU}, only when ``class_names`` is given
    """
    if cm.dim() != 2 or cm.shape[0] != cm.shape[1]:
        raise ValueError(f"segmentation_metrics: expected a square confusion matrix, got shape {tuple(cm.shape)}")
    num_classes = cm.shape[0]
    if class_names is not None and len(class_names) != num_classes:
        raise ValueError(f"segmentation_metrics: {len(class_names)} class names for a {num_classes}-class matrix")
    cm = cm.detach().to("cpu", torch.float64)
    tp = cm.diag()
    gt = cm.sum(1)
    predicted = cm.sum(0)
    union = gt + predicted - tp
    total = cm.sum()
    nan = torch.tensor(math.nan, dtype=torch.float64)

    iou = torch.where(union > 0, tp / union, nan)
    class_acc = torch.where(gt > 0, tp / gt, nan)
    metrics: dict[str, Any] = {
        "miou": iou.nanmean().item(),
        "pixel_acc": (tp.sum() / total).item() if total > 0 else math.nan,
        "mean_class_acc": class_acc.nanmean().item(),
        # A class with ground-truth pixels always has a union > 0, so weights only touch defined IoUs.
        "fwiou": (gt[gt > 0] / total * iou[gt > 0]).sum().item() if total > 0 else math.nan,
        "iou": iou.tolist(),
        "class_acc": class_acc.tolist(),
        "num_pixels": int(total.item()),
    }
    if class_names is not None:
        metrics["per_class"] = dict(zip(class_names, metrics["iou"]))
    return metrics


def to_jsonable(obj: Any) -> Any:
    """Copy of ``obj`` that ``json.dumps`` writes as strict JSON: NaN/inf -> None, tensors -> lists."""
    if isinstance(obj, Tensor):
        obj = obj.tolist()
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    return obj


class ConfusionMatrix:
    """Running confusion matrix: ``update`` per batch, ``reduce`` once across processes, ``compute``.

    ``device`` is where the counts accumulate; put it on the model's device so
    ``update`` never copies predictions to the host.
    """

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX,
                 device: Optional[torch.device | str] = None) -> None:
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.mat = torch.zeros((num_classes, num_classes), dtype=torch.int64, device=device)

    def update(self, pred: Tensor, target: Tensor) -> None:
        counts = confusion_matrix(pred, target, self.num_classes, self.ignore_index)
        self.mat += counts.to(self.mat.device)

    def reset(self) -> None:
        self.mat.zero_()

    def reduce(self, accelerator) -> None:
        """Sum the matrices of all processes (every rank gets the total); call once, after the loop.

        Correct ONLY when each rank saw disjoint samples, as segtrain's
        validation loader guarantees (webdataset ``split_by_node``, no
        resampling). With a map-style DataLoader through
        ``accelerator.prepare``, Accelerate pads the last batch with duplicate
        samples and the sum counts them twice; there, gather (pred, target)
        with ``accelerator.gather_for_metrics`` per batch instead.
        """
        # The collective needs the tensor on the backend's device (NCCL: the GPU).
        total = accelerator.reduce(self.mat.to(accelerator.device), "sum")
        self.mat = total.to(self.mat.device)

    def compute(self, class_names: Optional[Sequence[str]] = None) -> dict[str, Any]:
        return segmentation_metrics(self.mat, class_names)


def format_metrics_table(metrics: dict[str, Any], class_names: Sequence[str]) -> str:
    """Per-class IoU / accuracy table plus the summary metrics, in percent, for terminal output."""
    def pct(x: Optional[float]) -> str:  # None: metrics that went through to_jsonable
        return "     -" if x is None or math.isnan(x) else f"{100 * x:6.2f}"

    width = max(len("mean class acc"), *(len(n) for n in class_names))
    lines = [f"{'class':<{width}}    IoU    Acc", "-" * (width + 15)]
    for name, iou, acc in zip(class_names, metrics["iou"], metrics["class_acc"]):
        lines.append(f"{name:<{width}} {pct(iou)} {pct(acc)}")
    lines.append("-" * (width + 15))
    for key, label in (("miou", "mIoU"), ("pixel_acc", "pixel acc"),
                       ("mean_class_acc", "mean class acc"), ("fwiou", "fwIoU")):
        lines.append(f"{label:<{width}} {pct(metrics[key])}")
    return "\n".join(lines)


def subset_miou(iou: Sequence[Optional[float]], classes: Sequence[int]) -> float:
    """Mean IoU over ``classes`` only (e.g. the rarest ones), skipping undefined (None/NaN) IoUs."""
    values = [iou[c] for c in classes if iou[c] is not None and not math.isnan(iou[c])]
    return sum(values) / len(values) if values else float("nan")
