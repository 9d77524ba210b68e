"""Segment Anything next to the semantic models: loading, drawing, class assignment, the CLI.

Only ``test_cli_end_to_end`` runs SAM itself (a random vit_b: its image encoder always
works at 1024x1024, ~10-20 s and ~3.6 GB on a CPU); everything else uses hand-made
masks and a stub predictor.
"""
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from segment_anything import sam_model_registry
from segment_anything.modeling import ImageEncoderViT

from segtrain import sam as sam_module
from segtrain.checkpoints import CheckpointError, save_checkpoint
from segtrain.model import build_model
from segtrain.visualize import covering_ids
from segtrain.sam import (METHODS, assign_majority, box_prompts, draw_sam_masks, load_sam,
                          main, mask_outline, refine_with_boxes, report_columns)
from segtrain.loaders import iter_samples
from segtrain.sources import resolve_data
from segtrain.voc import decode_target

OFFICIAL_URL = "https://github.com/facebookresearch/segment-anything#model-checkpoints"


def one_class_checkpoint(path, class_id):
    """A tiny segtrain checkpoint whose model predicts ``class_id`` at every pixel."""
    model = build_model("deeplabv3plus", "resnet18", num_classes=21)
    final = model.head.classifier[-1]
    with torch.no_grad():
        final.weight.zero_()
        final.bias.fill_(-1.0)
        final.bias[class_id] = 1.0
    save_checkpoint(path, model)
    return path


@pytest.fixture(scope="module")
def random_vit_b(tmp_path_factory):
    """A randomly initialised SAM vit_b state dict on disk (358 MB), shared by this module."""
    path = tmp_path_factory.mktemp("sam") / "sam_vit_b_random.pth"
    torch.manual_seed(0)
    torch.save(sam_model_registry["vit_b"]().state_dict(), path)
    return path


# --------------------------------------------------------------------------- class assignment

def test_assign_majority_smaller_masks_on_top_uncovered_pixels_keep_semantic():
    semantic = np.array([
        [1, 1, 1, 0, 0, 0],
        [1, 2, 2, 0, 0, 0],
        [1, 2, 2, 0, 3, 3],
        [0, 0, 0, 0, 3, 3],
    ], dtype=np.uint8)
    big = np.zeros(semantic.shape, bool)
    big[:3, :3] = True        # 5 x class 1, 4 x class 2 -> 1
    small = np.zeros(semantic.shape, bool)
    small[1:3, 1:3] = True    # all class 2 -> 2, painted over the big mask
    mixed = np.zeros(semantic.shape, bool)
    mixed[2:4, 3:6] = True    # 4 x class 3, 2 x class 0 -> 3
    empty = np.zeros(semantic.shape, bool)
    expected = np.array([
        [1, 1, 1, 0, 0, 0],
        [1, 2, 2, 0, 0, 0],
        [1, 2, 2, 3, 3, 3],
        [0, 0, 0, 3, 3, 3],
    ], dtype=np.uint8)
    # The order of the list must not matter: the smaller mask is on top either way.
    for masks in ([small, big, mixed, empty], [big, empty, mixed, small]):
        refined = assign_majority(masks, semantic)
        np.testing.assert_array_equal(refined, expected)
    np.testing.assert_array_equal(assign_majority([], semantic), semantic)
    # Votes come from the semantic map, not from earlier paint: a mask whose pixels were
    # repainted by a larger mask still votes with the original classes.
    wide = np.zeros(semantic.shape, bool)
    wide[1:3, :3] = True      # 2 x class 1, 4 x class 2 -> 2, repaints [1:3, 0]
    left = np.zeros(semantic.shape, bool)
    left[:3, 0] = True        # class 1 in the semantic map
    refined = assign_majority([wide, left], semantic)
    assert refined[1:3, 0].tolist() == [1, 1] and refined[1:3, 1:3].tolist() == [[2, 2], [2, 2]]


def test_box_prompts_exact_boxes_classes_and_order():
    semantic = np.zeros((8, 10), dtype=np.uint8)
    semantic[1:3, 1:4] = 3   # class 3, blob A: 6 px, box (1, 1, 3, 2)
    semantic[3, 4] = 3       # touches A only diagonally: same 8-connected blob (7 px)
    semantic[5:7, 7:9] = 3   # class 3, blob B: 4 px, box (7, 5, 8, 6)
    semantic[4:7, 0:3] = 5   # class 5: 9 px, box (0, 4, 2, 6)
    semantic[0, 9] = 7       # class 7: a 1-px speck
    assert box_prompts(semantic, min_area=1) == [
        (5, (0, 4, 2, 6)), (3, (1, 1, 4, 3)), (3, (7, 5, 8, 6)), (7, (9, 0, 9, 0))]
    assert box_prompts(semantic, min_area=5) == [(5, (0, 4, 2, 6)), (3, (1, 1, 4, 3))]
    assert box_prompts(np.zeros((4, 4), np.uint8)) == []
    # Another background index: class 0 becomes an object and class 5 the background.
    assert (0, (0, 0, 9, 7)) in box_prompts(semantic, min_area=1, background=5)


