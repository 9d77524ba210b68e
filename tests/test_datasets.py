"""Dataset specs: built-in label tables, folder specs, and the spec travelling from the
packed manifest through training into checkpoints, evaluation, prediction and reports."""
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from segtrain import datasets, evaluate, inference, predict, report
from segtrain.datasets import (ADE20K, CITYSCAPES, DATASETS, VOC, DatasetSpec, decode_label, folder_spec,
                               spec_from_checkpoint, spec_from_manifest)
from segtrain.checkpoints import init_from_checkpoint
from segtrain.files import DataError
from segtrain.model import build_model, load_checkpoint
from segtrain.sources import read_manifest, resolve_data
from segtrain.pack import pack_split
from segtrain.synthetic import FOLDER_CLASSES, generate_layout
from segtrain.train import train
from segtrain.config import parse_config

REPO = Path(__file__).resolve().parents[1]


def png(values) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.asarray(values, np.uint8), mode="L").save(buf, format="PNG")
    return buf.getvalue()


# --------------------------------------------------------------------------- label tables

def test_cityscapes_label_ids_map_to_the_19_train_ids_and_the_rest_is_ignored():
    raw = [[7, 8, 11, 33], [26, 24, 0, 1], [4, 6, 9, 255]]  # road, sidewalk, building, bicycle; car,
    label = decode_label(png(raw), "aachen_x_gtFine_labelIds.png", CITYSCAPES)  # person, unlabeled, ego
    np.testing.assert_array_equal(label, [[0, 1, 2, 18], [13, 11, 255, 255], [255, 255, 255, 255]])
    assert CITYSCAPES.num_classes == 19 and CITYSCAPES.classes[13] == "car"
    assert sum(v != 255 for v in CITYSCAPES.label_map) == 19


def test_ade20k_zero_is_ignored_the_rest_shifts_down_and_others_are_errors():
    label = decode_label(png([[0, 1, 150], [2, 0, 75]]), "ADE_val_1.png", ADE20K)
    np.testing.assert_array_equal(label, [[255, 0, 149], [1, 255, 74]])
    assert ADE20K.num_classes == 150 and ADE20K.classes[0] == "wall"
    with pytest.raises(DataError, match=r"ADE_val_2\.png: label values \[151\] are not in the ade20k label map"):
        decode_label(png([[0, 151]]), "ADE_val_2.png", ADE20K)


def test_voc_decoding_is_unchanged():
    label = decode_label(datasets.label_to_png_bytes(np.array([[0, 20, 255]]), VOC), "x.png", VOC)
    np.testing.assert_array_equal(label, [[0, 20, 255]])
    with pytest.raises(DataError, match=r"y\.png: label values \[21\] outside 0\.\.20 and 255"):
        decode_label(png([[21]]), "y.png", VOC)
    assert (VOC.colormap() == datasets.voc.COLORMAP).all()


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_spec_round_trips_through_json(name, tmp_path):
    spec = DATASETS[name] if name != "folder" else folder_spec(_folder_with_yaml(tmp_path))
    assert DatasetSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec


def test_bad_spec_dict_names_where_it_came_from():
    bad = VOC.to_dict() | {"palette": [[1, 2, 3]]}
    with pytest.raises(DataError, match=r"best\.pt: .*palette needs one"):
        DatasetSpec.from_dict(bad, "best.pt")


def _folder_with_yaml(root: Path) -> Path:
    (root / "images" / "train").mkdir(parents=True, exist_ok=True)
    (root / "dataset.yaml").write_text(
        "name: roads\nclasses: [background, lane, car]\npalette: [[0, 0, 0], [255, 255, 0], [0, 0, 255]]\n"
        "ignore_index: 99\nlabel_map: {0: 0, 10: 1, 20: 2}\n")
    return root


def test_folder_yaml_spec_palette_value_mapping_and_ignore(tmp_path):
    spec = folder_spec(_folder_with_yaml(tmp_path))
    assert spec.name == "roads" and spec.classes == ("background", "lane", "car") and spec.splits == ("train",)
    assert spec.palette[1] == (255, 255, 0)
    np.testing.assert_array_equal(decode_label(png([[0, 10, 20, 99]]), "m.png", spec), [[0, 1, 2, 255]])
    with pytest.raises(DataError, match=r"m\.png: label values \[30\] are not in the roads label map"):
        decode_label(png([[30]]), "m.png", spec)


def test_folder_classes_txt_defaults_to_voc_colours(tmp_path):
    (tmp_path / "classes.txt").write_text("background\nleaf\n\nstem\n")
    spec = folder_spec(tmp_path)
    assert spec.classes == ("background", "leaf", "stem") and spec.label_map is None
    assert spec.palette == tuple(tuple(c) for c in datasets.voc.COLORMAP[:3].tolist())


