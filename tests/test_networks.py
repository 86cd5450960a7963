"""The three classifiers: shapes, Grad-CAM layers, freezing, weight loading (local file, offline ImageNet)."""

from __future__ import annotations

import urllib.error

import pytest
import torch
import torchvision
from torch import nn

from cxr_monai.errors import WeightsError
from cxr_monai.networks import (
    BACKBONES,
    CXRClassifier,
    build_network,
    freeze_backbone,
    load_pretrained,
    unfreeze_top,
)


@pytest.fixture(scope="module")
def networks() -> dict[str, CXRClassifier]:
    torch.manual_seed(0)
    return {name: build_network(name) for name in BACKBONES}


@pytest.mark.parametrize("backbone", BACKBONES)
def test_logits_shape_and_paper_head(networks: dict[str, CXRClassifier], backbone: str) -> None:
    net = networks[backbone].eval()
    assert net.backbone_name == backbone
    with torch.no_grad():
        logits = net(torch.randn(2, 3, 64, 64))
    assert logits.shape == (2, 3)
    kinds = [type(m) for m in net.head]
    assert kinds == [nn.AdaptiveAvgPool2d, nn.Flatten, nn.Linear, nn.ReLU, nn.Dropout, nn.Linear]
    assert net.head[2].out_features == 64 and net.head[4].p == 0.5 and net.head[5].out_features == 3


def test_gradcam_layers_are_the_documented_ones(networks: dict[str, CXRClassifier]) -> None:
    vgg, resnet, effnet = (networks[name] for name in BACKBONES)
    assert vgg.gradcam_layer is vgg.trunk.features[28]
    assert isinstance(vgg.gradcam_layer, nn.Conv2d) and vgg.gradcam_layer.out_channels == 512
    assert resnet.gradcam_layer is resnet.trunk.layer4
    assert effnet.gradcam_layer is effnet.trunk.features[8]


@pytest.mark.parametrize("backbone", BACKBONES)
def test_gradient_reaches_the_gradcam_layer_output(networks: dict[str, CXRClassifier], backbone: str) -> None:
    """An in-place activation after the hooked layer would make this backward fail (VGG16's ReLU)."""
    net = networks[backbone].eval()
    assert not any(getattr(m, "inplace", False) for m in net.modules())
    captured: list[torch.Tensor] = []
    handle = net.gradcam_layer.register_forward_hook(lambda _m, _i, out: captured.append(out))
    try:
        logits = net(torch.randn(1, 3, 64, 64))
    finally:
        handle.remove()
    (grad,) = torch.autograd.grad(logits[0, 0], captured[0])
    assert grad.shape == captured[0].shape and grad.abs().sum() > 0


def test_unknown_backbone_is_refused() -> None:
    with pytest.raises(ValueError, match="densenet121"):
        build_network("densenet121")


def _trunk_state(net: CXRClassifier) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in net.trunk.state_dict().items()}


def test_frozen_trunk_keeps_weights_and_batchnorm_statistics() -> None:
    torch.manual_seed(0)
    net = build_network("efficientnet_b0")
    freeze_backbone(net)
    before_trunk = _trunk_state(net)
    before_head = [p.detach().clone() for p in net.head.parameters()]
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)  # all parameters, as the bundle does
    net.train()
    assert all(not m.training for m in net.trunk.modules() if isinstance(m, nn.BatchNorm2d))
    for _ in range(2):
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(net(torch.randn(4, 3, 64, 64)), torch.tensor([0, 1, 2, 0]))
        loss.backward()
        optimizer.step()
    after = net.trunk.state_dict()
    assert all(torch.equal(before_trunk[k], after[k]) for k in before_trunk)  # incl. running_mean/var
    assert any(not torch.equal(b, p) for b, p in zip(before_head, net.head.parameters(), strict=True))


def test_unfreeze_top_blocks_only() -> None:
    net = build_network("efficientnet_b0")
    unfreeze_top(net, 2)
    blocks = net.trunk_blocks()
    trainable = [all(p.requires_grad for p in b.parameters()) for b in blocks]
    frozen = [not any(p.requires_grad for p in b.parameters()) for b in blocks]
    assert trainable[-2:] == [True, True] and all(frozen[:-2])
    net.train()
    top_bn = [m for m in blocks[-1].modules() if isinstance(m, nn.BatchNorm2d)]
    low_bn = [m for m in blocks[0].modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(m.training for m in top_bn) and not any(m.training for m in low_bn)
    assert (
        len(build_network("vgg16").trunk_blocks()) == 5 and len(build_network("resnet50").trunk_blocks()) == 5
    )


def test_local_torchvision_weights_end_up_in_the_trunk(tmp_path) -> None:
    torch.manual_seed(1)
    reference = torchvision.models.efficientnet_b0(weights=None).state_dict()
    path = tmp_path / "effb0.pth"
    torch.save(reference, path)
    net = build_network("efficientnet_b0")
    head_before = [p.detach().clone() for p in net.head.parameters()]
    load_pretrained(net, str(path))
    loaded = net.trunk.state_dict()
    assert loaded.keys() <= reference.keys()
    assert all(torch.equal(loaded[k], reference[k]) for k in loaded)
    assert all(torch.equal(b, p) for b, p in zip(head_before, net.head.parameters(), strict=True))


def test_weights_of_another_backbone_are_refused(tmp_path) -> None:
    path = tmp_path / "vgg.pth"
    torch.save(build_network("vgg16").trunk.state_dict(), path)
    with pytest.raises(WeightsError, match="not a efficientnet_b0 state_dict"):
        load_pretrained(build_network("efficientnet_b0"), path)


def test_missing_or_unreadable_weights_file(tmp_path) -> None:
    net = build_network("efficientnet_b0")
    with pytest.raises(WeightsError, match="does not exist"):
        load_pretrained(net, tmp_path / "absent.pth")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="not a PyTorch weights file"):
        load_pretrained(net, junk)


def test_offline_imagenet_names_both_remedies(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # nothing cached

    def offline(*args, **kwargs):
        raise urllib.error.URLError("Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(WeightsError) as info:
        load_pretrained(build_network("resnet50"), "imagenet")
    message = str(info.value)
    assert "internet" in message and "pretrained: /path/to/weights.pth" in message