class StubPredictor:
    """SamPredictor's interface with hand-made answers: the mask for each box prompt."""

    def __init__(self, masks_by_box):
        self.masks_by_box = masks_by_box
        self.images, self.boxes = [], []

    def set_image(self, image):
        self.images.append(image)

    def predict(self, box, multimask_output):
        assert multimask_output is False
        self.boxes.append(tuple(int(v) for v in box))
        mask = self.masks_by_box[self.boxes[-1]]
        return mask[None], np.array([0.9]), np.zeros((1, 256, 256))


def test_refine_with_boxes_paints_sam_masks_with_blob_classes():
    semantic = np.zeros((6, 8), dtype=np.uint8)
    semantic[0:4, 0:4] = 15   # person blob, box (0, 0, 3, 3)
    semantic[1:3, 5:7] = 8    # cat blob, box (5, 1, 6, 2): SAM returns nothing -> keeps its pixels
    semantic[5, 7] = 12       # 1-px dog: below min_area, not prompted, kept
    person = np.zeros(semantic.shape, bool)
    person[0:5, 1:6] = True   # SAM's person mask: tighter on the left, larger elsewhere
    stub = StubPredictor({(0, 0, 3, 3): person, (5, 1, 6, 2): np.zeros(semantic.shape, bool)})
    image = np.full((6, 8, 3), 7, np.uint8)

    refined = refine_with_boxes(stub, image, semantic, min_area=2)

    expected = np.zeros(semantic.shape, np.uint8)
    expected[0:5, 1:6] = 15   # SAM's mask, not the blob: column 0 is background now
    expected[1:3, 5:7] = 8    # the smaller cat blob is painted over the person mask
    expected[5, 7] = 12
    np.testing.assert_array_equal(refined, expected)
    assert stub.boxes == [(0, 0, 3, 3), (5, 1, 6, 2)]  # largest blob first; the speck is not prompted
    assert len(stub.images) == 1 and stub.images[0] is image


# --------------------------------------------------------------------------- drawing and image choice

def test_draw_sam_masks_small_masks_on_top_with_outlines():
    image = np.full((12, 12, 3), 100, np.uint8)
    big = np.zeros((12, 12), bool)
    big[1:11, 1:11] = True
    small = np.zeros((12, 12), bool)
    small[4:8, 4:8] = True
    drawn = draw_sam_masks(image, [small, big])
    assert np.array_equal(drawn, draw_sam_masks(image, [big, small]))  # colours follow area, not list order
    big_colour, small_colour = drawn[1, 1], drawn[4, 4]               # outline pixels: the pure colours
    assert not np.array_equal(big_colour, small_colour)
    blend = lambda colour: np.round(0.5 * 100 + 0.5 * colour.astype(float)).astype(np.uint8)  # noqa: E731
    np.testing.assert_array_equal(drawn[2, 2], blend(big_colour))    # big fill
    np.testing.assert_array_equal(drawn[5, 5], blend(small_colour))  # small fill, on top of big
    np.testing.assert_array_equal(drawn[0, 0], image[0, 0])         # outside every mask
    assert mask_outline(small).sum() == 12 and not mask_outline(small)[5, 5]
    np.testing.assert_array_equal(draw_sam_masks(image, []), image)


class StubGenerator:
    """SamAutomaticMaskGenerator's interface: hand-made mask records and a predictor."""

    def __init__(self, masks, predictor):
        self.masks, self.predictor = masks, predictor

    def generate(self, image):
        return [{"segmentation": m, "area": int(m.sum())} for m in self.masks]


def test_report_columns_titles_and_maps(tmp_path, monkeypatch):
    image = np.random.default_rng(0).integers(0, 256, (32, 40, 3), dtype=np.uint8)
    left = np.zeros((32, 40), bool)
    left[:, :20] = True
    top = np.zeros((32, 40), bool)
    top[:16] = True
    stub = StubPredictor({(0, 0, 39, 31): top})  # the one blob is the whole image
    monkeypatch.setattr(sam_module, "load_sam", lambda checkpoint, model_type, device: SimpleNamespace(device=torch.device(device)))
    monkeypatch.setattr(sam_module, "mask_generator", lambda sam, points_per_side: StubGenerator([left], stub))
    cat = 8

    columns = report_columns("sam.pth", "vit_b", [image], semantic=one_class_checkpoint(tmp_path / "best.pt", cat),
                             progress=False)

    assert columns["titles"] == ["SAM masks", METHODS["sam_majority"], METHODS["sam_boxes"]]
    [[masks, majority, boxes]] = columns["images"]
    np.testing.assert_array_equal(masks, draw_sam_masks(image, [left]))
    np.testing.assert_array_equal(majority, decode_target(np.full((32, 40), cat, np.uint8)))
    np.testing.assert_array_equal(boxes, decode_target(np.where(top, cat, 0).astype(np.uint8)))
    assert report_columns("sam.pth", "vit_b", [image], progress=False)["titles"] == ["SAM masks"]