def test_old_manifests_and_checkpoints_are_voc():
    assert spec_from_manifest({"class_names": list(VOC.classes)}) is VOC
    assert spec_from_checkpoint({"model_config": {"num_classes": 21}}) is VOC
    other = spec_from_checkpoint({"model_config": {"num_classes": 3}})
    assert other.classes == ("class_0", "class_1", "class_2")


# --------------------------------------------------------------------------- CLI errors

def one_error_line(argv: list, capsys) -> str:
    """``python tools/pack.py ARGV``'s error, run in this process (tests/test_pack.py runs the
    script itself): exit 2 and one line, after any progress bar."""
    from segtrain import pack

    with pytest.raises(SystemExit) as info:
        pack.main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert info.value.code == 2, err[-2000:]
    lines = [line for line in err.strip().splitlines() if not line.startswith("pack ")]
    assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
    assert lines[0].startswith("segtrain: error: ")
    return lines[0]


@pytest.fixture(scope="module")
def folder_data(tmp_path_factory) -> Path:
    return generate_layout(tmp_path_factory.mktemp("folder") / "mine", "folder", 8, 4, seed=1,
                           min_size=48, max_size=72)


def test_missing_classes_txt_is_one_line_naming_it(folder_data, tmp_path, capsys):
    root = tmp_path / "nolist"
    (root / "images" / "train").mkdir(parents=True)
    line = one_error_line(["--dataset", "folder", "--root", root, "--split", "train", "--out", tmp_path / "s"],
                          capsys)
    assert f"{root / 'classes.txt'}: missing" in line


def test_unknown_label_value_is_one_line_naming_the_file(folder_data, tmp_path, capsys):
    import shutil

    root = Path(shutil.copytree(folder_data, tmp_path / "copy"))
    mask = sorted((root / "masks" / "train").glob("*.png"))[2]
    values = np.array(Image.open(mask))
    values[0, 0] = 7  # 4 classes: 0..3 and 255
    Image.fromarray(values, mode="L").save(mask)
    line = one_error_line(["--dataset", "folder", "--root", root, "--split", "train", "--out", tmp_path / "s"],
                          capsys)
    assert str(mask) in line and "label values [7] outside 0..3 and 255" in line


# --------------------------------------------------------------------------- end to end

LAYOUTS = ("cityscapes", "ade20k", "folder")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, folder_data) -> dict:
    """Per layout: synthetic data -> pack -> train 2 steps (the folder run starts --init-from
    the Cityscapes run: another class count). Returns {layout: {"shards", "run", "spec"}}."""
    out = {}
    base = tmp_path_factory.mktemp("layouts")
    for layout in LAYOUTS:
        root = folder_data if layout == "folder" else generate_layout(
            base / layout, layout, 6, 3, seed=2, min_size=48, max_size=72)
        shards = base / f"shards_{layout}"
        for split in ("train", "val"):
            manifest = pack_split(root, split, shards, shard_size=4, progress=False, dataset=layout)
        name = manifest["dataset"]["name"]
        run_dir = base / f"run_{layout}"
        extra = ["--init-from", str(out["cityscapes"]["run"] / "best.pt")] if layout == "folder" else []
        train(parse_config(["--data", str(shards / f"{name}-train.json"), "--run-dir", str(run_dir),
                            "--backbone", "resnet18", "--pretrained", "false", "--iterations", "2",
                            "--batch-size", "2", "--crop-size", "33", "--val-every", "2", "--workers", "0",
                            "--tracker", "none", "--log-every", "1", *extra]))
        out[layout] = {"shards": shards, "val": shards / f"{name}-val.json", "run": run_dir,
                       "spec": spec_from_manifest(read_manifest(shards / f"{name}-train.json"))}
    return out


@pytest.mark.parametrize("layout", LAYOUTS)
def test_pack_train_evaluate_predict_report(runs, layout, tmp_path, capsys):
    run, spec = runs[layout], runs[layout]["spec"]
    expected = {"cityscapes": CITYSCAPES.classes, "ade20k": ADE20K.classes, "folder": FOLDER_CLASSES}[layout]
    assert spec.classes == tuple(expected)
    manifest = read_manifest(run["val"])
    assert manifest["dataset"] == spec.to_dict() and len(manifest["class_pixel_counts"]) == len(expected)
    # The checkpoint carries the spec and the normalisation; the model was built for the data's classes.
    model, ckpt = load_checkpoint(run["run"] / "best.pt")
    assert spec_from_checkpoint(ckpt) == spec and model.model_config["num_classes"] == len(expected)
    assert ckpt["normalization"] == {"mean": list(model.mean), "std": list(model.std)}

    out = tmp_path / "eval.json"
    evaluate.main(["--checkpoint", str(run["run"] / "best.pt"), "--data", str(run["val"]), "--out", str(out),
                   "--workers", "0"])
    metrics = json.loads(out.read_text())
    assert metrics["class_names"] == list(expected) and len(metrics["iou"]) == len(expected)
    assert metrics["num_images"] == manifest["num_samples"]

    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (40, 30), (90, 120, 60)).save(images / "photo.jpg")
    predict.main(["--checkpoint", str(run["run"] / "best.pt"), "--input", str(images), "--out", str(tmp_path / "p")])
    mask = Image.open(tmp_path / "p" / "photo.png")
    palette = np.array(mask.getpalette()[: 3 * len(expected)]).reshape(-1, 3)
    np.testing.assert_array_equal(palette, np.array(spec.palette))  # the data's colours

    md = report.build_report([run["run"]], tmp_path / "r", ids=None, num_images=2)
    text = md.read_text()
    assert f"({spec.name}, {len(expected)} classes)" in text
    assert all(f"| {name} |" in text for name in expected)  # per-class IoU rows named by the data
    grid, _, labels = report.prediction_rows([report.load_run(run["run"])], resolve_data(run["val"], "val"),
                                             manifest["shards"][0]["ids"][:1], torch.device("cpu"))
    np.testing.assert_array_equal(grid[0][1], datasets.decode_target(labels[0], spec))


