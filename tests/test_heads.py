"""The head interface: a head is one class plus one HEADS entry; DeepLab, fine-tuning and
checkpoint conversion reach its classifier through ``classifier_path``."""
import pytest
import torch
from torch import nn

from segtrain import model as model_module
from segtrain.checkpoints import save_checkpoint
from segtrain.model import HEADS, Head, build_model


class TinyFPNHead(Head, nn.Module):
    """A head that reads two levels (not DeepLab's), to show the interface is all DeepLab needs."""

    classifier_path = "out"

    def __init__(self, feature_info, num_classes, separable=False):
        super().__init__()
        channels = feature_info.channels()
        self.lateral = nn.Conv2d(channels[-2], 8, 1)
        self.top = nn.Conv2d(channels[-1], 8, 1)
        self.out = nn.Conv2d(8, num_classes, 1)

    def forward(self, features):
        top = nn.functional.interpolate(self.top(features[-1]), size=features[-2].shape[-2:])
        return self.out(self.lateral(features[-2]) + top)


def test_a_new_head_is_one_class_and_one_entry(monkeypatch, tmp_path):
    monkeypatch.setitem(HEADS, "tinyfpn", TinyFPNHead)
    model = build_model("tinyfpn", "resnet18", num_classes=3).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 65, 65))["out"].shape == (1, 3, 65, 65)
    assert model.classifier_keys() == {"head.out.weight", "head.out.bias"}
    path = tmp_path / "fpn.pt"
    save_checkpoint(path, model)
    with pytest.warns(UserWarning, match=r"classifier layers re-initialised \(head\.out\.bias, head\.out\.weight\)"):
        loaded, _ = model_module.load_checkpoint(path, num_classes=5)
    assert loaded.head.classifier_conv.out_channels == 5


@pytest.mark.parametrize("arch", sorted(HEADS))
def test_classifier_path_names_the_layer_whose_shape_is_the_class_count(arch):
    model = build_model(arch, "resnet18", num_classes=7)
    conv = model.head.classifier_conv
    assert isinstance(conv, nn.Conv2d) and conv.out_channels == 7 and conv.kernel_size == (1, 1)
    assert model.state_dict()[f"head.{HEADS[arch].classifier_path}.weight"] is not None


def test_v3plus_refuses_a_backbone_without_stride_4_features():
    class NoStride4:
        def channels(self):
            return [64, 128]

        def reduction(self):
            return [8, 16]

    with pytest.raises(ValueError, match="no stride-4 features"):
        HEADS["deeplabv3plus"](NoStride4(), 3)
