"""tools/pack.py: byte-exact shards, honest manifest, bad input, interrupted runs."""
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from segtrain import pack, voc
from segtrain.datasets import VOCSegmentation
from segtrain.synthetic import generate

REPO = Path(__file__).resolve().parents[1]




@pytest.fixture(scope="module")
def voc_root(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("syn"), num_train=24, num_val=6, seed=1, min_size=48, max_size=96)


def _copy_tree(src: Path, dst: Path) -> Path:
    import shutil
    shutil.copytree(src, dst)
    return dst


def test_shards_hold_the_original_bytes(voc_root, tmp_path):
    m = pack.pack_split(voc_root, "train", tmp_path, shard_size=10, progress=False)
    assert [s["samples"] for s in m["shards"]] == [10, 10, 4]
    assert m["num_samples"] == 24 and m["num_shards"] == 3
    seen = []
    for shard in m["shards"]:
        path = tmp_path / shard["file"]
        assert shard["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        assert shard["bytes"] == path.stat().st_size
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                sid, ext = member.name.split(".", 1)
                sub = {"jpg": "JPEGImages", "png": "SegmentationClass"}[ext]
                assert tar.extractfile(member).read() == (voc_root / sub / f"{sid}.{ext}").read_bytes()
                if ext == "jpg":
                    seen.append(sid)
        assert shard["ids"] == seen[-shard["samples"]:]
    assert seen == voc.read_split(voc_root, "train")
    assert not list(tmp_path.glob(".*tmp"))


def test_manifest_counts_equal_direct_counts(voc_root, tmp_path):
    m = pack.pack_split(voc_root, "val", tmp_path, shard_size=4, workers=2, progress=False)
    assert json.loads((tmp_path / "voc-val.json").read_text()) == m
    ds = VOCSegmentation(voc_root, "val")
    pixels = np.zeros(256, np.int64)
    images = np.zeros(21, np.int64)
    widths, heights = [], []
    for i in range(len(ds)):
        image, label = ds[i]
        counts = np.bincount(label.ravel(), minlength=256)
        pixels += counts
        images += counts[:21] > 0
        widths.append(image.size[0])
        heights.append(image.size[1])
        assert m["image_classes"][ds.ids[i]] == np.flatnonzero(counts[:21]).tolist()
    assert m["class_pixel_counts"] == pixels[:21].tolist()
    assert m["class_image_counts"] == images.tolist()
    assert m["ignore_pixel_count"] == pixels[255]
    assert m["labelled_pixel_count"] == pixels[:21].sum()
    assert m["image_size"]["width"]["max"] == max(widths)
    assert m["image_size"]["height"]["min"] == min(heights)
    assert m["class_names"] == list(voc.CLASSES) and m["split"] == "val" and m["skipped"] == []


def _break(root: Path, sid: str, problem: str) -> None:
    img, lbl = root / "JPEGImages" / f"{sid}.jpg", root / "SegmentationClass" / f"{sid}.png"
    if problem == "corrupt JPEG":
        img.write_bytes(img.read_bytes()[:200])
    elif problem == "missing label":
        lbl.unlink()
    elif problem == "missing image":
        img.unlink()
    elif problem == "size mismatch":
        label = np.array(Image.open(lbl))
        voc.save_label_png(np.pad(label, ((0, 3), (0, 0))), lbl)
    elif problem == "RGB label":
        Image.open(lbl).convert("RGB").save(lbl)
    elif problem == "value out of range":
        label = np.array(Image.open(lbl))
        label[0, 0] = 21
        voc.save_label_png(label, lbl)


BAD_CASES = {
    "corrupt JPEG": "corrupt or unreadable image",
    "missing label": "missing label",
    "missing image": "missing image",
    "size mismatch": "but label is",
    "RGB label": "not an index image",
    "value out of range": r"label values \[21\] outside",
}


@pytest.mark.parametrize("problem", list(BAD_CASES))
def test_bad_pair_stops_with_clear_error_or_is_skipped(voc_root, tmp_path, problem):
    root = _copy_tree(voc_root, tmp_path / "VOC2012")
    bad_id = voc.read_split(root, "val")[2]
    _break(root, bad_id, problem)
    out = tmp_path / "shards"
    with pytest.raises(voc.DataError, match=BAD_CASES[problem]) as info:
        pack.pack_split(root, "val", out, shard_size=4, progress=False)
    assert bad_id in str(info.value)
    assert not (out / "voc-val.json").exists()
    m = pack.pack_split(root, "val", out, shard_size=4, skip_bad=True, progress=False)
    assert [s["id"] for s in m["skipped"]] == [bad_id]
    assert m["num_samples"] == 5 and bad_id not in m["image_classes"]


def test_cli_error_is_one_line(voc_root, tmp_path):
    root = _copy_tree(voc_root, tmp_path / "VOC2012")
    _break(root, voc.read_split(root, "val")[0], "value out of range")
    r = subprocess.run([sys.executable, str(REPO / "tools" / "pack.py"), "--voc-root", str(root),
                        "--split", "val", "--out", str(tmp_path / "s")], capture_output=True, text=True)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and "segtrain: error:" in r.stderr and "outside 0..20" in r.stderr


def test_train_aug_uses_segmentation_class_aug(voc_root, tmp_path):
    root = _copy_tree(voc_root, tmp_path / "VOC2012")
    aug = root / "SegmentationClassAug"
    aug.mkdir()
    ids = voc.read_split(root, "train")[:7]
    for sid in ids:  # SBD's labels are grayscale index PNGs
        label = np.array(Image.open(root / "SegmentationClass" / f"{sid}.png"))
        Image.fromarray(label, mode="L").save(aug / f"{sid}.png")
    (root / "ImageSets" / "Segmentation" / "train_aug.txt").write_text("\n".join(ids) + "\n")
    m = pack.pack_split(root, "train_aug", tmp_path / "s", shard_size=5, progress=False)
    assert m["label_dir"] == "SegmentationClassAug" and m["num_samples"] == 7
    assert (tmp_path / "s" / "voc-train_aug-000001.tar").exists()


@pytest.mark.slow
def test_interrupted_pack_then_rerun_equals_clean_run(tmp_path):
    root = generate(tmp_path / "syn", num_train=150, num_val=2, seed=2, min_size=200, max_size=300)
    clean = tmp_path / "clean"
    pack.pack_split(root, "train", clean, shard_size=3, progress=False)

    out = tmp_path / "interrupted"
    cmd = [sys.executable, str(REPO / "tools" / "pack.py"), "--voc-root", str(root), "--split", "train",
           "--out", str(out), "--shard-size", "3"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline and not list(out.glob("voc-train-*.tar")):
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = sorted(p.name for p in out.glob("voc-train-*.tar"))
    assert finished, "the packer never wrote a shard"
    assert not (out / "voc-train.json").exists(), "killed too late: the run had finished"
    assert len(finished) < 50  # really interrupted mid-run
    # Whatever the kill left is either a complete shard or a hidden temp file, never a partial .tar.
    for name in finished:
        with tarfile.open(out / name) as tar:
            assert len(tar.getmembers()) == 6

    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    clean_files = sorted(p.name for p in clean.iterdir())
    assert sorted(p.name for p in out.iterdir()) == clean_files
    for name in clean_files:
        if name.endswith(".tar"):
            assert (out / name).read_bytes() == (clean / name).read_bytes(), name
    assert json.loads((out / "voc-train.json").read_text()) == json.loads((clean / "voc-train.json").read_text())
