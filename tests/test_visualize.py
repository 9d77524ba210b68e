"""segtrain.visualize: overlay colours, atomic saving, class cover, the dataset figure."""
import numpy as np
import pytest
from matplotlib.figure import Figure
from PIL import Image

from segtrain import visualize, voc
from segtrain.visualize import dataset_figure, greedy_class_cover, image_grid, overlay, save_figure

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_overlay_leaves_background_and_blends_objects_and_ignore():
    image = np.full((4, 6, 3), 100, np.uint8)
    mask = np.zeros((4, 6), np.uint8)
    mask[0, 0], mask[1, 1] = 15, 255
    out = overlay(image, mask, alpha=0.5)
    assert out.dtype == np.uint8 and out.shape == image.shape
    assert (out[2:] == 100).all()  # background untouched
    for (y, x), cls in (((0, 0), 15), ((1, 1), 255)):
        assert np.array_equal(out[y, x], np.round(0.5 * 100 + 0.5 * voc.COLORMAP[cls].astype(float)))
    with pytest.raises(ValueError, match="mask"):
        overlay(image, mask[:2])


def test_save_figure_is_atomic_png(tmp_path):
    fig = Figure(figsize=(1, 1))
    fig.subplots().plot([0, 1])
    out = save_figure(fig, tmp_path / "sub" / "plot.png")
    assert out.read_bytes().startswith(PNG_MAGIC)
    assert [p.name for p in out.parent.iterdir()] == ["plot.png"]  # no temporary left behind


def test_greedy_class_cover_covers_then_fills_deterministically():
    classes = {"a": [0, 1, 2], "b": [0, 3], "c": [0, 1, 2, 3], "d": [0, 4], "e": [4], "f": [0, 1]}
    assert greedy_class_cover(classes, k=2, classes=range(1, 5)) == ["c", "d"]  # d beats e: same gain, smaller id
    # Everything covered after c, d: fill with most classes first, ties by id.
    assert greedy_class_cover(classes, k=4, classes=range(1, 5)) == ["c", "d", "a", "b"]
    assert greedy_class_cover(classes, k=10, classes=range(1, 5)) == ["c", "d", "a", "b", "e", "f"]
    assert greedy_class_cover({}, k=3) == []


def test_image_grid_lays_out_tiles_and_legend(tmp_path):
    tile = np.zeros((8, 8, 3), np.uint8)
    fig = image_grid([[tile, tile, tile], [tile, None]], col_titles=["x", "y", "z"], row_titles=["r0", "r1"],
                     out=tmp_path / "grid.png", legend=True)
    assert len(fig.axes) == 6 and sum(ax.has_data() for ax in fig.axes) == 4
    assert fig.legends and len(fig.legends[0].get_texts()) == 22  # 21 classes + ignore
    assert (tmp_path / "grid.png").read_bytes().startswith(PNG_MAGIC)


def test_dataset_figure_covers_all_20_classes(packed_shards, synthetic_voc, tmp_path, capsys):
    out = tmp_path / "figures" / "dataset.png"
    assert visualize.main(["dataset", "--data", str(packed_shards["train"]), "--out", str(out)]) == 0
    assert out.read_bytes().startswith(PNG_MAGIC)
    ids = capsys.readouterr().out.split("images: ")[1].strip(" )\n").split()
    assert len(ids) == 20 == len(set(ids))
    shown = set()
    for sid in ids:  # from the label files themselves, not from the manifest the picker used
        shown |= set(np.unique(np.array(Image.open(synthetic_voc / "SegmentationClass" / f"{sid}.png"))).tolist())
    assert set(range(1, 21)) <= shown
    assert Image.open(out).size[0] > Image.open(out).size[1]  # 10 columns x 4 rows: wide
    assert dataset_figure(str(synthetic_voc), tmp_path / "from_folder.png") == ids  # same pick from a folder


def test_cli_reports_bad_data_in_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit, match="2"):
        visualize.main(["dataset", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "x.png")])
    err = capsys.readouterr().err
    assert err.startswith("segtrain: error:") and "nope" in err and len(err.strip().splitlines()) == 1
