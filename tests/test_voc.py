"""voc.py and the VOC folder (datasets.VOCSegmentation, decoded by datasets.load_pair with the VOC spec):
palette, encode/decode, exact label indices, split lists, clear errors."""
import io

import numpy as np
import pytest
from PIL import Image

from segtrain import voc
from segtrain.datasets import VOC, VOCSegmentation, decode_label, load_pair
from segtrain.synthetic import generate


def test_colormap_known_entries():
    cmap = voc.voc_colormap()
    assert cmap.shape == (256, 3) and cmap.dtype == np.uint8
    assert tuple(cmap[0]) == (0, 0, 0)
    assert tuple(cmap[1]) == (128, 0, 0)      # aeroplane
    assert tuple(cmap[15]) == (192, 128, 128)  # person
    assert tuple(cmap[20]) == (0, 64, 128)     # tvmonitor
    assert tuple(cmap[255]) == (224, 224, 192)  # void / boundary
    assert len({tuple(c) for c in cmap}) == 256


def test_decode_encode_round_trip():
    values = np.array(sorted(voc.VALID_LABEL_VALUES), np.uint8)
    label = np.resize(values, (7, 11))
    rgb = voc.decode_target(label)
    assert rgb.shape == (7, 11, 3)
    np.testing.assert_array_equal(voc.encode_target(rgb), label)


def test_encode_rejects_unknown_colour():
    rgb = np.zeros((2, 2, 3), np.uint8)
    rgb[0, 0] = (1, 2, 3)
    with pytest.raises(ValueError, match="not in the VOC palette"):
        voc.encode_target(rgb)


def _write_pair(root, sid, image, label, mode="P"):
    (root / "JPEGImages").mkdir(parents=True, exist_ok=True)
    (root / "SegmentationClass").mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(root / "JPEGImages" / f"{sid}.jpg", quality=95)
    if mode == "P":
        voc.save_label_png(label, root / "SegmentationClass" / f"{sid}.png")
    else:
        Image.fromarray(label).convert(mode).save(root / "SegmentationClass" / f"{sid}.png")


def test_dataset_returns_exact_indices_including_255(tmp_path):
    root = tmp_path / "VOC2012"
    label = np.zeros((20, 30), np.uint8)
    label[2:8, 3:9] = 15
    label[10:15, 20:28] = 20
    label[8, :] = 255
    label[0, 0] = 7
    _write_pair(root, "2007_000001", np.full((20, 30, 3), 90, np.uint8), label)
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    (root / "ImageSets" / "Segmentation" / "train.txt").write_text("2007_000001\n")
    ds = VOCSegmentation(root, "train")
    image, mask = ds[0]
    assert image.size == (30, 20) and image.mode == "RGB"
    assert mask.dtype == np.uint8
    np.testing.assert_array_equal(mask, label)
    # The file really is a palette PNG with VOC colours, as VOC's SegmentationClass.
    png = Image.open(root / "SegmentationClass" / "2007_000001.png")
    assert png.mode == "P" and png.getpalette()[15 * 3:15 * 3 + 3] == [192, 128, 128]


def test_missing_split_list_names_the_file(tmp_path):
    root = tmp_path / "VOC2012"
    (root / "JPEGImages").mkdir(parents=True)
    with pytest.raises(voc.DataError, match=r"ImageSets/Segmentation/val\.txt: missing split list"):
        VOCSegmentation(root, "val")


def test_not_a_voc_root(tmp_path):
    with pytest.raises(voc.DataError, match="not a VOC root"):
        VOCSegmentation(tmp_path, "train")


@pytest.mark.parametrize("problem, match", [
    ("corrupt_jpeg", "corrupt or unreadable image"),
    ("truncated_jpeg", "corrupt or unreadable image"),
    ("rgb_label", "not an index image"),
    ("bad_value", r"label values \[33\] outside 0..20 and 255"),
    ("size_mismatch", "image is 30x20 but label is 31x20"),
])
def test_load_pair_errors_name_sample_and_problem(problem, match):
    image = np.full((20, 30, 3), 100, np.uint8)
    label = np.zeros((20, 30), np.uint8)
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG")
    jpg = buf.getvalue()
    png = voc.label_to_png_bytes(label)
    if problem == "corrupt_jpeg":
        jpg = b"not a jpeg at all"
    elif problem == "truncated_jpeg":
        jpg = jpg[: len(jpg) // 2]
    elif problem == "rgb_label":
        b = io.BytesIO()
        Image.fromarray(voc.decode_target(label)).save(b, format="PNG")
        png = b.getvalue()
    elif problem == "bad_value":
        label[3, 3] = 33
        png = voc.label_to_png_bytes(label)
    elif problem == "size_mismatch":
        png = voc.label_to_png_bytes(np.zeros((20, 31), np.uint8))
    with pytest.raises(voc.DataError, match=match) as info:
        load_pair(jpg, png, "2008_000123", VOC)
    assert "2008_000123" in str(info.value)


def test_grayscale_sbd_style_labels_are_accepted():
    label = np.array([[0, 15], [255, 20]], np.uint8)
    b = io.BytesIO()
    Image.fromarray(label, mode="L").save(b, format="PNG")
    np.testing.assert_array_equal(decode_label(b.getvalue(), "x", VOC), label)


def test_synthetic_tree_layout_classes_and_determinism(tmp_path):
    root = generate(tmp_path / "a", num_train=30, num_val=8, seed=3, min_size=64, max_size=120)
    assert root == tmp_path / "a" / "VOCdevkit" / "VOC2012"
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        assert (root / sub).is_dir()
    train = VOCSegmentation(root, "train")
    val = VOCSegmentation(root, "val")
    assert len(train) == 30 and len(val) == 8 and not set(train.ids) & set(val.ids)
    present, pixels = set(), np.zeros(256, np.int64)
    for i in range(len(train)):
        image, label = train[i]
        assert 64 <= image.size[0] <= 120 and 64 <= image.size[1] <= 120
        present |= set(np.unique(label).tolist())
        pixels += np.bincount(label.ravel(), minlength=256)
    assert set(range(21)) | {255} == present  # every class and VOC's void band
    assert pixels[0] > pixels[1:21].sum()     # background dominates
    assert Image.open(root / "SegmentationClass" / f"{train.ids[0]}.png").mode == "P"
    again = generate(tmp_path / "b", num_train=30, num_val=8, seed=3, min_size=64, max_size=120)
    for sid in train.ids[:5]:
        for sub, ext in (("JPEGImages", "jpg"), ("SegmentationClass", "png")):
            assert (root / sub / f"{sid}.{ext}").read_bytes() == (again / sub / f"{sid}.{ext}").read_bytes()
