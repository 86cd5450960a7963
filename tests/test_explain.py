"""Grad-CAM core: Captum call, batching, targets, hooks, normalisation, the map back to the original grid."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from cxr_monai.errors import CXRMonaiError
from cxr_monai.explain.gradcam import (
    Explainer,
    GradCAM,
    area_above,
    class_index,
    count_hooks,
    normalise,
    normalise_series,
    peak_location,
    to_original_grid,
)
from cxr_monai.io import CXRImage
from cxr_monai.transforms import inference_transforms

SIZE = 32


class BrightnessNet(nn.Module):
    """Class 0's logit grows with the bright area: a 1x1 conv summing the channels is the Grad-CAM layer,
    so its map is high exactly where the input is bright. ``inplace`` puts an in-place ReLU after it
    (as in VGG16), which must not break the hooks."""

    def __init__(self, inplace: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 1, 1)
        with torch.no_grad():
            self.conv.weight.fill_(1.0)
            self.conv.bias.fill_(0.0)
        self.relu = nn.ReLU(inplace=inplace)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(1, 3))
        with torch.no_grad():
            self.head[2].weight.copy_(torch.tensor([[1.0], [0.0], [-1.0]]))
            self.head[2].bias.zero_()

    @property
    def gradcam_layer(self) -> nn.Module:
        return self.conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.relu(self.conv(x)))


class SmallCNN(nn.Module):
    """Random two-block CNN (3 classes) for batching and hook tests."""

    def __init__(self) -> None:
        super().__init__()
        self.block1 = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.block2 = nn.Sequential(nn.Conv2d(6, 8, 3, padding=1), nn.ReLU())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))

    @property
    def gradcam_layer(self) -> nn.Module:
        return self.block2[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block2(self.block1(x)))


def film_with_box(rows: int, cols: int, box: tuple[int, int, int, int]) -> CXRImage:
    """Dark (rows, cols) film with one bright rectangle (top, bottom, left, right), slight noise."""
    rng = np.random.default_rng(0)
    pixels = rng.uniform(0, 20, (rows, cols)).astype(np.float32)
    top, bottom, left, right = box
    pixels[top:bottom, left:right] = 230.0
    return CXRImage(pixels=pixels, source_format="png", color_mode="L")


def box_mask(shape: tuple[int, int], box: tuple[int, int, int, int]) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[box[0] : box[1], box[2] : box[3]] = True
    return mask


def test_inverse_geometry_lands_on_the_original_pixels_for_a_non_square_film():
    """Stretch to S x S by the inference chain, then back: the bright box returns to its own pixels."""
    rows, cols, box = 40, 100, (8, 24, 60, 90)
    image = film_with_box(rows, cols, box)
    network_grid = inference_transforms(SIZE)(image)[0].numpy()  # (S, S), the stretched film
    back = to_original_grid(network_grid, image.shape)
    assert back.shape == (rows, cols)
    hot = back > (back.min() + back.max()) / 2
    truth = box_mask((rows, cols), box)
    iou = (hot & truth).sum() / (hot | truth).sum()
    assert iou > 0.8


def test_inverse_geometry_follows_a_flip():
    rows, cols, box = 50, 30, (5, 20, 2, 12)
    image = film_with_box(rows, cols, box)
    flipped = CXRImage(pixels=image.pixels[:, ::-1].copy(), source_format="png", color_mode="L")
    chain = inference_transforms(SIZE)
    back = to_original_grid(chain(image)[0].numpy(), image.shape)
    back_flipped = to_original_grid(chain(flipped)[0].numpy(), flipped.shape)
    np.testing.assert_allclose(back_flipped, back[:, ::-1], atol=1e-4)


@pytest.mark.parametrize(("rows", "cols", "box"), [(40, 100, (8, 24, 60, 90)), (90, 36, (60, 84, 4, 16))])
def test_grad_cam_peak_lands_in_the_bright_box_of_the_original(rows, cols, box):
    model = BrightnessNet().eval()
    image = film_with_box(rows, cols, box)
    flipped = CXRImage(pixels=image.pixels[:, ::-1].copy(), source_format="png", color_mode="L")
    explainer = Explainer(model, inference_transforms(SIZE))
    result, result_flipped = explainer.explain([image, flipped], target=0)
    assert result.raw_map.shape == (rows, cols)
    assert box_mask((rows, cols), box)[peak_location(result.raw_map)]
    mirrored = (box[0], box[1], cols - box[3], cols - box[2])
    assert box_mask((rows, cols), mirrored)[peak_location(result_flipped.raw_map)]
    heat = normalise(result.raw_map)
    inside = heat[box_mask((rows, cols), box)].sum() / heat.sum()
    assert inside > 0.7


def test_batch_equals_single_calls_and_probabilities_match_the_model():
    torch.manual_seed(0)
    model = SmallCNN().eval()
    x = torch.randn(3, 3, SIZE, SIZE)
    cam = GradCAM(model)
    batch = cam(x)
    for i in range(3):
        single = cam(x[i : i + 1])
        np.testing.assert_allclose(batch.maps[i], single.maps[0], rtol=1e-4, atol=1e-6)
    with torch.no_grad():
        expected = torch.softmax(model(x), dim=1).numpy()
    np.testing.assert_allclose(batch.probabilities, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(batch.target_indices, expected.argmax(axis=1))
    assert batch.maps.shape == (3, SIZE, SIZE)
    assert (batch.maps >= 0).all()


def test_named_target_is_explained_for_every_image():
    torch.manual_seed(1)
    model = SmallCNN().eval()
    x = torch.randn(4, 3, SIZE, SIZE)
    out = GradCAM(model)(x, target=2)
    assert out.target_indices.tolist() == [2, 2, 2, 2]
    other = GradCAM(model)(x, target=0)
    assert not np.allclose(out.maps, other.maps)


def test_brightness_map_is_opposite_for_the_class_the_brightness_argues_against():
    """Class 2's logit falls with brightness: after ReLU its map is zero on the bright box."""
    model = BrightnessNet().eval()
    image = film_with_box(32, 32, (8, 24, 8, 24))
    (against,) = Explainer(model, inference_transforms(SIZE)).explain([image], target=2)
    assert float(against.raw_map[8:24, 8:24].max()) == pytest.approx(0.0, abs=1e-6)


