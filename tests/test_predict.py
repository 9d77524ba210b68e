"""segtrain.predict: palette PNGs that decode to the model's prediction, overlays, skipping bad files."""
import numpy as np
import pytest
import torch
from PIL import Image

from segtrain.inference import ms_flip_logits
from segtrain.checkpoints import save_checkpoint
from segtrain.model import build_model, load_checkpoint
from segtrain.predict import main
from segtrain.transforms import val_transforms
from segtrain.visualize import overlay
from segtrain.voc import PALETTE


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    """A random resnet18 checkpoint and a folder with two good images, a corrupt one and a text file."""
    tmp = tmp_path_factory.mktemp("predict")
    torch.manual_seed(0)
    save_checkpoint(tmp / "ckpt.pt", build_model(backbone="resnet18", pretrained=False))
    images = tmp / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    # Smooth random colour fields, so a random model predicts several classes, not one.
    for name, (h, w) in {"b_photo.jpg": (40, 52), "a_drawing.png": (45, 37)}.items():
        small = rng.integers(0, 256, (5, 5, 3), dtype=np.uint8)
        Image.fromarray(small).resize((w, h), Image.BILINEAR).save(images / name)
    (images / "c_broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (images / "notes.txt").write_text("not an image")
    return {"tmp": tmp, "ckpt": tmp / "ckpt.pt", "images": images}


def reference_prediction(ckpt, path, tta=False) -> np.ndarray:
    """The model run directly, on the evaluation transforms' input."""
    model, _ = load_checkpoint(ckpt)
    model.eval()
    image = Image.open(path).convert("RGB")
    x, _ = val_transforms("whole")(image, np.zeros(image.size[::-1], np.uint8))
    with torch.inference_mode():
        logits = ms_flip_logits(model, x[None]) if tta else model(x[None])["out"]
    return logits[0].argmax(0).numpy()


def test_folder_writes_palette_pngs_of_the_prediction_and_skips_corrupt(setup, capsys):
    out = setup["tmp"] / "out"
    # fp32: compared with an fp32 reference below (auto is bf16 on CPUs with native bf16)
    main(["--checkpoint", str(setup["ckpt"]), "--input", str(setup["images"]), "--out", str(out),
          "--mixed-precision", "no"])
    captured = capsys.readouterr()
    assert "2 written, 1 skipped" in captured.out
    warnings = [line for line in captured.err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "c_broken.jpg" in warnings[0]
    assert sorted(p.name for p in out.iterdir()) == [
        "a_drawing.png", "a_drawing_overlay.jpg", "b_photo.png", "b_photo_overlay.jpg"]

    for stem, source in (("a_drawing", "a_drawing.png"), ("b_photo", "b_photo.jpg")):
        label = Image.open(out / f"{stem}.png")
        assert label.mode == "P" and label.getpalette() == PALETTE
        expected = reference_prediction(setup["ckpt"], setup["images"] / source)
        assert len(np.unique(expected)) > 1  # a comparison that could fail
        np.testing.assert_array_equal(np.array(label), expected)
        assert Image.open(out / f"{stem}_overlay.jpg").size == label.size


def test_single_image_with_ms_flip(setup, capsys):
    out = setup["tmp"] / "out_tta"
    path = setup["images"] / "b_photo.jpg"
    main(["--checkpoint", str(setup["ckpt"]), "--input", str(path), "--out", str(out),
          "--protocol", "ms-flip", "--overlay-format", "png", "--mixed-precision", "no"])
    assert "1 written, 0 skipped" in capsys.readouterr().out
    expected = reference_prediction(setup["ckpt"], path, tta=True)
    np.testing.assert_array_equal(np.array(Image.open(out / "b_photo.png")), expected)
    np.testing.assert_array_equal(np.array(Image.open(out / "b_photo_overlay.png")),
                                  overlay(np.array(Image.open(path).convert("RGB")), expected, 0.5))


def test_nothing_written_or_missing_checkpoint_fail(setup, capsys):
    broken = setup["tmp"] / "only_broken"
    broken.mkdir()
    (broken / "x.png").write_bytes(b"garbage")
    with pytest.raises(SystemExit) as exit_info:
        main(["--checkpoint", str(setup["ckpt"]), "--input", str(broken), "--out", str(setup["tmp"] / "o2")])
    assert exit_info.value.code != 0
    assert "0 written, 1 skipped" in capsys.readouterr().out

    with pytest.raises(SystemExit) as exit_info:
        main(["--checkpoint", str(setup["tmp"] / "nope.pt"), "--input", str(setup["images"]),
              "--out", str(setup["tmp"] / "o3")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("segtrain: error: ") and "nope.pt" in err and "\n" not in err

