"""segtrain.evaluate: TTA, metrics validity, exactly-once counting on 1 and 2 processes, CLI errors."""
import json
import math
import os
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import RUN_PRECISION
from segtrain.cli import OtherProcessFailed
from segtrain.evaluate import main
from segtrain.inference import evaluate, ms_flip_logits, same_size_batches
from segtrain.checkpoints import save_checkpoint
from segtrain.model import build_model
from segtrain.pack import pack_split
from segtrain.loaders import val_loader
from segtrain.sources import resolve_data
from segtrain.synthetic import generate
from segtrain.files import DataError

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
    tied = build_model(backbone="resnet18", pretrained=False).eval()
    near_tie(tied)
    save_checkpoint(tmp / "tied.pt", tied)
    return {"tmp": tmp, "data": tmp / "shards" / "voc-val.json", "manifest": manifest,
            "train_manifest": train_manifest,
            "ckpt": tmp / "ckpt.pt", "model": model, "tied_ckpt": tmp / "tied.pt", "tied": tied}


def near_tie(model: nn.Module, a: int = 1, b: int = 2) -> None:
    """Make classes a and b the top two almost everywhere with weights a few ulps apart: their
    argmax then follows the last bits of the features, which the CPU thread count changes."""
    torch.manual_seed(1)
    conv = model.head.classifier[-1]
    with torch.no_grad():
        conv.weight[b] = conv.weight[a] * (1 + 1e-7 * torch.randn_like(conv.weight[a]))
        conv.bias[a] = conv.bias[b] = conv.bias.max() + 10.0


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
    metrics = evaluate(model, val_loader(resolve_data(setup["data"], "train")), "cpu", protocol="ms-flip",
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


def test_the_near_tie_checkpoint_sees_a_thread_count_change(setup):
    """What makes the test below able to fail: with this checkpoint 1 and 2 CPU threads
    give different confusion matrices (oneDNN splits sums differently)."""
    counts = [evaluate(setup["tied"], val_loader(resolve_data(setup["data"], "val"), num_workers=0), "cpu", threads=t)
              for t in (1, 2)]
    assert [c["cpu_threads"] for c in counts] == [1, 2]
    assert not torch.equal(counts[0]["confusion_matrix"], counts[1]["confusion_matrix"])


@pytest.mark.parametrize("split", ["val", "train"])
def test_one_and_two_processes_give_identical_confusion_matrices(setup, split, launch_ddp, debug_launch):
    """Bit-identical with the same CPU threads per process. val: one process at 2 threads (a
    2-core machine's default) and two told --threads 2; train: the launcher's 1 thread per
    process and one process told --threads 1."""
    manifest = setup["manifest" if split == "val" else "train_manifest"]
    # val: ranks get shards {0, 2} and {1}, 4 and 3 images; train: rank 1 gets no batch at all.
    assert [s["samples"] for s in manifest["shards"]] == ([3, 3, 1] if split == "val" else [4])
    args = ["--checkpoint", str(setup["tied_ckpt"]), "--data", str(setup["data"]), "--split", split,
            "--workers", "1", "--confusion-matrix", "--mixed-precision", "no"]
    threads = ["--threads", "2"] if split == "val" else []
    main(args + (threads or ["--threads", "1"]) + ["--out", str(setup["tmp"] / f"one_{split}.json")])
    one = json.loads((setup["tmp"] / f"one_{split}.json").read_text())

    two_args = [*args, *threads, "--out", str(setup["tmp"] / f"two_{split}.json")]
    if split == "val":  # the command under `accelerate launch`, as users run it
        proc = launch_ddp(REPO / "segtrain" / "evaluate.py", *two_args, timeout=300, cwd=setup["tmp"])
        assert proc.returncode == 0, proc.stderr[-3000:]
    else:  # the same main() in 2 forked processes (one thread each: the launcher's default)
        debug_launch(main, two_args)
    two = json.loads((setup["tmp"] / f"two_{split}.json").read_text())

    assert two["num_processes"] == 2 and one["num_processes"] == 1
    assert one["cpu_threads"] == two["cpu_threads"] == (2 if split == "val" else 1)
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
    assert err.startswith("segtrain: error: ") and "nope.pt" in err and "\n" not in err

    with pytest.raises(SystemExit) as exit_info:
        main(["--checkpoint", str(setup["ckpt"]), "--data", str(setup["tmp"] / "missing.json")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("segtrain: error: ") and "missing.json" in err and "\n" not in err


class TwoRankStub:
    """A 2-process Accelerator whose other rank saw the same counts (so reduce doubles)."""

    num_processes = 2
    device = torch.device("cpu")
    process_index = 0

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


def single_images(sizes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(1, 3, h, w, generator=g), torch.randint(0, 5, (1, h, w), generator=g), [f"i{n}"])
            for n, (h, w) in enumerate(sizes)]


def test_same_size_batches_groups_without_padding_and_keeps_every_image_once():
    sizes = [(6, 7), (7, 6), (6, 7), (5, 5), (6, 7), (7, 6), (6, 7), (6, 7), (7, 6)]
    samples = single_images(sizes)
    batches = list(same_size_batches(iter(samples), batch_size=3, max_held=4))
    ids = [sid for _, _, batch_ids in batches for sid in batch_ids]
    assert sorted(ids) == sorted(f"i{n}" for n in range(len(sizes)))
    by_id = {s[2][0]: s for s in samples}
    for images, masks, batch_ids in batches:
        assert 1 <= len(batch_ids) <= 3 and images.shape[0] == masks.shape[0] == len(batch_ids)
        for k, sid in enumerate(batch_ids):  # same tensors, no padding: each image at its own size
            assert torch.equal(images[k:k + 1], by_id[sid][0]) and torch.equal(masks[k:k + 1], by_id[sid][1])
    # A full group leaves at once; more than max_held waiting sends the largest group; the end the rest.
    assert [b[2] for b in batches] == [["i0", "i2", "i4"], ["i1", "i5"], ["i6", "i7"], ["i3"], ["i8"]]
    with pytest.raises(ValueError, match="single images"):
        list(same_size_batches(iter([(torch.zeros(2, 3, 4, 4), torch.zeros(2, 4, 4), ["a", "b"])]), 2))


def test_batched_ms_flip_counts_the_same_pixels_as_one_image_at_a_time():
    """The batching plumbing is exact: with a per-pixel model (no cross-pixel sums whose
    kernels change with the batch shape) batched and single ms-flip give one confusion matrix."""
    samples = single_images([(9, 12), (12, 9), (9, 12), (9, 12), (12, 9)])
    model = Pixelwise()
    one = evaluate(model, samples, "cpu", num_classes=5, protocol="ms-flip")
    seen = []
    batched = evaluate(model, same_size_batches(iter(samples), 4), "cpu", num_classes=5, protocol="ms-flip",
                       on_batch=lambda images, masks, preds, ids: seen.append(len(ids)))
    assert sorted(seen) == [2, 3] and batched["num_images"] == one["num_images"] == 5
    assert torch.equal(batched["confusion_matrix"], one["confusion_matrix"])


def test_cli_batch_size_groups_images(setup, tmp_path):
    """The command's --batch-size reaches same_size_batches and counts every image once. Whole
    images (12x fewer passes than ms-flip): batched ms-flip is proven exact just above."""
    out = tmp_path / "batched.json"
    main(["--checkpoint", str(setup["ckpt"]), "--data", str(setup["data"]), "--batch-size", "3",
          "--protocol", "whole", "--workers", "0", "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["num_images"] == 7 and result["num_pixels"] == setup["manifest"]["labelled_pixel_count"]


def test_evaluate_gives_what_the_runs_validation_gave_for_best_pt(trained_run, packed_shards, tmp_path):
    """best.pt evaluated on the val split reproduces the run's own validation figure: same
    precision and the run's memory format (bf16 kernels differ between layouts). The shared
    run (conftest.trained_run) trained in RUN_PRECISION (bf16 where native) with channels_last
    and validates whole images."""
    run = trained_run[0]
    best = torch.load(run / "best.pt", weights_only=True)["metrics"]["miou"]
    main(["--checkpoint", str(run / "best.pt"), "--data", str(packed_shards["val"]),
          "--mixed-precision", RUN_PRECISION, "--workers", "0", "--out", str(tmp_path / "eval.json")])
    assert json.loads((tmp_path / "eval.json").read_text())["miou"] == best
