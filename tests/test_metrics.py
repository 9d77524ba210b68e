import json
import math

import numpy as np
import pytest
import torch

from segtrain.metrics import (ConfusionMatrix, confusion_matrix, format_metrics_table,
                              segmentation_metrics, to_jsonable)
from segtrain.voc import CLASSES

# 4 classes; class 3 appears in neither target nor prediction. The 255 pixel is
# predicted as 0 and must not be counted.
TARGET = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 1]], dtype=torch.uint8)
PRED = torch.tensor([[0, 1, 1, 1], [2, 0, 0, 1]])
# rows = ground truth, cols = prediction
EXPECTED_CM = [[1, 1, 0, 0],
               [0, 3, 0, 0],
               [1, 0, 1, 0],
               [0, 0, 0, 0]]


def test_confusion_matrix_hand_case_skips_ignore():
    cm = confusion_matrix(PRED, TARGET, num_classes=4)
    assert cm.dtype == torch.int64
    assert cm.tolist() == EXPECTED_CM


def test_metrics_hand_case():
    m = segmentation_metrics(torch.tensor(EXPECTED_CM))
    # tp = [1, 3, 1, 0], gt = [2, 3, 2, 0], pred = [2, 4, 1, 0], union = [3, 4, 2, 0]
    assert m["iou"][:3] == pytest.approx([1 / 3, 3 / 4, 1 / 2])
    assert math.isnan(m["iou"][3])  # absent from both: undefined, not 0
    assert m["miou"] == pytest.approx((1 / 3 + 3 / 4 + 1 / 2) / 3)  # = 19/36, class 3 excluded
    assert m["pixel_acc"] == pytest.approx(5 / 7)
    assert m["class_acc"][:3] == pytest.approx([1 / 2, 1, 1 / 2])
    assert m["mean_class_acc"] == pytest.approx(2 / 3)
    assert m["fwiou"] == pytest.approx(2 / 7 * 1 / 3 + 3 / 7 * 3 / 4 + 2 / 7 * 1 / 2)  # = 47/84
    assert m["num_pixels"] == 7
    assert all(type(v) is float for v in m["iou"] + [m["miou"], m["pixel_acc"], m["fwiou"]])


def test_class_only_in_prediction_counts_as_zero_iou():
    # Class 2 is predicted but never in the ground truth: a false positive, IoU 0,
    # in mIoU; its accuracy is undefined (no GT pixels) and left out of mean_class_acc.
    target = torch.tensor([0, 0, 1, 1])
    pred = torch.tensor([0, 2, 1, 1])
    m = segmentation_metrics(confusion_matrix(pred, target, num_classes=3))
    assert m["iou"] == pytest.approx([1 / 2, 1.0, 0.0])
    assert m["miou"] == pytest.approx(1.5 / 3)
    assert math.isnan(m["class_acc"][2])
    assert m["mean_class_acc"] == pytest.approx((1 / 2 + 1) / 2)


def test_perfect_prediction():
    target = torch.randint(0, 5, (2, 9, 11))
    target[0, :2] = 255
    m = segmentation_metrics(confusion_matrix(target.clone().masked_fill(target == 255, 3), target, 5))
    for key in ("miou", "pixel_acc", "mean_class_acc", "fwiou"):
        assert m[key] == pytest.approx(1.0)


def test_confusion_matrix_matches_numpy_reference():
    gen = torch.Generator().manual_seed(0)
    target = torch.randint(0, 21, (3, 37, 41), generator=gen, dtype=torch.int64)
    target[torch.rand(target.shape, generator=gen) < 0.1] = 255
    pred = torch.randint(0, 21, target.shape, generator=gen).to(torch.int32)

    t, p = target.numpy().ravel(), pred.numpy().ravel()
    keep = t != 255
    ref = np.zeros((21, 21), dtype=np.int64)
    np.add.at(ref, (t[keep], p[keep]), 1)

    assert np.array_equal(confusion_matrix(pred, target.to(torch.uint8), 21).numpy(), ref)


