"""segtrain.transforms: joint geometry, mask values, dtypes, normalisation."""
import numpy as np
import pytest
import torch
from PIL import Image

from segtrain.transforms import (IMAGENET_MEAN, IMAGENET_STD, denormalize, normalize, train_transforms,
                                 val_transforms)

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