def test_inplace_relu_after_the_hooked_layer_gives_the_same_map():
    x = torch.randn(2, 3, SIZE, SIZE)
    plain = GradCAM(BrightnessNet(inplace=False).eval())(x, target=0)
    inplace = GradCAM(BrightnessNet(inplace=True).eval())(x, target=0)
    np.testing.assert_allclose(plain.maps, inplace.maps, rtol=1e-5, atol=1e-6)


def test_no_hooks_remain_after_calls_and_after_a_failing_call():
    model = SmallCNN().eval()
    assert count_hooks(model) == 0
    cam = GradCAM(model)
    for _ in range(3):
        cam(torch.randn(2, 3, SIZE, SIZE))
        assert count_hooks(model) == 0
    with pytest.raises(RuntimeError):
        cam(torch.randn(2, 5, SIZE, SIZE))  # wrong channel count fails inside the forward
    assert count_hooks(model) == 0


def test_count_hooks_sees_a_hook():
    model = SmallCNN()
    handle = model.block2[0].register_forward_hook(lambda *args: None)
    assert count_hooks(model) == 1
    handle.remove()
    assert count_hooks(model) == 0


def test_torchscript_model_is_refused():
    scripted = torch.jit.trace(SmallCNN().eval(), torch.randn(1, 3, SIZE, SIZE))
    with pytest.raises(TypeError, match="eager"):
        GradCAM(scripted, layer=nn.Identity())


def test_normalise_per_image_and_all_zero():
    heat = np.array([[0.0, 2.0], [4.0, 1.0]], dtype=np.float32)
    np.testing.assert_allclose(normalise(heat), heat / 4.0)
    zero = normalise(np.zeros((3, 5), dtype=np.float32))
    assert zero.shape == (3, 5) and not zero.any() and np.isfinite(zero).all()


def test_normalise_series_keeps_ratios_between_studies():
    small = np.full((2, 3), 1.0, dtype=np.float32)
    large = np.full((4, 4), 4.0, dtype=np.float32)
    out_small, out_large = normalise_series([small, large])
    assert out_large.max() == pytest.approx(1.0)
    assert out_small.max() == pytest.approx(0.25)
    assert area_above(out_small) == 0.0 and area_above(out_large) == 1.0
    assert all(not m.any() for m in normalise_series([np.zeros((2, 2)), np.zeros((3, 3))]))


def test_area_and_peak():
    heat = np.zeros((10, 20), dtype=np.float32)
    heat[2:4, 5:10] = 0.8
    heat[3, 7] = 1.0
    assert peak_location(heat) == (3, 7)
    assert area_above(heat) == pytest.approx(10 / 200)


def test_class_index_is_case_insensitive_and_names_choices():
    assert class_index("pneumonia") == 2
    with pytest.raises(CXRMonaiError, match="COVID-19"):
        class_index("Tuberculosis")


@pytest.mark.parametrize("grad_enabled", [True, False])
def test_caller_grad_mode_is_restored_and_maps_do_not_depend_on_it(grad_enabled):
    torch.manual_seed(2)
    model = SmallCNN().eval()
    x = torch.randn(2, 3, SIZE, SIZE)
    reference = GradCAM(model)(x)
    with torch.set_grad_enabled(grad_enabled):
        out = GradCAM(model)(x)
        assert torch.is_grad_enabled() is grad_enabled
    np.testing.assert_allclose(out.maps, reference.maps, rtol=1e-5, atol=1e-7)
    assert all(p.grad is None for p in model.parameters())  # nothing accumulated into the weights