def test_update_accumulates_like_one_shot_and_reset():
    gen = torch.Generator().manual_seed(1)
    preds = [torch.randint(0, 6, (2, 8, 8), generator=gen) for _ in range(3)]
    targets = [torch.randint(0, 6, (2, 8, 8), generator=gen) for _ in range(3)]
    targets[1][:, :3] = 255

    running = ConfusionMatrix(num_classes=6)
    for p, t in zip(preds, targets):
        running.update(p, t)
    one_shot = confusion_matrix(torch.cat(preds), torch.cat(targets), num_classes=6)
    assert torch.equal(running.mat, one_shot)
    assert running.compute() == segmentation_metrics(one_shot)

    running.reset()
    assert running.mat.sum() == 0


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="shape"):
        confusion_matrix(torch.zeros(2, 3, dtype=torch.long), torch.zeros(3, 2, dtype=torch.long), 21)
    with pytest.raises(ValueError, match="outside"):
        confusion_matrix(torch.tensor([21]), torch.tensor([0]), 21)  # would alias to cell [1, 0]
    with pytest.raises(ValueError, match="outside"):
        confusion_matrix(torch.tensor([0]), torch.tensor([30]), 21)
    with pytest.raises(ValueError, match="integer"):
        confusion_matrix(torch.zeros(4), torch.zeros(4, dtype=torch.long), 21)
    with pytest.raises(ValueError, match="class names"):
        segmentation_metrics(torch.eye(3, dtype=torch.long), class_names=["a", "b"])


class _TwoRankAccelerator:
    """Stands in for two processes: reduce(sum) adds the other rank's matrix."""

    device = torch.device("cpu")

    def __init__(self, other_rank_mat):
        self.other = other_rank_mat

    def reduce(self, tensor, reduction):
        assert reduction == "sum"
        return tensor + self.other


def test_reduce_sums_disjoint_ranks():
    gen = torch.Generator().manual_seed(2)
    pred_a, pred_b = torch.randint(0, 4, (2, 5, 5), generator=gen)
    targ_a, targ_b = torch.randint(0, 4, (2, 5, 5), generator=gen)
    rank0 = ConfusionMatrix(num_classes=4)
    rank0.update(pred_a, targ_a)
    rank0.reduce(_TwoRankAccelerator(confusion_matrix(pred_b, targ_b, num_classes=4)))
    both = confusion_matrix(torch.stack([pred_a, pred_b]), torch.stack([targ_a, targ_b]), num_classes=4)
    assert torch.equal(rank0.mat, both)


def test_per_class_and_json_serialisation():
    names = ["bg", "cat", "dog", "cow"]
    m = segmentation_metrics(torch.tensor(EXPECTED_CM), class_names=names)
    assert m["per_class"]["dog"] == pytest.approx(0.5)
    text = json.dumps(to_jsonable(m), allow_nan=False)  # strict JSON: NaN would raise here
    back = json.loads(text)
    assert back["iou"][3] is None and back["per_class"]["cow"] is None
    assert back["miou"] == pytest.approx(19 / 36)
    assert to_jsonable({"t": torch.tensor([1.0, float("inf")])}) == {"t": [1.0, None]}


def test_empty_matrix_gives_nan_not_an_error():
    m = segmentation_metrics(torch.zeros(3, 3, dtype=torch.long))
    assert all(math.isnan(m[k]) for k in ("miou", "pixel_acc", "mean_class_acc", "fwiou"))
    assert m["num_pixels"] == 0


def test_format_metrics_table():
    m = segmentation_metrics(torch.tensor(EXPECTED_CM))
    table = format_metrics_table(m, ["bg", "cat", "dog", "cow"])
    lines = table.splitlines()
    assert lines[0].split() == ["class", "IoU", "Acc"]
    assert lines[2].split() == ["bg", "33.33", "50.00"]
    assert lines[5].split() == ["cow", "-", "-"]
    assert "52.78" in table  # mIoU = 19/36
    # Works on metrics that already went through to_jsonable (None instead of NaN).
    assert format_metrics_table(to_jsonable(m), ["bg", "cat", "dog", "cow"]) == table
    assert len(format_metrics_table(segmentation_metrics(torch.eye(21, dtype=torch.long)), CLASSES).splitlines()) == 21 + 7
