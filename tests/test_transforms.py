"""segtrain.transforms: joint geometry, mask values, dtypes, normalisation."""
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from segtrain.transforms import (IMAGENET_MEAN, IMAGENET_STD, RandomScaleCrop, denormalize, normalize,
                                 train_transforms, val_transforms)

# Grey level per class: the image is painted from the mask, so image and mask can be
# checked for alignment after any geometric transform.
SHADE = {0: 20, 3: 120, 15: 220}


def painted_pair(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Background with a class-3 block top left and a class-15 block bottom right."""
    mask = np.zeros((height, width), np.uint8)
    mask[height // 8: height // 2, width // 8: width // 2] = 3
    mask[height // 2:, width // 2:] = 15
    image = np.zeros((height, width, 3), np.uint8)
    for cls, shade in SHADE.items():
        image[mask == cls] = shade
    return image, mask


def interior(region: torch.Tensor, margin: int = 2) -> torch.Tensor:
    """Pixels of ``region`` whose neighbours ``margin`` px away are in it too."""
    padded = torch.nn.functional.pad(region[None].float(), (margin,) * 4, value=0)
    # A min-pool over the (2 margin + 1)^2 window, written as -max(-x).
    return -torch.nn.functional.max_pool2d(-padded, 2 * margin + 1, stride=1)[0] > 0.5


def to_chw(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(image).permute(2, 0, 1).contiguous()


@pytest.mark.parametrize("size", [(40, 50), (90, 120)])  # smaller than the crop (padding) and larger
def test_train_masks_keep_their_values_and_stay_aligned(size):
    image, mask = painted_pair(*size)
    transform = train_transforms(65, color_jitter=False)
    saw_padding = False
    for seed in range(25):
        torch.manual_seed(seed)
        out_image, out_mask = transform(to_chw(image), mask)
        assert out_image.shape == (3, 65, 65) and out_image.dtype == torch.float32
        assert out_mask.shape == (65, 65) and out_mask.dtype == torch.int64
        values = set(torch.unique(out_mask).tolist())
        assert values <= set(np.unique(mask).tolist()) | {255}, values
        saw_padding |= 255 in values
        # Alignment: where the mask says class c, the image shows c's grey (away from
        # the bilinear-blurred edges); padded pixels are image 0.
        grey = torch.from_numpy(denormalize(out_image)[..., 0].astype(np.int64))
        for cls, shade in SHADE.items():
            inside = interior(out_mask == cls)
            if inside.any():
                assert (grey[inside] - shade).abs().le(3).all(), (seed, cls)
        assert (grey[interior(out_mask == 255)] == 0).all()
    assert saw_padding or size[0] >= 65  # small inputs must get padded at least once


def test_train_accepts_pil_tensor_and_numpy_alike():
    image, mask = painted_pair(70, 80)
    transform = train_transforms(33, color_jitter=True)
    torch.manual_seed(3)
    a = transform(Image.fromarray(image), mask)
    torch.manual_seed(3)
    b = transform(to_chw(image), torch.from_numpy(mask))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_rejects_float_tensor_images():
    with pytest.raises(TypeError, match="uint8"):
        train_transforms(33)(torch.zeros(3, 40, 40), np.zeros((40, 40), np.uint8))


def test_normalize_false_keeps_uint8_and_normalize_matches_imagenet():
    image, mask = painted_pair(50, 60)
    raw_image, raw_mask = val_transforms("whole", normalize=False)(to_chw(image), mask)
    assert raw_image.dtype == torch.uint8 and raw_mask.dtype == torch.uint8
    assert torch.equal(raw_image, to_chw(image)) and torch.equal(raw_mask, torch.from_numpy(mask))
    expected = (to_chw(image).float() / 255 - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) \
        / torch.tensor(IMAGENET_STD).view(3, 1, 1)
    assert torch.allclose(normalize(raw_image), expected, atol=1e-5)
    assert torch.allclose(normalize(raw_image[None])[0], expected, atol=1e-5)  # batches too


def test_val_whole_keeps_the_image_and_denormalize_inverts():
    image, mask = painted_pair(57, 91)
    out_image, out_mask = val_transforms("whole")(Image.fromarray(image), mask)
    assert out_image.shape == (3, 57, 91) and out_mask.dtype == torch.int64
    assert np.array_equal(out_mask.numpy(), mask)
    assert np.array_equal(denormalize(out_image), image)


def test_val_center_crop_resizes_shorter_side_then_crops():
    image, mask = painted_pair(60, 100)
    out_image, out_mask = val_transforms("center-crop", crop_size=33)(to_chw(image), mask)
    assert out_image.shape == (3, 33, 33) and out_mask.shape == (33, 33)
    assert set(torch.unique(out_mask).tolist()) <= set(np.unique(mask).tolist())
    with pytest.raises(ValueError, match="protocol"):
        val_transforms("sliding")


# --------------------------------------------------------------------------- fused scale + crop

class RandomScale(v2.Transform):
    """The unfused reference: resize the whole input by a factor of its own size."""

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = F.get_size(flat_inputs[0])
        scale = 0.5 + float(torch.rand(())) * 1.5
        return {"size": [max(1, round(height * scale)), max(1, round(width * scale))]}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return F.resize(inpt, size=params["size"], antialias=True)


def scale_then_crop(crop: int) -> v2.Compose:
    return v2.Compose([RandomScale(), v2.RandomCrop(crop, pad_if_needed=True,
                                                    fill={tv_tensors.Image: 0, tv_tensors.Mask: 255})])


def wrapped(image: np.ndarray, mask: np.ndarray) -> tuple[tv_tensors.Image, tv_tensors.Mask]:
    return tv_tensors.Image(to_chw(image)), tv_tensors.Mask(torch.from_numpy(mask))


def test_fused_scale_crop_pads_like_random_crop_exactly():
    # Scaled by at most 2, a 20x30 image stays smaller than the crop: the whole image is
    # resized and lands at RandomCrop's random offset; image padded with 0, mask with 255.
    image, mask = wrapped(*painted_pair(20, 30))
    offsets = set()
    for seed in range(12):
        torch.manual_seed(seed)
        expected = scale_then_crop(65)(image, mask)
        torch.manual_seed(seed)
        got = RandomScaleCrop(65)(image, mask)
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1]), seed
        rows, cols = torch.nonzero(got[1] != 255, as_tuple=True)
        offsets.add((rows.min().item(), cols.min().item()))
        assert (got[0][:, got[1] == 255] == 0).all()
    assert len(offsets) > 6  # placed at random, not always in the corner


def test_fused_scale_crop_is_exact_where_the_crop_starts_on_a_source_pixel():
    # Scale exactly 2, even crop and offsets: the fused crop reads whole source pixels,
    # so masks match scale-then-crop exactly and images inside a 1 px frame (at the frame,
    # bilinear interpolation sees the region's edge instead of the pixel beyond it).
    rng = np.random.default_rng(0)
    image = tv_tensors.Image(torch.from_numpy(rng.integers(0, 256, (3, 70, 90), dtype=np.uint8)))
    mask = tv_tensors.Mask(torch.from_numpy(rng.integers(0, 21, (70, 90), dtype=np.uint8)))
    fused = RandomScaleCrop(64)
    for top, left in [(0, 0), (10, 40), (76, 116)]:  # (76, 116): the bottom right corner
        params = fused.window((70, 90), [140, 180], [top, left])
        assert params["height"] == params["width"] == 32  # a quarter of the resize work
        expected_mask = F.crop(F.resize(mask, [140, 180]), top, left, 64, 64)
        expected_image = F.crop(F.resize(image, [140, 180], antialias=True), top, left, 64, 64)
        assert torch.equal(fused.transform(mask, params), expected_mask)
        assert torch.equal(fused.transform(image, params)[:, 1:-1, 1:-1], expected_image[:, 1:-1, 1:-1])


def test_fused_scale_crop_matches_scale_then_crop_up_to_a_subpixel_shift():
    # Same seed, same draws: the same crop of the same scaled image, except that the
    # fused crop starts and ends on whole source pixels (a shift of at most half a source
    # pixel, i.e. 1 output pixel at scale 2).
    image, mask = wrapped(*painted_pair(90, 120))
    compared = 0
    for seed in range(30):
        torch.manual_seed(seed)
        expected_image, expected_mask = scale_then_crop(65)(image, mask)
        torch.manual_seed(seed)
        got_image, got_mask = RandomScaleCrop(65)(image, mask)
        assert torch.equal(got_mask == 255, expected_mask == 255), seed  # same padding, same place
        for cls in torch.unique(got_mask).tolist():
            # Every fused label is found in the reference within 2 px (only edges move)...
            near = torch.nn.functional.max_pool2d((expected_mask == cls)[None].float(), 5, 1, 2)[0] > 0
            assert near[got_mask == cls].all(), (seed, cls)
            # ... and away from edges the image is the same.
            inside = interior(expected_mask == cls)
            assert (got_image[:, inside].int() - expected_image[:, inside].int()).abs().le(1).all(), (seed, cls)
            compared += int(inside.sum())
    assert compared > 30 * 65 * 65 // 2  # most of every crop was compared
