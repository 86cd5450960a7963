"""DenseNet-121 in TorchXRayVision's layout: its chest-X-ray weights load from a local file and the
network computes what TorchXRayVision's own DenseNet computes on the same film."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from PIL import Image

from cxr_monai.constants import IMAGENET_MEAN, IMAGENET_STD
from cxr_monai.errors import WeightsError
from cxr_monai.networks import XRV_EXPORT_COMMAND, build_network, load_pretrained, unfreeze_top
from cxr_monai.transforms import inference_transforms

BACKBONE = "densenet121_xrv"


@pytest.fixture(scope="module")
def xrv_reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, str]:
    """TorchXRayVision's DenseNet with seeded random weights (its published ones need the internet) and
    their state_dict saved as a site would save the published ones (``XRV_EXPORT_COMMAND``)."""
    xrv = pytest.importorskip("torchxrayvision")
    torch.manual_seed(0)
    reference = xrv.models.DenseNet(weights=None).eval()
    for module in reference.modules():  # non-trivial BatchNorm statistics, so a swapped key would show
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 1.5)
    path = tmp_path_factory.mktemp("xrv") / "xrv_densenet121.pt"
    torch.save(reference.state_dict(), path)
    return reference, str(path)


def _film(tmp_path) -> tuple[str, np.ndarray]:
    """A 64 x 64 8-bit grey film with structure (a ramp and a bright disc); its path and pixels."""
    yy, xx = np.mgrid[0:64, 0:64]
    pixels = ((xx * 3 + yy) % 256).astype(np.uint8)
    pixels[(yy - 30) ** 2 + (xx - 20) ** 2 < 100] = 255
    path = tmp_path / "film.png"
    Image.fromarray(pixels).save(path)
    return str(path), pixels


def test_xrv_weights_from_a_file_give_torchxrayvision_s_features(xrv_reference, tmp_path) -> None:
    """Through the project's pre-processing, the loaded trunk's pooled features equal TorchXRayVision's
    ``features2`` on the film scaled its way ((2 v / 255 - 1) * 1024, one channel): key names, the
    1-channel stem, the input scale and the final ReLU all agree."""
    reference, weights = xrv_reference
    net = build_network(BACKBONE)
    head_before = [p.clone() for p in net.head.parameters()]
    load_pretrained(net, weights)
    net.eval()
    path, pixels = _film(tmp_path)
    network_input = torch.as_tensor(inference_transforms(spatial_size=64)(path))[None]
    # the chain's min-max scaling to [0, 1], ImageNet-normalised: undone, it is the film
    unit = network_input[0, 0].double() * IMAGENET_STD[0] + IMAGENET_MEAN[0]
    np.testing.assert_allclose(unit.numpy(), pixels / pixels.max(), atol=1e-6)
    xrv_input = ((2.0 * unit - 1.0) * 1024.0)[None, None]
    # both networks in float64 on the same input: in float32, sums over 1,024 channels in another order
    # differed by up to 3e-4 between machines. In float64 the largest difference measured here is 4e-5
    # absolute, 1.1e-6 relative (features up to ~40); the tolerance leaves a tenfold margin over that
    with torch.no_grad():
        expected = copy.deepcopy(reference).double().features2(xrv_input)
        got = copy.deepcopy(net).double().head[:2](net.double().trunk(network_input.double()))
    assert expected.abs().max() > 0.1  # a real comparison, not two zero vectors
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert all(torch.equal(b, p) for b, p in zip(head_before, net.head.parameters(), strict=True))


def test_xrv_imagenet_is_refused_with_the_export_command() -> None:
    with pytest.raises(WeightsError, match="no ImageNet weights") as error:
        load_pretrained(build_network(BACKBONE), "imagenet")
    assert XRV_EXPORT_COMMAND in str(error.value)


def test_xrv_file_of_another_backbone_is_refused(tmp_path) -> None:
    path = tmp_path / "resnet.pt"
    torch.save(build_network("resnet50").trunk.state_dict(), path)
    with pytest.raises(WeightsError, match="not a densenet121_xrv state_dict"):
        load_pretrained(build_network(BACKBONE), str(path))


def test_xrv_fine_tuning_unfreezes_dense_block_4_then_3() -> None:
    net = build_network(BACKBONE)
    features = net.trunk.features
    unfreeze_top(net, 1)
    assert all(p.requires_grad for p in features.denseblock4.parameters())
    assert all(p.requires_grad for p in features.norm5.parameters())
    assert not any(p.requires_grad for p in features.transition3.parameters())
    unfreeze_top(net, 2)
    assert all(p.requires_grad for p in features.denseblock3.parameters())
    assert not any(p.requires_grad for p in features.denseblock2.parameters())
    assert not any(p.requires_grad for p in features.conv0.parameters())
