"""Inference: the evaluation protocols, test-time augmentation, ``evaluate()`` and ``predict_mask()``,
the library that training's validation and the CLIs (evaluate, predict, report, sam) share.

Protocols:

* ``whole``: each image at its own size (the standard VOC protocol);
* ``center-crop``: shorter side resized to 513, centre crop 513 (VainF's evaluation);
* ``ms-flip``: softmax averaged over scales 0.5-1.75 and horizontal flips, each
  pass's logits resized back to the image's size first (mmsegmentation's "ms+flip").

One image per forward pass by default (the reference). ``--batch-size B`` groups up to B
images of the same size (``same_size_batches``, never padded: padding changes what the
model sees): ~1.5x faster on a CPU, equal up to float rounding (docs/BENCHMARKS.md).

On N processes every image is counted exactly once: the validation loader gives each
rank disjoint samples, each rank fills its own confusion matrix with forward passes on
the bare model (a DDP wrapper syncs buffers on forward and hangs when one rank has run
out of batches), and the matrices are summed once after the loop.

What is identical on 1 and N processes: the confusion matrix (so every metric), bit for
bit, when every process computes with the same number of CPU threads (on GPUs the thread
count plays no part). On CPU, oneDNN splits some convolutions' sums across threads, so a
different count changes the last bits of logits and, rarely, a near-tied argmax (2 of 54
million VOC pixels). ``accelerate launch`` gives each process 1 thread while one process
alone uses every core: pass ``--threads 1`` to the single process (or the same
``--threads T`` to both runs) to compare them bit for bit. The count used is in the
result (``cpu_threads``).
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from segtrain.cli import OtherProcessFailed, rank_specific
from segtrain.datasets import IGNORE_INDEX
from segtrain.files import DataError
from segtrain.metrics import ConfusionMatrix
from segtrain.transforms import normalize

if TYPE_CHECKING:
    import PIL.Image
    from accelerate import Accelerator

PROTOCOLS = {  # --protocol here, --val-protocol in training (see the module docstring)
    "whole": "each image at its own size (standard VOC)",
    "center-crop": "shorter side to 513, centre crop 513 (VainF's)",
    "ms-flip": "softmax averaged over 6 scales and flips (mmsegmentation's)",
}
MS_SCALES = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)  # mmsegmentation's ratios for VOC / ADE20K
CROP_SIZE = 513


OnBatch = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, list], None]

__all__ = ["PROTOCOLS", "MS_SCALES", "OtherProcessFailed", "evaluate", "predict_logits", "ms_flip_logits",
           "same_size_batches", "check_protocol", "loader_protocol", "class_names_for", "predict_mask"]


def ms_flip_logits(model: nn.Module, images: torch.Tensor, scales: Sequence[float] = MS_SCALES,
                   flip: bool = True) -> torch.Tensor:
    """Multi-scale + flip test-time augmentation, as mmsegmentation's ``aug_test``.

    The batch is resized by each ratio (bilinear, sizes rounded half up as mmcv does)
    and, with ``flip``, also mirrored; each pass's logits are flipped back, resized to
    the input size and turned into probabilities, which are averaged. Returns the log
    of that average: valid logits (softmax gives the averaged probabilities back) whose
    argmax is the prediction. float32 (N, C, H, W).
    """
    height, width = images.shape[-2:]
    prob_sum: Optional[torch.Tensor] = None
    passes = 0
    for scale in scales:
        size = (max(1, int(height * scale + 0.5)), max(1, int(width * scale + 0.5)))
        scaled = images if size == (height, width) else F.interpolate(
            images, size=size, mode="bilinear", align_corners=False)
        # One forward for both orientations: the mirrored copies ride along in the batch.
        batch = torch.cat([scaled, scaled.flip(-1)]) if flip else scaled
        logits = model(batch)["out"]
        if flip:
            plain, mirrored = logits.chunk(2)
            logits = torch.cat([plain, mirrored.flip(-1)])
        logits = F.interpolate(logits.float(), size=(height, width), mode="bilinear", align_corners=False)
        probs = logits.softmax(dim=1)
        probs = probs.view(2, -1, *probs.shape[1:]).sum(0) if flip else probs
        prob_sum = probs if prob_sum is None else prob_sum + probs
        passes += 2 if flip else 1
    return (prob_sum / passes).log()


def same_size_batches(loader: Iterable, batch_size: int, max_held: Optional[int] = None) -> Iterator[tuple]:
    """Regroup a loader's single images into batches of up to ``batch_size`` images of the
    SAME size: never padded, so no pixel sees context it would not see alone.

    Images wait in per-size groups; a group leaves when full, or (largest first) when more
    than ``max_held`` images (default 4 x ``batch_size``) are waiting, and at the end.
    Order changes, counts do not: every image is yielded exactly once. Batched forward
    passes equal single ones up to float rounding (the convolution libraries pick other
    kernels for other batch shapes): see docs/BENCHMARKS.md#evaluation-speed.
    """
    max_held = max_held or 4 * batch_size
    groups: dict[tuple, list] = {}
    held = 0

    def emit(key) -> tuple:
        nonlocal held
        group = groups.pop(key)
        held -= len(group)
        return (torch.cat([g[0] for g in group]), torch.cat([g[1] for g in group]),
                [sid for g in group for sid in g[2]])

    for images, masks, ids in loader:
        if len(ids) != 1:
            raise ValueError("same_size_batches needs a loader of single images (batch_size=1)")
        key = tuple(images.shape[-2:])
        groups.setdefault(key, []).append((images, masks, ids))
        held += 1
        if len(groups[key]) == batch_size:
            yield emit(key)
        elif held > max_held:
            yield emit(max(groups, key=lambda k: len(groups[k])))
    while groups:
        yield emit(max(groups, key=lambda k: len(groups[k])))


def check_protocol(protocol: str) -> None:
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown evaluation protocol {protocol!r}; use one of {', '.join(PROTOCOLS)}")


def loader_protocol(protocol: str) -> str:
    """The ``val_loader``/``val_transforms`` protocol an evaluation protocol reads its images with.

    ms-flip resizes inside ``ms_flip_logits``, so its loader gives whole images.
    """
    check_protocol(protocol)
    return "whole" if protocol == "ms-flip" else protocol


def predict_logits(model: nn.Module, images: torch.Tensor, protocol: str = "whole") -> torch.Tensor:
    """(N, C, H, W) class logits for normalised (N, 3, H, W) images under ``protocol``.

    ``whole`` and ``center-crop`` are one forward pass (the crop is the loader's job);
    ``ms-flip`` is ``ms_flip_logits``. Call under ``torch.inference_mode()`` and any autocast.
    """
    if protocol == "ms-flip":
        return ms_flip_logits(model, images)
    check_protocol(protocol)
    return model(images)["out"]


def class_names_for(num_classes: int) -> tuple[str, ...]:
    """Placeholder names ``class_0, class_1, ...`` for a model evaluated without a dataset spec."""
    return tuple(f"class_{i}" for i in range(num_classes))


def evaluate(model: nn.Module, loader, device: Union[torch.device, str], num_classes: Optional[int] = None,
             protocol: str = "whole", autocast_dtype: Optional[torch.dtype] = None,
             accelerator: Optional["Accelerator"] = None, on_batch: Optional[OnBatch] = None,
             class_names: Optional[Sequence[str]] = None, threads: Optional[int] = None) -> dict[str, Any]:
    """Run ``model`` over ``loader`` and return the metrics of the whole split.

    ``loader`` yields ``(images, masks, ids)`` batches (``loaders.val_loader``; with
    ``accelerator``, built for this rank so ranks see disjoint samples). Pass the BARE
    model (``accelerator.unwrap_model(model)``), already on ``device``; it is put in
    eval mode and given back in the mode it came in. With ``accelerator``, the counts
    of all processes are summed once after the loop and every process gets the total.
    Build the loader with ``loader_protocol(protocol)``: center-crop is the loader's job.

    ``on_batch(images, masks, preds, ids)`` is called after each batch with the
    normalised images, the (N, H, W) int64 masks and predictions (on ``device``) and the
    sample ids: for progress bars or grabbing a few images to log.

    ``threads``: CPU threads (torch intra-op) for the forward passes, restored afterwards;
    None keeps the process's count. Equal counts make 1 and N processes bit-identical.
    ``num_classes`` defaults to the model's; ``class_names`` (for the per-class table)
    to ``class_0, class_1, ...``: pass the dataset spec's.

    Returns ``metrics.segmentation_metrics`` (miou, pixel_acc, mean_class_acc, fwiou,
    iou, class_acc, num_pixels, per_class) plus ``num_images``, ``cpu_threads`` and
    ``confusion_matrix`` (int64 CPU tensor, rows = ground truth).
    """
    check_protocol(protocol)
    device = torch.device(device)
    if num_classes is None:
        num_classes = model.model_config["num_classes"]
    threads_before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    cpu_threads = torch.get_num_threads()
    confusion = ConfusionMatrix(num_classes, IGNORE_INDEX, device=device)
    num_images = 0
    failure: Optional[BaseException] = None
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), torch.autocast(device.type, dtype=autocast_dtype,
                                                    enabled=autocast_dtype is not None):
            for images, masks, ids in loader:
                images = images.to(device, non_blocking=True)
                masks = masks.to(device, non_blocking=True)
                preds = predict_logits(model, images, protocol).argmax(dim=1)
                try:
                    confusion.update(preds, masks)
                except ValueError as e:  # data that did not say its classes (shard patterns) up front
                    raise DataError(f"sample(s) {', '.join(map(str, ids))}: {e}: the data has more classes "
                                    f"than the model's {num_classes}; fine-tune it on this data with "
                                    "--init-from") from None
                num_images += len(ids)
                if on_batch is not None:
                    on_batch(images, masks, preds, ids)
    except Exception as e:
        # Alone, fail now. With other processes, first tell them: a rank that stops
        # before the collective below would leave the others waiting in it forever.
        if accelerator is None or accelerator.num_processes == 1:
            raise
        failure = rank_specific(e, accelerator.process_index)
    finally:
        model.train(was_training)
        if threads is not None:
            torch.set_num_threads(threads_before)

    if accelerator is not None and accelerator.num_processes > 1:
        status = torch.tensor([num_images, failure is not None], dtype=torch.int64, device=accelerator.device)
        num_images, failed_ranks = accelerator.reduce(status, "sum").tolist()
        if failure is not None:
            raise failure
        if failed_ranks:
            raise OtherProcessFailed(f"evaluation failed on {failed_ranks} other process(es); see their error")
        confusion.reduce(accelerator)

    if class_names is None:
        class_names = class_names_for(num_classes)
    metrics = confusion.compute(class_names)
    metrics["num_images"] = int(num_images)
    metrics["cpu_threads"] = cpu_threads
    metrics["confusion_matrix"] = confusion.mat.cpu()
    return metrics


def predict_mask(model: nn.Module, image: "PIL.Image.Image", device: torch.device,
                 protocol: str = "whole", autocast_dtype: Optional[torch.dtype] = None) -> np.ndarray:
    """(H, W) uint8 class indices for one image (``model`` in eval mode, on ``device``;
    ``autocast_dtype`` from ``autotune.inference_autocast``, None = fp32)."""
    # The model's own normalisation (from its checkpoint), as in training and evaluation.
    mean, std = getattr(model, "mean", None), getattr(model, "std", None)
    from torchvision.transforms.v2 import functional as TF  # here: importing the protocols needs no torchvision

    pixels = TF.pil_to_tensor(image.convert("RGB"))
    batch = (normalize(pixels, mean, std) if mean is not None else normalize(pixels)).unsqueeze(0).to(device)
    with torch.inference_mode(), torch.autocast(device.type, dtype=autocast_dtype,
                                                enabled=autocast_dtype is not None):
        return predict_logits(model, batch, protocol)[0].argmax(dim=0).to(torch.uint8).cpu().numpy()
