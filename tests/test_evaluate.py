"""segtrain.evaluate: TTA, metrics validity, exactly-once counting on 1 and 2 processes, CLI errors."""
import json
import math
import os
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from segtrain.evaluate import OtherProcessFailed, evaluate, main, ms_flip_logits
from segtrain.model import build_model, save_checkpoint
from segtrain.pack import pack_split
from segtrain.shards import val_loader
from segtrain.synthetic import generate
from segtrain.voc import DataError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    """Images of 48-80 px: val has 7 in shards of 3, 3, 1 (2 ranks get 4 and 3 images), train 4 in
    one shard (rank 1 of 2 gets nothing); and a random resnet18 checkpoint."""
    tmp = tmp_path_factory.mktemp("evaluate")
    root = generate(tmp / "voc", num_train=4, num_val=7, seed=0, min_size=48, max_size=80)
    manifest = pack_split(root, "val", tmp / "shards", shard_size=3, progress=False)
    train_manifest = pack_split(root, "train", tmp / "shards", shard_size=4, progress=False)
    torch.manual_seed(0)
    model = build_model(backbone="resnet18", pretrained=False).eval()
    save_checkpoint(tmp / "ckpt.pt", model)
    return {"tmp": tmp, "data": tmp / "shards" / "voc-val.json", "manifest": manifest,
            "train_manifest": train_manifest,
            "ckpt": tmp / "ckpt.pt", "model": model}


class Pixelwise(nn.Module):
    """A 1x1 conv 'segmenter': commutes with flips exactly."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 1)

    def forward(self, x):
        return {"out": self.conv(x)}


def test_ms_flip_logits_flips_back_and_keeps_size():
    torch.manual_seed(0)
    model, images = Pixelwise(), torch.randn(2, 3, 13, 17)
    single = model(images)["out"].log_softmax(1)
    # A flip-equivariant model: the mirrored pass, flipped back, equals the plain one.
    assert torch.allclose(ms_flip_logits(model, images, scales=(1.0,)), single, atol=1e-5)
    out = ms_flip_logits(model, images)  # all six scales: 0.75 x 13 = 9.75 -> 10 px and back
    assert out.shape == single.shape
    assert torch.allclose(out.exp().sum(1), torch.ones(2, 13, 17), atol=1e-5)


def test_ms_flip_evaluate_gives_valid_metrics(setup):
    model, seen = setup["model"], []
    model.train()
    manifest = setup["train_manifest"]  # the 4-image split: 12 forward passes per image
    metrics = evaluate(model, val_loader(setup["data"], split="train"), "cpu", protocol="ms-flip",
                       on_batch=lambda images, masks, preds, ids: seen.append((preds.shape == masks.shape, *ids)))
    assert model.training  # given back in the mode it came in
    assert len(seen) == 4 and all(same_shape for same_shape, _ in seen)
    assert sorted(sid for _, sid in seen) == sorted(manifest["image_classes"])
    assert metrics["num_images"] == 4
    cm = metrics["confusion_matrix"]
    assert cm.shape == (21, 21) and int(cm.sum()) == manifest["labelled_pixel_count"]
    for key in ("miou", "pixel_acc", "mean_class_acc", "fwiou"):
        assert 0.0 <= metrics[key] <= 1.0, key
    assert all(math.isnan(v) or 0.0 <= v <= 1.0 for v in metrics["iou"] + metrics["class_acc"])


@pytest.mark.slow
@pytest.mark.parametrize("split", ["val", "train"])
def test_one_and_two_processes_give_identical_confusion_matrices(setup, split, launch_ddp):
    manifest = setup["manifest" if split == "val" else "train_manifest"]
    # val: ranks get shards {0, 2} and {1}, 4 and 3 images; train: rank 1 gets no batch at all.
    assert [s["samples"] for s in manifest["shards"]] == ([3, 3, 1] if split == "val" else [4])
    args = ["--checkpoint", str(setup["ckpt"]), "--data", str(setup["data"]), "--split", split,
            "--workers", "1", "--confusion-matrix", "--mixed-precision", "no"]
    main(args + ["--out", str(setup["tmp"] / f"one_{split}.json")])
    one = json.loads((setup["tmp"] / f"one_{split}.json").read_text())

    proc = launch_ddp(REPO / "segtrain" / "evaluate.py", *args, "--out", setup["tmp"] / f"two_{split}.json",
                      timeout=300, cwd=setup["tmp"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.loads((setup["tmp"] / f"two_{split}.json").read_text())

    assert two["num_processes"] == 2 and one["num_processes"] == 1
    assert one["num_images"] == two["num_images"] == manifest["num_samples"]
    assert one["num_pixels"] == manifest["labelled_pixel_count"]
    assert two["confusion_matrix"] == one["confusion_matrix"]
    assert two["miou"] == one["miou"]
    assert set(one) >= {"miou", "pixel_acc", "mean_class_acc", "fwiou", "per_class", "protocol",
                        "checkpoint", "data"}


def test_missing_checkpoint_and_bad_data_are_one_line_errors(setup, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--checkpoint", str(setup["tmp"] / "nope.pt"), "--data", str(setup["data"])])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "nope.pt" in err and "\n" not in err

    with pytest.raises(SystemExit) as exit_info:
        main(["--checkpoint", str(setup["ckpt"]), "--data", str(setup["tmp"] / "missing.json")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "missing.json" in err and "\n" not in err


class TwoRankStub:
    """A 2-process Accelerator whose other rank saw the same counts (so reduce doubles)."""

    num_processes = 2
    device = torch.device("cpu")

    def __init__(self, other_failed: bool = False):
        self.other_failed, self.reduced = other_failed, []

    def reduce(self, tensor, reduction):
        assert reduction == "sum"
        self.reduced.append(tensor.tolist())
        total = tensor * 2
        if self.other_failed and len(self.reduced) == 1:  # the first reduce carries the failure flags
            total[1] = tensor[1] + 1
        return total


def failing_loader(batches):
    yield from batches
    raise DataError("sample x in shard y: corrupt or unreadable JPEG")


def test_a_failing_rank_still_joins_the_reduce_so_none_hangs():
    model = Pixelwise()
    batches = [(torch.randn(1, 3, 6, 7), torch.randint(0, 5, (1, 6, 7)), ["a"])]
    stub = TwoRankStub()
    metrics = evaluate(model, batches, "cpu", num_classes=5, accelerator=stub)
    alone = evaluate(model, batches, "cpu", num_classes=5)
    assert metrics["num_images"] == 2
    assert torch.equal(metrics["confusion_matrix"], 2 * alone["confusion_matrix"])

    stub = TwoRankStub()
    with pytest.raises(DataError, match="corrupt"):
        evaluate(model, failing_loader(batches), "cpu", num_classes=5, accelerator=stub)
    assert stub.reduced == [[1, 1]]  # told the other rank it failed, then stopped

    stub = TwoRankStub(other_failed=True)
    with pytest.raises(OtherProcessFailed):
        evaluate(model, batches, "cpu", num_classes=5, accelerator=stub)
    assert len(stub.reduced) == 1  # no confusion-matrix reduce after a failure
