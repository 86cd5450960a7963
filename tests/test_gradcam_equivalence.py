"""Our Grad-CAM equals Captum's plain ``LayerGradCam`` for every backbone.

:class:`cxr_monai.explain.gradcam.GradCAM` records autograd only from the hooked layer on and takes the
prediction and the map from one forward pass; neither shortcut may change the map. The reference here is
Captum used the textbook way: ``LayerGradCam(model, layer).attribute(x, target=idx, relu_attributions=True)``
on the model itself, upsampled with ``LayerAttribution.interpolate(..., interpolate_mode="bilinear")``.
Random weights, eval mode, 64 px, batch 2; once with a trainable trunk and once with the trunk frozen
(a fine-tuned bundle's state: the hooked layer's parameters then need no gradient).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from captum.attr import LayerAttribution, LayerGradCam

from cxr_monai.constants import BACKBONES, NUM_CLASSES
from cxr_monai.explain.gradcam import GradCAM
from cxr_monai.networks import CXRClassifier, build_network, freeze_backbone

SIZE = 64
RTOL = 1e-5


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def captum_reference(model: CXRClassifier, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(B, S, S) Grad-CAM of ``target`` (B,) by Captum on the plain model."""
    cam = LayerGradCam(model, model.gradcam_layer)
    attributions = cam.attribute(x, target=target, relu_attributions=True)
    upsampled = LayerAttribution.interpolate(attributions, tuple(x.shape[-2:]), interpolate_mode="bilinear")
    return upsampled[:, 0].detach()


def assert_same_map(ours: torch.Tensor, reference: torch.Tensor) -> None:
    """Equal within RTOL of the reference's scale (maps are ReLU'd, so zeros need an absolute floor)."""
    scale = float(reference.abs().max())
    assert scale > 0.0, "reference map is all zero: the comparison would be vacuous"
    torch.testing.assert_close(ours, reference, rtol=RTOL, atol=RTOL * scale)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_gradcam_equals_plain_captum(backbone: str) -> None:
    torch.manual_seed(0)
    model = build_network(backbone).eval()
    x = torch.randn(2, 3, SIZE, SIZE)
    for frozen in (False, True):
        if frozen:
            freeze_backbone(model)
        with torch.no_grad():
            logits = model(x)
        predicted = logits.argmax(dim=1)

        out = GradCAM(model)(x)  # explains each image's predicted class
        assert out.target_indices.tolist() == predicted.tolist()
        torch.testing.assert_close(
            torch.from_numpy(out.probabilities), torch.softmax(logits, dim=1), rtol=RTOL, atol=1e-7
        )
        assert_same_map(torch.from_numpy(out.maps), captum_reference(model, x, predicted))

        # An explicit class: the map for every image, whichever class it predicts. Of the three classes
        # at least one gives a non-zero ReLU'd map for these weights (asserted in assert_same_map).
        nonzero = 0
        for idx in range(NUM_CLASSES):
            target = torch.full((2,), idx, dtype=torch.long)
            reference = captum_reference(model, x, target)
            if float(reference.max()) == 0.0:
                continue
            nonzero += 1
            ours = GradCAM(model)(x, target=idx)
            assert out.maps.shape == (2, SIZE, SIZE)
            assert ours.target_indices.tolist() == [idx, idx]
            assert_same_map(torch.from_numpy(ours.maps), reference)
        assert nonzero > 0
