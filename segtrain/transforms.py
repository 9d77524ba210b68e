"""Joint image + mask transforms for training and evaluation (torchvision.transforms.v2).

The image is wrapped as ``tv_tensors.Image`` and the label as ``tv_tensors.Mask`` so
that every geometric op treats them together and masks are always resized with
NEAREST (a mask never gains a value it did not have; padding adds 255 = ignore).

Work stays in uint8 until the crop is done, and the float conversion + ImageNet
normalisation run last on the (small) crop: that order is the cheap one. Loaders
build the transforms with ``normalize=False`` so worker processes ship uint8 (4x less
to copy) and ``normalize`` runs on whole batches: on the device for training batches,
in the main process for evaluation batches.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Callable, Union

import numpy as np
import PIL.Image
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from .datasets import IGNORE_INDEX

# The default normalisation (torchvision's and most timm ImageNet weights'); a model's own
# comes from its backbone's timm pretrained_cfg and is stored in its checkpoint
# (``DeepLab.mean`` / ``DeepLab.std``).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

ImageInput = Union[PIL.Image.Image, torch.Tensor]
MaskInput = Union[np.ndarray, torch.Tensor]
PairTransform = Callable[[ImageInput, MaskInput], tuple[torch.Tensor, torch.Tensor]]


def _scaled_window(length: int, scaled: int, crop: int, offset: int) -> tuple[int, int, int, int]:
    """One axis of a scale-then-crop, in source pixels: (start, stop, resized length, pad before).

    ``offset`` is RandomCrop's draw along this axis: where the crop starts in the scaled
    image (or, when the scaled image is shorter than the crop, in the image padded by
    ``crop - scaled`` on both sides, so it lands ``crop - scaled - offset`` from the start).
    """
    if scaled <= crop:  # the whole axis is resized and padded
        return 0, length, scaled, crop - scaled - offset
    # Crop [offset, offset + crop) of the scaled axis is source [offset, offset + crop) / factor,
    # rounded to whole source pixels (a shift of at most half a source pixel).
    factor = scaled / length
    start = min(round(offset / factor), length - 1)
    stop = min(max(round((offset + crop) / factor), start + 1), length)
    return start, stop, crop, 0


class RandomScaleCrop(v2.Transform):
    """DeepLab's random scale then random crop, with one resize of only the pixels kept.

    The draws are those of resizing by a factor uniform in ``scale_range`` of the input's
    own size (v2.RandomResize and v2.ScaleJitter scale to absolute sizes) followed by
    ``v2.RandomCrop(size, pad_if_needed=True)``, made with the same calls to torch's RNG.
    Instead of resizing the whole image and throwing most of it away, only the source
    region that lands in the crop is resized (``F.resized_crop``; for a VOC image at
    scale 2, a third of the pixels). A scaled image smaller than the crop is padded
    (``F.pad``) with 0 for the image and 255 (ignore) for the mask, at the random offset
    RandomCrop's ``pad_if_needed`` would give it.

    The image is resized bilinear with antialiasing, the mask with NEAREST (F.resized_crop
    dispatches on the tv_tensor type). The crop's start and end are rounded to whole
    source pixels, so outputs match scale-then-crop up to a sub-pixel shift.
    """

    def __init__(self, size: int, scale_range: tuple[float, float] = (0.5, 2.0)):
        super().__init__()
        self.size, self.scale_range = size, scale_range

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        image = next(x for x in flat_inputs if isinstance(x, tv_tensors.Image))
        height, width = F.get_size(image)
        lo, hi = self.scale_range
        scale = lo + float(torch.rand(())) * (hi - lo)
        scaled = [max(1, round(height * scale)), max(1, round(width * scale))]
        # v2.RandomCrop's draws, in its order: an offset along an axis only where the
        # (padded) scaled image is longer than the crop.
        offsets = [int(torch.randint(0, abs(n - self.size) + 1, ())) if n != self.size else 0
                   for n in scaled]
        return self.window((height, width), scaled, offsets)

    def window(self, source: tuple[int, int], scaled: list[int], offsets: list[int]) -> dict[str, Any]:
        """resized_crop + pad arguments for a drawn scaled size and crop offsets (per axis: H, W)."""
        (top, bottom, out_h, pad_top), (left, right, out_w, pad_left) = (
            _scaled_window(n, s, self.size, o) for n, s, o in zip(source, scaled, offsets))
        return {"top": top, "left": left, "height": bottom - top, "width": right - left,
                "size": [out_h, out_w],
                "padding": [pad_left, pad_top, self.size - out_w - pad_left, self.size - out_h - pad_top]}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        box = {k: params[k] for k in ("top", "left", "height", "width", "size")}
        inpt = F.resized_crop(inpt, **box, interpolation=v2.InterpolationMode.BILINEAR, antialias=True)
        if any(params["padding"]):
            fill = IGNORE_INDEX if isinstance(inpt, tv_tensors.Mask) else 0
            inpt = F.pad(inpt, padding=params["padding"], fill=fill)
        return inpt


def normalize(images: torch.Tensor, mean: Union[Sequence[float], torch.Tensor] = IMAGENET_MEAN,
              std: Union[Sequence[float], torch.Tensor] = IMAGENET_STD) -> torch.Tensor:
    """uint8 (..., 3, H, W) image or batch -> float32, scaled to [0, 1], normalised with
    ``mean``/``std`` (pass the model's: ``model.mean``, ``model.std``).

    Lists are turned into tensors on the images' device at every call: on a GPU that is a
    host-to-device copy the step waits for. Per-batch callers on a GPU pass the tensors of
    ``normalization_tensors`` instead, made once.
    """
    if not isinstance(mean, torch.Tensor):
        mean, std = list(mean), list(std)
    # to_dtype makes a fresh float tensor, so normalising it in place is safe and
    # saves one full-size allocation.
    return F.normalize(F.to_dtype(images, torch.float32, scale=True), mean, std, inplace=True)


def normalization_tensors(mean: Sequence[float], std: Sequence[float],
                          device: Union[torch.device, str]) -> tuple[torch.Tensor, torch.Tensor]:
    """``mean``/``std`` as float32 (3,) tensors on ``device``, for ``normalize`` in a loop:
    copied to the device once instead of once per batch."""
    return (torch.tensor(mean, dtype=torch.float32, device=device),
            torch.tensor(std, dtype=torch.float32, device=device))


class PairTransformer:
    """Apply a v2 pipeline to one (image, mask) pair.

    Accepts a PIL image or a uint8 (3, H, W) tensor and an (H, W) numpy/tensor mask.
    Returns a float32 normalised (3, H, W) image and an int64 (H, W) mask as plain
    tensors; with ``normalize=False`` both stay uint8, for loaders that normalise
    whole batches in the main process (4x less data between processes).
    """

    def __init__(self, pipeline: v2.Transform, normalize: bool = True):
        self.pipeline, self.normalize = pipeline, normalize

    def __call__(self, image: ImageInput, mask: MaskInput) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(image, PIL.Image.Image):
            image = F.pil_to_tensor(image.convert("RGB"))
        elif image.dtype != torch.uint8:
            raise TypeError(f"expected a uint8 image tensor, got {image.dtype}")
        if isinstance(mask, np.ndarray):
            mask = torch.from_numpy(np.ascontiguousarray(mask))
        image, mask = self.pipeline(tv_tensors.Image(image), tv_tensors.Mask(mask))
        image, mask = image.as_subclass(torch.Tensor), mask.as_subclass(torch.Tensor)
        if not self.normalize:
            return image, mask
        return normalize(image), mask.long()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.pipeline}, normalize={self.normalize})"


def train_transforms(crop_size: int, scale: tuple[float, float] = (0.5, 2.0), hflip: float = 0.5,
                     color_jitter: bool = False, normalize: bool = True) -> PairTransform:
    """DeepLab training augmentation: random scale, random crop (padded), flip, [jitter], normalise."""
    steps: list[v2.Transform] = [
        # Images smaller than the crop are padded: image with 0, mask with 255 so the
        # padding is ignored by the loss.
        RandomScaleCrop(crop_size, scale),
        v2.RandomHorizontalFlip(hflip),
    ]
    if color_jitter:
        steps.append(v2.ColorJitter(brightness=0.5, contrast=0.5, saturation=0.5))
    return PairTransformer(v2.Compose(steps), normalize)


def val_transforms(protocol: str = "whole", crop_size: int = 513, normalize: bool = True) -> PairTransform:
    """Evaluation transforms.

    ``"whole"``: the whole image at its own size, normalised (the standard VOC protocol).
    ``"center-crop"``: shorter side resized to ``crop_size``, then a centre crop of
    ``crop_size`` (VainF/DeepLabV3Plus-Pytorch's evaluation).
    """
    if protocol == "whole":
        steps: list[v2.Transform] = [v2.Identity()]  # v2.Compose refuses an empty list
    elif protocol == "center-crop":
        steps = [v2.Resize(crop_size, antialias=True), v2.CenterCrop(crop_size)]
    else:
        raise ValueError(f"unknown evaluation protocol {protocol!r}; use 'whole' or 'center-crop'")
    return PairTransformer(v2.Compose(steps), normalize)


def denormalize(image: torch.Tensor, mean: Sequence[float] = IMAGENET_MEAN,
                std: Sequence[float] = IMAGENET_STD) -> np.ndarray:
    """Normalised float (3, H, W) image -> uint8 (H, W, 3) numpy array for figures."""
    mean = torch.tensor(mean).view(3, 1, 1)
    std = torch.tensor(std).view(3, 1, 1)
    rgb = (image.detach().cpu().float() * std + mean).clamp(0, 1)
    return (rgb * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
