"""segtrain.stats on a hand-made manifest whose shares are easy to work out."""
import json

import numpy as np
import pytest
from PIL import Image

from segtrain import stats
from segtrain.sources import read_manifest
from segtrain.voc import CLASSES, COLORMAP, DataError

AEROPLANE, PERSON = CLASSES.index("aeroplane"), CLASSES.index("person")


def make_manifest() -> dict:
    # 4 images, 1000 labelled pixels: background 600, aeroplane 250, person 150.
    pixels = [0] * len(CLASSES)
    images = [0] * len(CLASSES)
    pixels[0], pixels[AEROPLANE], pixels[PERSON] = 600, 250, 150
    images[0], images[AEROPLANE], images[PERSON] = 4, 1, 2
    return {
        "format": "segtrain-shards/1", "split": "train", "num_samples": 4, "num_shards": 1,
        "shards": [{"file": "voc-train-000000.tar", "samples": 4, "bytes": 1, "sha256": "0" * 64}],
        "class_names": list(CLASSES), "class_pixel_counts": pixels, "class_image_counts": images,
        "ignore_pixel_count": 25, "labelled_pixel_count": 1000,
        "image_classes": {"a": [0, 1], "b": [0, 15], "c": [0, 15], "d": [0]},
    }


@pytest.fixture
def manifest_path(tmp_path):
    path = tmp_path / "voc-train.json"
    path.write_text(json.dumps(make_manifest()))
    return path


def test_class_balance_rows_by_hand(manifest_path):
    rows = stats.class_balance(read_manifest(manifest_path))
    assert [r["name"] for r in rows] == list(CLASSES)
    assert rows[0] == {"name": "background", "pixels": 600, "pixel_share": 0.6, "images": 4, "image_share": 1.0}
    assert rows[AEROPLANE]["pixel_share"] == pytest.approx(0.25)
    assert rows[AEROPLANE]["image_share"] == pytest.approx(0.25)
    assert rows[PERSON]["pixel_share"] == pytest.approx(0.15)
    assert rows[PERSON]["image_share"] == pytest.approx(0.5)
    assert rows[CLASSES.index("bottle")]["pixel_share"] == 0.0
    assert sum(r["pixel_share"] for r in rows) == pytest.approx(1.0)


def test_cli_prints_aligned_table_and_writes_png(manifest_path, tmp_path, capsys):
    out = tmp_path / "figures" / "class_balance.png"
    stats.main([str(manifest_path), "--plot", str(out)])
    text = capsys.readouterr().out

    table = [line for line in text.splitlines() if line[:3].strip().isdigit()]
    assert [line.split()[1] for line in table] == list(CLASSES)  # sorted by class index
    assert len({len(line) for line in table}) == 1  # aligned columns
    assert table[AEROPLANE].split() == ["1", "aeroplane", "250", "25.000", "1", "25.00"]
    assert table[PERSON].split() == ["15", "person", "150", "15.000", "2", "50.00"]
    assert table[0].split() == ["0", "background", "600", "60.000", "4", "100.00"]
    # 25 ignore pixels out of 1025 in all.
    assert "4 images, 1,000 labelled pixels, 25 ignore (255) pixels (2.44% of all pixels)" in text

    with Image.open(out) as img:
        assert img.format == "PNG"
        assert img.width >= 600 and img.height >= 400
        rgb = np.array(img.convert("RGB")).reshape(-1, 3)
    # Bars are drawn in the VOC palette: the aeroplane and person colours fill whole bars.
    for index in (AEROPLANE, PERSON):
        assert (rgb == COLORMAP[index]).all(axis=1).sum() > 200, CLASSES[index]
    assert [p.name for p in out.parent.iterdir()] == ["class_balance.png"]  # no temp file left


def test_plot_from_rows_single_panel_replaces_atomically(tmp_path):
    rows = stats.class_balance(make_manifest())
    out = tmp_path / "balance.png"
    out.write_bytes(b"old")
    assert stats.plot_class_balance(rows, out, title="rows", image_share=False) == out
    with Image.open(out) as img:
        img.verify()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["balance.png"]


def test_missing_manifest(tmp_path):
    with pytest.raises(DataError, match=r"nope\.json: manifest not found"):
        read_manifest(tmp_path / "nope.json")


def test_not_json(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{"format": "segtrain-shards/1", ')
    with pytest.raises(DataError, match=r"broken\.json: not a JSON manifest"):
        read_manifest(path)


@pytest.mark.parametrize("mutate, message", [
    (lambda m: m.pop("class_pixel_counts"), "lacks class_pixel_counts"),
    (lambda m: m.update(format="other/2"), "format 'other/2'"),
    (lambda m: m.update(shards=[]), "manifest lists no shards"),
    (lambda m: m["class_image_counts"].pop(), "class_image_counts must list 21 counts"),
    (lambda m: m["class_pixel_counts"].__setitem__(3, 7), "sum to 1007, but labelled_pixel_count is 1000"),
    (lambda m: m["class_image_counts"].__setitem__(3, 9), "exceeds num_samples"),
])
def test_bad_manifest_names_file_and_problem(tmp_path, mutate, message):
    manifest = make_manifest()
    mutate(manifest)
    path = tmp_path / "voc-train.json"
    path.write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="voc-train.json") as err:
        read_manifest(path)
    assert message in str(err.value)


def test_cli_error_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        stats.main([str(tmp_path / "missing.json")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("segtrain: error: ") and "missing.json" in err and "\n" not in err


def test_manifest_from_the_real_packer(tmp_path, capsys):
    from segtrain.pack import pack_split
    from segtrain.synthetic import generate
    from segtrain.datasets import VOCSegmentation

    voc_root = generate(tmp_path / "syn", num_train=6, num_val=1, seed=3, min_size=40, max_size=64)
    pack_split(voc_root, "train", tmp_path / "shards", progress=False)
    manifest_path = tmp_path / "shards" / "voc-train.json"

    rows = stats.class_balance(read_manifest(manifest_path))
    # Shares worked out from the label PNGs themselves.
    labels = [label for _, label in VOCSegmentation(voc_root, "train")]
    counts = np.bincount(np.concatenate([lbl.ravel() for lbl in labels]), minlength=256)
    labelled = counts[: len(CLASSES)].sum()
    for index, row in enumerate(rows):
        assert row["pixel_share"] == pytest.approx(counts[index] / labelled)
        assert row["image_share"] == pytest.approx(sum((lbl == index).any() for lbl in labels) / len(labels))

    stats.main([str(manifest_path), "--plot", str(tmp_path / "balance.png")])
    assert f"total: 6 images, {labelled:,} labelled pixels, {counts[255]:,} ignore" in capsys.readouterr().out
