"""DeepLab model: structure, parameter parity with VainF, backbone weights, checkpoints."""
import os

import huggingface_hub.constants
import pytest
import timm
import torch
import torchvision
from timm.layers import SeparableConv2d
from torch import nn

from segtrain.checkpoints import CheckpointError, save_checkpoint
from segtrain.model import ASPP_RATES, CONFIG_KEYS, DeepLabHeadV3Plus, build_model, load_checkpoint
from conftest import randomize_batchnorm


def aspp_of(model):
    return model.head.aspp if isinstance(model.head, DeepLabHeadV3Plus) else model.head[0]




@pytest.fixture
def offline_hub(monkeypatch, tmp_path):
    """Any timm hub download fails at once, as on a machine without network and an empty cache."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))


# VainF's counts (ResNet-50, 21 classes, OS16, no aux). The separable one follows from replacing
# each 3x3 conv of the head with depthwise (cin*9) + pointwise (cin*cout) weights.
@pytest.mark.parametrize("arch, separable, expected", [
    ("deeplabv3plus", False, 39_761_845),
    ("deeplabv3", False, 39_638_869),
    ("deeplabv3plus", True, 39_761_845 - 3 * (2048 * 256 * 9 - 2048 * 9 - 2048 * 256)
                                    - (304 * 256 * 9 - 304 * 9 - 304 * 256)),
])
def test_parameter_count_matches_vainf(arch, separable, expected):
    model = build_model(arch, "resnet50", num_classes=21, output_stride=16, separable=separable)
    assert sum(p.numel() for p in model.parameters()) == expected


@pytest.mark.parametrize("arch", ["deeplabv3", "deeplabv3plus"])
@pytest.mark.parametrize("output_stride", [8, 16])
def test_forward_shapes_and_aspp_rates(arch, output_stride):
    model = build_model(arch, "resnet18", num_classes=5, output_stride=output_stride).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 65, 97))
    assert set(out) == {"out"}
    assert out["out"].shape == (2, 5, 65, 97)
    assert model.backbone.feature_info.reduction()[-1] == output_stride
    rates = tuple(aspp_of(model).convs[i][0].dilation[0] for i in (1, 2, 3))
    assert rates == ASPP_RATES[output_stride] == ((6, 12, 18) if output_stride == 16 else (12, 24, 36))


def test_v3plus_fuses_stride4_features_and_aux_reads_penultimate_stage():
    model = build_model("deeplabv3plus", "resnet18", num_classes=4, aux_head=True).eval()
    assert model.head.project[0].in_channels == 64     # resnet18 layer1, stride 4
    assert model.head.aspp.convs[0][0].in_channels == 512   # layer4
    assert model.aux_head[0].in_channels == 256         # layer3, as torchvision's aux classifier
    assert model.aux_head[0].out_channels == 64         # in_ch // 4
    with torch.no_grad():
        out = model(torch.randn(1, 3, 65, 65))
    assert set(out) == {"out", "aux"}
    assert out["aux"].shape == out["out"].shape == (1, 4, 65, 65)


@pytest.mark.parametrize("backbone", ["resnet50d", "convnext_atto", "efficientnet_b0"])
def test_other_timm_backbones_need_no_code_changes(backbone):
    model = build_model("deeplabv3plus", backbone, num_classes=3, aux_head=True).eval()
    info = model.backbone.feature_info
    stride4 = [c for c, r in zip(info.channels(), info.reduction()) if r == 4][-1]
    assert model.head.project[0].in_channels == stride4
    assert model.head.aspp.convs[0][0].in_channels == info.channels()[-1]
    with torch.no_grad():
        out = model(torch.randn(1, 3, 65, 65))
    assert out["out"].shape == out["aux"].shape == (1, 3, 65, 65)


def test_separable_uses_depthwise_convs_in_aspp_and_decoder():
    model = build_model("deeplabv3plus", "resnet18", num_classes=3, output_stride=8, separable=True).eval()
    for i, rate in zip((1, 2, 3), ASPP_RATES[8]):
        conv = model.head.aspp.convs[i][0]
        assert isinstance(conv, SeparableConv2d)
        assert conv.conv_dw.groups == conv.conv_dw.in_channels == 512
        assert conv.conv_dw.dilation == (rate, rate) and conv.conv_dw.padding == (rate, rate)
    assert isinstance(model.head.classifier[0], SeparableConv2d)
    with torch.no_grad():
        assert model(torch.randn(1, 3, 65, 65))["out"].shape == (1, 3, 65, 65)


def test_every_parameter_gets_a_gradient_and_param_groups_partition_the_model():
    # An unused parameter would make DDP fail (or need find_unused_parameters).
    model = build_model("deeplabv3plus", "resnet18", num_classes=3, aux_head=True).train()
    out = model(torch.randn(2, 3, 65, 65))
    (out["out"].sum() + out["aux"].sum()).backward()
    assert all(p.grad is not None for p in model.parameters())
    groups = [list(model.backbone.parameters()), list(model.head.parameters()), list(model.aux_head.parameters())]
    ids = [id(p) for group in groups for p in group]
    assert len(ids) == len(set(ids)) and set(ids) == {id(p) for p in model.parameters()}
    assert build_model("deeplabv3", "resnet18").aux_head is None


def test_model_config_rebuilds_the_same_model():
    model = build_model("deeplabv3", "resnet18", num_classes=7, output_stride=8, separable=True, aux_head=True)
    assert model.model_config == dict(arch="deeplabv3", backbone="resnet18", num_classes=7, output_stride=8,
                                      separable=True, aux_head=True)
    assert set(model.model_config) == set(CONFIG_KEYS)
    rebuilt = build_model(**model.model_config)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}


@pytest.mark.parametrize("kwargs, message", [
    (dict(arch="deeplabv4"), "arch must be one of"),
    (dict(output_stride=32), "output_stride must be 8 or 16"),
    (dict(num_classes=0), "num_classes must be a positive int"),
    (dict(backbone="resnet9000"), "unknown timm backbone 'resnet9000'"),
])
def test_bad_arguments_raise_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_model(**{"backbone": "resnet18", **kwargs})


@pytest.mark.parametrize("source, wrapper", [("timm", "state_dict"), ("timm", "model"), ("torchvision", None)])
def test_backbone_weights_from_local_file(tmp_path, offline_hub, source, wrapper):
    classifier = timm.create_model("resnet18") if source == "timm" else torchvision.models.resnet18()
    randomize_batchnorm(classifier)
    state = classifier.state_dict()
    path = tmp_path / "resnet18.pth"
    torch.save({wrapper: state} if wrapper else state, path)
    # pretrained=True too: the local file must win, with no download attempted (the hub is offline).
    model = build_model("deeplabv3plus", "resnet18", pretrained=True, backbone_weights=path)
    loaded = model.backbone.state_dict()
    assert set(loaded) == {k for k in state if not k.startswith("fc.")}
    assert all(torch.equal(loaded[k], state[k]) for k in loaded)


def test_backbone_weights_that_do_not_fit_name_the_keys(tmp_path):
    path = tmp_path / "resnet34.pth"
    torch.save(torchvision.models.resnet34().state_dict(), path)
    with pytest.raises(CheckpointError, match=r"resnet34\.pth.*unexpected \(\d+\): layer1\.2\.conv1\.weight"):
        build_model("deeplabv3plus", "resnet18", backbone_weights=path)

    state = torchvision.models.resnet18().state_dict()
    state["conv1.weight"] = torch.zeros(64, 3, 3, 3)
    del state["layer4.1.bn2.bias"]
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r"conv1\.weight \(64, 3, 3, 3\) in file vs \(64, 3, 7, 7\) in model"
                                              r".*missing \(1\): layer4\.1\.bn2\.bias"):
        build_model("deeplabv3plus", "resnet18", backbone_weights=path)

    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        build_model("deeplabv3plus", "resnet18", backbone_weights=tmp_path / "nowhere.pth")


def test_pretrained_without_network_says_how_to_fix_it(offline_hub):
    with pytest.raises(RuntimeError, match="could not download pretrained weights for backbone 'resnet18'") as info:
        build_model("deeplabv3plus", "resnet18", pretrained=True)
    assert all(fix in str(info.value) for fix in ("--backbone-weights PATH", "HF_HUB_OFFLINE", "--pretrained false"))
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_checkpoint_round_trip_is_exact_and_atomic(tmp_path):
    model = build_model("deeplabv3plus", "resnet18", num_classes=4, output_stride=8, aux_head=True)
    randomize_batchnorm(model)
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, model, step=3, best_miou=0.5, optimizer={"lr": torch.tensor(0.01)})
    assert os.listdir(tmp_path) == ["ckpt.pt"]  # the temporary file was renamed, none left behind

    loaded, ckpt = load_checkpoint(path)
    assert loaded.model_config == model.model_config
    assert ckpt["step"] == 3 and ckpt["best_miou"] == 0.5 and ckpt["model_config"] == model.model_config
    x = torch.randn(1, 3, 65, 65)
    model.eval(), loaded.eval()
    with torch.no_grad():
        a, b = model(x), loaded(x)
    assert torch.equal(a["out"], b["out"]) and torch.equal(a["aux"], b["aux"])


def test_save_checkpoint_wants_the_bare_model(tmp_path):
    with pytest.raises(TypeError, match="unwrap"):
        save_checkpoint(tmp_path / "c.pt", nn.DataParallel(build_model("deeplabv3", "resnet18")))


def test_other_class_count_reinitialises_only_the_classifiers(tmp_path):
    model = build_model("deeplabv3plus", "resnet18", num_classes=21, aux_head=True)
    randomize_batchnorm(model)
    path = tmp_path / "voc.pt"
    save_checkpoint(path, model)
    with pytest.warns(UserWarning, match=r"voc\.pt: checkpoint has 21 classes, model has 3: classifier layers "
                                         r"re-initialised \(aux_head\.4\.bias, aux_head\.4\.weight, "
                                         r"head\.classifier\.3\.bias, head\.classifier\.3\.weight\)"):
        loaded, _ = load_checkpoint(path, num_classes=3)
    assert loaded.model_config["num_classes"] == 3
    old, new = model.state_dict(), loaded.state_dict()
    reinit = loaded.classifier_keys()
    assert new["head.classifier.3.weight"].shape == (3, 256, 1, 1)
    assert all(torch.equal(new[k], old[k]) for k in new if k not in reinit)
    with torch.no_grad():
        assert loaded.eval()(torch.randn(1, 3, 65, 65))["out"].shape == (1, 3, 65, 65)


def test_unusable_checkpoints_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"missing\.pt: no such checkpoint file"):
        load_checkpoint(tmp_path / "missing.pt")

    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"this is not a torch file" * 10)
    with pytest.raises(CheckpointError, match=r"corrupt\.pt: not a readable PyTorch weights file"):
        load_checkpoint(corrupt)

    model = build_model("deeplabv3plus", "resnet18", num_classes=3)
    bare = tmp_path / "bare.pt"
    torch.save({"model": model.state_dict()}, bare)
    with pytest.raises(CheckpointError, match=r"bare\.pt: checkpoint has no 'model_config'"):
        load_checkpoint(bare)
    torch.save(model.state_dict(), bare)
    with pytest.raises(CheckpointError, match=r"bare\.pt: not a segtrain checkpoint"):
        load_checkpoint(bare)

    state = model.state_dict()
    state["head.project.0.weight"] = torch.zeros(48, 32, 1, 1)
    wrong = tmp_path / "wrong.pt"
    torch.save({"model": state, "model_config": model.model_config}, wrong)
    with pytest.raises(CheckpointError, match=r"wrong\.pt: .*wrong shape \(1\): head\.project\.0\.weight "
                                              r"\(48, 32, 1, 1\) in file vs \(48, 64, 1, 1\) in model"):
        load_checkpoint(wrong)
