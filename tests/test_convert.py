"""Checkpoint conversion from torchvision and VainF layouts: same outputs as the source model."""
import functools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from segtrain.convert import convert_checkpoint, main
from segtrain.checkpoints import CheckpointError
from segtrain.model import load_checkpoint
from conftest import randomize_batchnorm




@pytest.fixture(scope="module")
def torchvision_file(tmp_path_factory):
    model = torchvision.models.segmentation.deeplabv3_resnet50(
        weights=None, weights_backbone=None, num_classes=21, aux_loss=True)
    randomize_batchnorm(model)
    path = tmp_path_factory.mktemp("tv") / "deeplabv3_resnet50.pth"
    torch.save(model.state_dict(), path)
    return model.eval(), path


def test_torchvision_conversion_gives_the_same_outputs(torchvision_file, tmp_path, capsys):
    source, path = torchvision_file
    dst = tmp_path / "converted.pt"
    assert main(["--from", "torchvision", str(path), "--out", str(dst)]) == 0
    assert "deeplabv3 resnet50, output stride 8, 21 classes" in capsys.readouterr().out

    model, ckpt = load_checkpoint(dst)
    assert ckpt["model_config"] == dict(arch="deeplabv3", backbone="resnet50", num_classes=21,
                                        output_stride=8, separable=False, aux_head=True)
    # At this input size the atrous taps fall outside the tiny feature map, so compare the rates directly.
    for ours, theirs in zip(model.head[0].convs[1:4], source.classifier[0].convs[1:4]):
        assert ours[0].dilation == theirs[0].dilation and ours[0].padding == theirs[0].padding
    x = torch.randn(1, 3, 65, 97, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with torch.no_grad():  # float64, so the comparison is not blurred by float32 summation order
        expected, got = source.double()(x), model.eval().double()(x)
    source.float()
    for key in ("out", "aux"):
        assert expected[key].abs().mean() > 0.1
        torch.testing.assert_close(got[key], expected[key], atol=1e-5, rtol=0)


def test_torchvision_rejects_output_stride_16(torchvision_file, tmp_path, capsys):
    _, path = torchvision_file
    with pytest.raises(SystemExit, match="2"):
        main(["--from", "torchvision", str(path), "--out", str(tmp_path / "x.pt"), "--output-stride", "16"])
    assert "output stride 8" in capsys.readouterr().err
    assert not (tmp_path / "x.pt").exists()


def test_other_class_count_reinitialises_the_classifier(torchvision_file, tmp_path, capsys):
    _, path = torchvision_file
    dst = tmp_path / "five.pt"
    assert main(["--from", "torchvision", str(path), "--out", str(dst), "--num-classes", "5"]) == 0
    assert "checkpoint has 21 classes, model has 5: classifier layers re-initialised" in capsys.readouterr().err
    model, _ = load_checkpoint(dst)
    state = model.state_dict()
    assert state["head.4.weight"].shape == (5, 256, 1, 1) and state["aux_head.4.weight"].shape == (5, 256, 1, 1)
    source = torch.load(path, weights_only=True)
    assert torch.equal(state["head.0.project.0.weight"], source["classifier.0.project.0.weight"])
    assert torch.equal(state["backbone.layer4.2.bn3.running_var"], source["backbone.layer4.2.bn3.running_var"])


# ---- VainF ----------------------------------------------------------------------------------
# VainF's code cannot be installed here, so its layout is written out below from
# VainF/DeepLabV3Plus-Pytorch network/_deeplab.py (ASPP, ASPPConv, ASPPPooling, DeepLabHead,
# DeepLabHeadV3Plus, AtrousSeparableConvolution, convert_to_separable_conv), network/modeling.py
# (_segm_resnet: layer1 -> 'low_level', layer4 -> 'out', rates 6/12/18 at OS16 and 12/24/36 at OS8)
# and network/backbone/resnet.py (torchvision's ResNet), and `vainf_reference` computes its
# forward pass from those keys alone.

def vainf_head_shapes(arch: str, separable: bool, num_classes: int) -> dict[str, tuple]:
    shapes = {}

    def conv(key, cin, cout, k):
        if separable and k == 3:  # AtrousSeparableConvolution.body = depthwise, pointwise (no bias)
            shapes[f"{key}.body.0.weight"] = (cin, 1, 3, 3)
            shapes[f"{key}.body.1.weight"] = (cout, cin, 1, 1)
        else:
            shapes[f"{key}.weight"] = (cout, cin, k, k)

    def bn(key, c):
        shapes.update({f"{key}.{p}": (c,) for p in ("weight", "bias", "running_mean", "running_var")})
        shapes[f"{key}.num_batches_tracked"] = ()

    aspp = "classifier.aspp" if arch == "deeplabv3plus" else "classifier.classifier.0"
    conv(f"{aspp}.convs.0.0", 2048, 256, 1), bn(f"{aspp}.convs.0.1", 256)
    for i in (1, 2, 3):
        conv(f"{aspp}.convs.{i}.0", 2048, 256, 3), bn(f"{aspp}.convs.{i}.1", 256)
    conv(f"{aspp}.convs.4.1", 2048, 256, 1), bn(f"{aspp}.convs.4.2", 256)  # 4.0 is the AdaptiveAvgPool2d
    conv(f"{aspp}.project.0", 1280, 256, 1), bn(f"{aspp}.project.1", 256)
    if arch == "deeplabv3plus":
        conv("classifier.project.0", 256, 48, 1), bn("classifier.project.1", 48)
        conv("classifier.classifier.0", 304, 256, 3), bn("classifier.classifier.1", 256)
        final = "classifier.classifier.3"
    else:
        conv("classifier.classifier.1", 256, 256, 3), bn("classifier.classifier.2", 256)
        final = "classifier.classifier.4"
    shapes[f"{final}.weight"], shapes[f"{final}.bias"] = (num_classes, 256, 1, 1), (num_classes,)
    return shapes


@functools.lru_cache(maxsize=1)
def resnet50_backbone_state() -> dict:
    resnet = torchvision.models.resnet50()
    randomize_batchnorm(resnet)
    return {f"backbone.{k}": v for k, v in resnet.state_dict().items() if not k.startswith("fc.")}


def make_vainf_state(arch: str, separable: bool, num_classes: int = 21, seed: int = 0) -> dict:
    state = dict(resnet50_backbone_state())
    g = torch.Generator().manual_seed(seed)
    for key, shape in vainf_head_shapes(arch, separable, num_classes).items():
        if key.endswith("num_batches_tracked"):
            value = torch.tensor(100)
        elif key.endswith(("running_var", "bn.weight")) or (key.endswith("weight") and len(shape) == 1):
            value = torch.rand(shape, generator=g) + 0.5
        elif len(shape) == 4:  # conv weight, He-scaled so activations stay O(1)
            value = torch.randn(shape, generator=g) * math.sqrt(2 / math.prod(shape[1:]))
        else:
            value = torch.randn(shape, generator=g) * 0.1
        state[key] = value
    return state


def vainf_reference(state: dict, x: torch.Tensor, output_stride: int) -> torch.Tensor:
    """VainF's eval forward computed directly from its state dict."""
    resnet = torchvision.models.resnet50(replace_stride_with_dilation=[False, output_stride == 8, True])
    missing, unexpected = resnet.load_state_dict(
        {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}, strict=False)
    assert set(missing) == {"fc.weight", "fc.bias"} and not unexpected
    resnet = resnet.double().eval()
    s = {k: v.double() if v.is_floating_point() else v for k, v in state.items()}

    def conv(key, t, dilation=1):
        if f"{key}.body.0.weight" in s:
            dw = s[f"{key}.body.0.weight"]
            t = F.conv2d(t, dw, padding=dilation, dilation=dilation, groups=dw.shape[0])
            return F.conv2d(t, s[f"{key}.body.1.weight"])
        w = s[f"{key}.weight"]
        return F.conv2d(t, w, s.get(f"{key}.bias"), padding=dilation * (w.shape[-1] // 2), dilation=dilation)

    def bn_relu(key, t):
        return F.relu(F.batch_norm(t, s[f"{key}.running_mean"], s[f"{key}.running_var"],
                                   s[f"{key}.weight"], s[f"{key}.bias"], training=False, eps=1e-5))

    low = resnet.layer1(resnet.maxpool(resnet.relu(resnet.bn1(resnet.conv1(x)))))
    deep = resnet.layer4(resnet.layer3(resnet.layer2(low)))
    plus = "classifier.project.0.weight" in s
    a = "classifier.aspp" if plus else "classifier.classifier.0"
    rates = (6, 12, 18) if output_stride == 16 else (12, 24, 36)
    branches = [bn_relu(f"{a}.convs.0.1", conv(f"{a}.convs.0.0", deep))]
    branches += [bn_relu(f"{a}.convs.{i}.1", conv(f"{a}.convs.{i}.0", deep, r)) for i, r in zip((1, 2, 3), rates)]
    pooled = bn_relu(f"{a}.convs.4.2", conv(f"{a}.convs.4.1", deep.mean((2, 3), keepdim=True)))
    branches.append(F.interpolate(pooled, size=deep.shape[-2:], mode="bilinear", align_corners=False))
    y = bn_relu(f"{a}.project.1", conv(f"{a}.project.0", torch.cat(branches, 1)))
    if plus:
        low = bn_relu("classifier.project.1", conv("classifier.project.0", low))
        y = F.interpolate(y, size=low.shape[-2:], mode="bilinear", align_corners=False)
        y = bn_relu("classifier.classifier.1", conv("classifier.classifier.0", torch.cat([low, y], 1)))
        y = conv("classifier.classifier.3", y)
    else:
        y = conv("classifier.classifier.4", bn_relu("classifier.classifier.2", conv("classifier.classifier.1", y)))
    return F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False)


@pytest.mark.parametrize("arch, separable, output_stride, file_name, flag", [
    ("deeplabv3plus", False, 16, "best_deeplabv3plus_resnet50_voc_os16.pth", None),
    ("deeplabv3plus", True, 8, "best_deeplabv3plus_resnet50_voc_os8.pth", None),
    ("deeplabv3", False, 8, "vainf_v3.pth", 8),  # no stride in the name: given by the flag
])
def test_vainf_conversion_gives_the_same_outputs(tmp_path, arch, separable, output_stride, file_name, flag):
    state = make_vainf_state(arch, separable)
    src = tmp_path / file_name
    # As VainF's main.py saves it; best_score is a numpy float there.
    torch.save({"cur_itrs": 30000, "model_state": state, "best_score": np.float64(0.77)}, src)
    dst = tmp_path / "converted.pt"
    argv = ["--from", "vainf", str(src), "--out", str(dst)] + (["--output-stride", str(flag)] if flag else [])
    assert main(argv) == 0

    model, ckpt = load_checkpoint(dst)
    assert ckpt["model_config"] == dict(arch=arch, backbone="resnet50", num_classes=21,
                                        output_stride=output_stride, separable=separable, aux_head=False)
    # At this input size the atrous taps fall outside the tiny feature map, so check the rates directly.
    rates = (6, 12, 18) if output_stride == 16 else (12, 24, 36)
    aspp = model.head.aspp if arch == "deeplabv3plus" else model.head[0]
    convs = [aspp.convs[i][0].conv_dw if separable else aspp.convs[i][0] for i in (1, 2, 3)]
    assert [c.dilation[0] for c in convs] == [c.padding[0] for c in convs] == list(rates)
    x = torch.randn(1, 3, 65, 65, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    with torch.no_grad():
        expected = vainf_reference(state, x, output_stride)
        got = model.eval().double()(x)["out"]
    assert expected.abs().mean() > 0.1
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_vainf_dataparallel_prefix_and_class_change(tmp_path):
    state = {f"module.{k}": v for k, v in make_vainf_state("deeplabv3plus", False, num_classes=19).items()}
    src = tmp_path / "cityscapes_os16.pth"
    torch.save({"model_state": state}, src)
    with pytest.warns(UserWarning, match="checkpoint has 19 classes, model has 21: classifier layers re-initialised"):
        model = convert_checkpoint("vainf", src, tmp_path / "voc.pt", num_classes=21)
    assert model.model_config["num_classes"] == 21
    assert torch.equal(model.state_dict()["head.aspp.project.0.weight"], state["module.classifier.aspp.project.0.weight"])


def test_bad_sources_give_clear_errors(tmp_path, torchvision_file, capsys):
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"\x00garbage" * 100)
    with pytest.raises(SystemExit, match="2"):
        main(["--from", "vainf", str(corrupt), "--out", str(tmp_path / "out.pt")])
    assert f"segtrain: error: {corrupt}: not a readable PyTorch weights file" in capsys.readouterr().err

    _, tv_path = torchvision_file
    with pytest.raises(CheckpointError, match=r"deeplabv3_resnet50\.pth: not a VainF DeepLabV3/V3\+ checkpoint"):
        convert_checkpoint("vainf", tv_path, tmp_path / "out.pt")

    state = make_vainf_state("deeplabv3plus", False)
    state["classifier.aspp.project.0.weight"] = torch.zeros(256, 1024, 1, 1)
    wrong = tmp_path / "wrong_os16.pth"
    torch.save({"model_state": state}, wrong)
    with pytest.raises(CheckpointError, match=r"wrong_os16\.pth: .*head\.aspp\.project\.0\.weight "
                                              r"\(256, 1024, 1, 1\) in file vs \(256, 1280, 1, 1\) in model"):
        convert_checkpoint("vainf", wrong, tmp_path / "out.pt")
    assert not (tmp_path / "out.pt").exists()
