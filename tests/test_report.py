"""segtrain.report on two short runs: curves, table, class balance, the 5-row grid, SAM columns."""
import json

import numpy as np
import pytest
from PIL import Image

from segtrain import loaders, report, sam, visualize
from segtrain.sources import resolve_data
from segtrain.config import parse_config
from segtrain.datasets import VOC
from segtrain.train import train
from segtrain.voc import decode_target


@pytest.fixture(scope="module")
def two_runs(trained_run, packed_shards, tmp_path_factory):
    """The session's trained run (conftest.trained_run, loss ce, in a folder named ce) and a
    shorter one with loss weighted_ce."""
    run_dir = tmp_path_factory.mktemp("report_runs") / "weighted_ce"
    train(parse_config(["--data", str(packed_shards["train"]), "--run-dir", str(run_dir),
                        "--backbone", "resnet18", "--pretrained", "false", "--crop-size", "65",
                        "--batch-size", "4", "--iterations", "4", "--val-every", "2", "--workers", "1",
                        "--checkpoint-every", "4", "--tracker", "none", "--loss", "weighted_ce"]))
    return [trained_run[0], run_dir]


@pytest.fixture
def grid_spy(monkeypatch):
    calls = []
    original = visualize.image_grid

    def spy(rows, col_titles=None, row_titles=None, **kwargs):
        calls.append({"rows": rows, "col_titles": col_titles, "row_titles": row_titles})
        return original(rows, col_titles=col_titles, row_titles=row_titles, **kwargs)

    monkeypatch.setattr(visualize, "image_grid", spy)
    return calls


def test_report_on_two_runs(two_runs, packed_shards, tmp_path, grid_spy):
    out = tmp_path / "report"
    report.main([str(p) for p in two_runs] + ["--out", str(out)])
    for name in ("curves.png", "class_balance.png", "predictions.png"):
        with Image.open(out / name) as img:
            assert img.size[0] > 300 and img.size[1] > 200
    text = (out / "report.md").read_text()
    assert "![curves](curves.png)" in text and "![predictions](predictions.png)" in text
    assert "| ce | ce |" in text and "| weighted_ce | weighted_ce |" in text
    assert "| RGB | Ground truth | ce | weighted_ce |\n|---|---|---|---|\n" in text  # renders as a table
    summary = json.loads((out / "summary.json").read_text())
    for row, run_dir in zip(summary["runs"], two_runs):
        vals = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
                if "val/miou" in line]
        assert row["miou"] == max(v["val/miou"] for v in vals)

    (grid,) = grid_spy
    assert grid["col_titles"] == ["RGB", "Ground truth", "ce", "weighted_ce"]
    assert len(grid["rows"]) == 5 and all(len(r) == 4 for r in grid["rows"])
    ids = grid["row_titles"]
    assert ids == summary["ids"] and len(set(ids)) == 5
    # The default images cover at least as many classes as the first five of the split.
    source = resolve_data(packed_shards["val"], "val")
    classes = loaders.image_classes(source)
    first_five = list(classes)[:5]
    assert len(set().union(*(classes[i] for i in ids))) >= len(set().union(*(classes[i] for i in first_five)))
    # Ground-truth column really is the colourised label of that id.
    (sid, _, label), = loaders.iter_samples(source, ids=[ids[0]])
    np.testing.assert_array_equal(grid["rows"][0][1], decode_target(label))


def test_report_ids_and_sam_columns(two_runs, tmp_path, grid_spy, monkeypatch):
    seen = {}

    def fake_columns(checkpoint, model_type, images, semantic=None, device="cpu", points_per_side=32, **kw):
        seen.update(checkpoint=checkpoint, model_type=model_type, n=len(images), semantic=semantic,
                    points=points_per_side)
        return {"titles": ["SAM", "SAM-refined"],
                "images": [[np.zeros_like(img), np.ones_like(img)] for img in images]}

    monkeypatch.setattr(sam, "report_columns", fake_columns)
    out = tmp_path / "r"
    chosen = ["synth_000049", "synth_000050"]  # val ids of the conftest data
    report.main([str(two_runs[0]), "--out", str(out), "--ids", *chosen,
                 "--sam-checkpoint", "sam.pth", "--sam-points-per-side", "8"])
    (grid,) = grid_spy
    assert grid["row_titles"] == chosen
    assert grid["col_titles"] == ["RGB", "Ground truth", "ce", "SAM", "SAM-refined"]
    assert seen == {"checkpoint": "sam.pth", "model_type": "vit_b", "n": 2,
                    "semantic": two_runs[0] / "best.pt", "points": 8}
    assert "| RGB | Ground truth | ce | SAM | SAM-refined |" in (out / "report.md").read_text()


def test_report_rejects_a_folder_that_is_not_a_run(tmp_path, capsys):
    with pytest.raises(SystemExit):
        report.main([str(tmp_path), "--out", str(tmp_path / "o")])
    assert "not a segtrain run directory" in capsys.readouterr().err


def test_a_run_validated_once_is_drawn_as_a_level_and_said_so(tmp_path):
    once = report.Run("once", tmp_path, {}, [{"step": 4, "epoch": 2.0, "val/miou": 0.3},
                                           {"step": 4, "train/loss": 1.0}])
    twice = report.Run("twice", tmp_path, {}, [{"step": 2, "epoch": 1.0, "val/miou": 0.2},
                                             {"step": 4, "epoch": 2.0, "val/miou": 0.25}])
    ax_miou = report.curves_figure([once, twice]).axes[0]
    labelled = {line.get_label(): line for line in ax_miou.get_lines() if not line.get_label().startswith("_")}
    level = labelled["once (validated once, epoch 2)"]
    assert list(level.get_xdata()) == [0, 2.0] and list(level.get_ydata()) == [0.3, 0.3]
    assert len(labelled["twice"].get_xdata()) == 2


def test_prediction_grid_tiles_are_large_with_thin_gaps(tmp_path):
    tile = np.zeros((375, 500, 3), np.uint8)
    out = report.plot_predictions([[tile] * 4] * 5, ["RGB", "Ground truth", "a", "b"], list("vwxyz"),
                                  tmp_path / "grid.png", VOC)
    with Image.open(out) as img:
        width, height = img.size
        pixels = np.asarray(img.convert("L"))
    # 4 columns of 500-px images: each tile at least ~300 px wide (was 1.8 in x 100 dpi = 180 px).
    assert width >= 4 * 300 and height >= 5 * 220
    # Tiles shaped like the 4:3 images: little blank space between the rows (was a quarter).
    grid_part = pixels[: int(0.85 * height)]  # above the colour legend
    assert (grid_part == 255).all(axis=1).mean() < 0.08