# --------------------------------------------------------------------------- checkpoints and the CLI

def cli(tmp_path, checkpoint, model_type="vit_b", *extra):
    """main's exit status (user errors exit through cli.user_errors)."""
    try:
        return main(["--sam-checkpoint", str(checkpoint), "--model-type", model_type,
                     "--data", str(tmp_path / "unused.json"), "--ids", "x", "--device", "cpu",
                     "--out", str(tmp_path / "out"), *extra])
    except SystemExit as e:
        return e.code


def test_missing_checkpoint_is_one_line_error_naming_official_checkpoints(tmp_path, capsys):
    assert cli(tmp_path, tmp_path / "sam_vit_b_01ec64.pth") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no such SAM checkpoint file" in err
    assert OFFICIAL_URL in err and "sam_vit_b_01ec64.pth for --model-type vit_b" in err
    assert "https://dl.fbaipublicfiles.com/segment_anything/" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("content, message", [
    (b"PK\x03\x04 truncated", "not a readable PyTorch weights file"),
    ({"model": {"conv.weight": torch.zeros(1)}}, "not a SAM state dict"),
])
def test_bad_checkpoint_is_one_line_error(tmp_path, capsys, content, message):
    path = tmp_path / "bad.pth"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save(content, path)
    assert cli(tmp_path, path) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err and OFFICIAL_URL in err


def test_wrong_model_type_names_the_one_that_fits(random_vit_b, tmp_path, capsys):
    assert cli(tmp_path, random_vit_b, "vit_l") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "a SAM vit_b checkpoint (image encoder width 768), not vit_l" in err
    assert "use --model-type vit_b" in err and OFFICIAL_URL in err
    # A SAM state dict with a missing tensor fails the strict load, again in one message.
    state = torch.load(random_vit_b, weights_only=True)
    del state["mask_decoder.iou_token.weight"]
    torch.save(state, tmp_path / "partial.pth")
    with pytest.raises(CheckpointError, match=r"missing \(1\): mask_decoder.iou_token.weight.*#model-checkpoints"):
        load_sam(tmp_path / "partial.pth", "vit_b")


def test_cli_end_to_end_one_image(random_vit_b, packed_shards, tmp_path, monkeypatch):
    source = resolve_data(packed_shards["val"], "val")
    [sid] = covering_ids(source, 1)  # what --num 1 picks
    [(_, image, label)] = iter_samples(source, [sid])
    # A semantic model that predicts the image's main object class everywhere: its map is
    # known exactly, and it is one blob, so one box prompt (each costs a mask-decoder pass).
    counts = np.bincount(label[label != 255], minlength=21)
    main_class = int(counts[1:].argmax()) + 1
    one_class_checkpoint(tmp_path / "best.pt", main_class)
    encoder_calls = []
    encoder_forward = ImageEncoderViT.forward
    monkeypatch.setattr(ImageEncoderViT, "forward",
                        lambda self, x: encoder_calls.append(x.shape) or encoder_forward(self, x))
    out = tmp_path / "out"

    code = main(["--sam-checkpoint", str(random_vit_b), "--model-type", "vit_b",
                 "--data", str(packed_shards["val"]), "--num", "1", "--points-per-side", "2",
                 "--semantic", str(tmp_path / "best.pt"), "--device", "auto", "--out", str(out)])

    assert code == 0
    result = json.loads((out / "sam_metrics.json").read_text())
    assert result["ids"] == [sid]
    assert encoder_calls == [(1, 3, 1024, 1024)]  # encoded once for the generator and the box prompt
    for suffix in ("sam", "semantic", "sam_majority", "sam_boxes"):
        with Image.open(out / f"{sid}_{suffix}.png") as png:
            assert png.size == image.size and png.mode == "RGB"
    labelled = label != 255
    expected_acc = counts[main_class] / labelled.sum()
    assert expected_acc > 0
    for method in ("semantic", "sam_majority"):  # every SAM mask votes for the one class too
        metrics = result["metrics"][method]
        assert metrics["pixel_acc"] == pytest.approx(expected_acc)
        assert metrics["num_pixels"] == labelled.sum()
        # IoU of the predicted class = its share of the pixels; every other ground-truth class: 0.
        assert metrics["miou"] == pytest.approx(expected_acc / np.count_nonzero(counts))
    assert result["metrics"]["sam_boxes"]["num_pixels"] == labelled.sum()
    assert result["model_type"] == "vit_b" and result["points_per_side"] == 2
    assert result["per_image"][sid]["sam_seconds"] > 0
    print(f"\nSAM vit_b on CPU, one {image.size[0]}x{image.size[1]} image, 2x2 points + 1 box: "
          f"{result['per_image'][sid]['sam_seconds']:.1f} s")