def test_init_from_loads_backbone_and_head_and_reinitialises_the_classifier(runs):
    source, _ = load_checkpoint(runs["cityscapes"]["run"] / "best.pt")
    model = build_model("deeplabv3plus", "resnet18", num_classes=4)
    fresh = init_from_checkpoint(model, runs["cityscapes"]["run"] / "best.pt")
    assert fresh == sorted(model.classifier_keys())
    src, got = source.state_dict(), model.state_dict()
    for key in got:
        if key in fresh:
            assert got[key].shape[0] == 4
        else:
            assert torch.equal(got[key], src[key]), key
    with pytest.raises(DataError, match="needs the same arch"):
        init_from_checkpoint(build_model("deeplabv3", "resnet18", num_classes=4),
                             runs["cityscapes"]["run"] / "best.pt")


def test_checkpoint_and_data_with_other_classes_are_refused(runs, capsys):
    best = runs["folder"]["run"] / "best.pt"
    with pytest.raises(SystemExit, match="2"):
        evaluate.main(["--checkpoint", str(best), "--data", str(runs["cityscapes"]["val"]), "--workers", "0"])
    err = capsys.readouterr().err.strip()
    assert err.startswith("segtrain: error: ") and "\n" not in err
    assert str(best) in err and "checkpoint has 4 classes, data has 19" in err and "--init-from" in err


def test_num_classes_other_than_the_data_is_refused(runs, tmp_path, capsys):
    from segtrain.train import main

    with pytest.raises(SystemExit, match="2"):
        main(["--data", str(runs["folder"]["shards"] / "mine-train.json"), "--run-dir", str(tmp_path / "r"),
              "--num-classes", "5", "--backbone", "resnet18", "--pretrained", "false", "--tracker", "none"])
    err = capsys.readouterr().err.strip()
    assert "num_classes: 5, but the labels of" in err and "have 4 classes" in err and "\n" not in err


def test_normalisation_comes_from_the_backbone_travels_in_the_checkpoint_and_is_used(tmp_path):
    assert build_model("deeplabv3", "resnetv2_50x1_bit.goog_in21k", num_classes=2).mean == (0.5, 0.5, 0.5)
    model = build_model("deeplabv3plus", "resnet18", num_classes=3).eval()
    assert model.mean == (0.485, 0.456, 0.406)  # ImageNet for torchvision-style weights
    model.mean, model.std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    from segtrain.checkpoints import save_checkpoint
    save_checkpoint(tmp_path / "m.pt", model, dataset=folder_spec_for(tmp_path).to_dict())
    loaded, _ = load_checkpoint(tmp_path / "m.pt")
    assert (loaded.mean, loaded.std) == (model.mean, model.std)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (33, 41, 3), dtype=np.uint8))
    pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255
    manual = (pixels - torch.tensor(model.mean).view(3, 1, 1)) / torch.tensor(model.std).view(3, 1, 1)
    with torch.inference_mode():
        expected = loaded.eval()(manual[None])["out"][0].argmax(0).numpy()
    np.testing.assert_array_equal(inference.predict_mask(loaded, image, torch.device("cpu")), expected)


def folder_spec_for(root: Path) -> DatasetSpec:
    (root / "classes.txt").write_text("background\na\nb\n")
    return folder_spec(root)


def test_voc_manifest_carries_the_voc_spec_and_voc_members(packed_shards):
    manifest = read_manifest(packed_shards["val"])
    assert manifest["dataset"] == VOC.to_dict() and spec_from_manifest(manifest) == VOC
    import tarfile
    with tarfile.open(packed_shards["dir"] / manifest["shards"][0]["file"]) as tar:
        assert {Path(n).suffix for n in tar.getnames()} == {".jpg", ".png"}
        assert not any(n.endswith(".label.png") for n in tar.getnames())
