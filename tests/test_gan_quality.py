"""GAN quality figures (:mod:`cxr_monai.gan.quality`) on features with known answers and on tiny PNGs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from bundle_factory import make_trained_bundle
from PIL import Image

from cxr_monai.constants import CLASS_NAMES
from cxr_monai.errors import DatasetError
from cxr_monai.gan.quality import (
    frechet_distance,
    gan_quality,
    real_vs_synthetic_auroc,
)
from cxr_monai.predictor import Predictor

pytestmark = pytest.mark.usefixtures("one_torch_thread")
COVID, NORMAL = CLASS_NAMES.index("COVID-19"), CLASS_NAMES.index("Normal")


def test_frechet_distance_of_a_shifted_copy_is_the_squared_shift() -> None:
    a = np.random.default_rng(0).normal(size=(40, 6))
    shift = np.array([1.0, -2.0, 0.0, 0.5, 0.0, 3.0])
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    # equal covariances: the trace terms cancel and only |mean difference|^2 is left
    assert frechet_distance(a + shift, a) == pytest.approx(float(shift @ shift), rel=1e-6)
    assert frechet_distance(a[:1], a) is None


def test_real_vs_synthetic_auroc_tells_separable_from_indistinguishable() -> None:
    rng = np.random.default_rng(1)
    real = rng.normal(size=(100, 4))
    assert real_vs_synthetic_auroc(real, rng.normal(size=(100, 4)) + 3.0) == pytest.approx(1.0)
    same = real_vs_synthetic_auroc(real, rng.normal(size=(100, 4)))
    assert same is not None and 0.3 < same < 0.7
    assert real_vs_synthetic_auroc(real[:1], real) is None


def _png(path: Path, pixels: np.ndarray, mode: str = "L") -> str:
    Image.fromarray(pixels.astype(np.uint8)).convert(mode).save(path)
    return str(path)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Real items: 6 COVID-19 (vertical stripes, 48x48 RGB, as one source), 6 Normal and 6 Pneumonia
    (noise, 40x36 grayscale); 'synthetic' images: re-saved copies of the Normal films."""
    root = tmp_path_factory.mktemp("quality")
    rng = np.random.default_rng(0)
    real: list[dict[str, Any]] = []
    for n in range(18):
        label = n % 3
        if label == COVID:
            stripes = np.tile((np.arange(48) // 4 % 2) * 120.0, (48, 1))
            path = _png(root / f"real_{n}.png", 100 + stripes + rng.random((48, 48)) * 20, "RGB")
        else:
            path = _png(root / f"real_{n}.png", 20 + rng.random((40, 36)) * 60)
        real.append({"image": path, "label": label, "fold": n % 2})
    normal = [item["image"] for item in real if item["label"] == NORMAL]
    synthetic = [_png(root / f"synth_{n}.png", np.asarray(Image.open(p))) for n, p in enumerate(normal)]
    return {"root": root, "real": real, "synthetic": synthetic}


def test_gan_quality_on_copies_of_normal_films(tiny: dict[str, Any]) -> None:
    bundle = make_trained_bundle(tiny["root"] / "v1", spatial_size=32)
    quality = gan_quality(tiny["real"], tiny["synthetic"], v1_bundle=bundle, spatial_size=32, seed=0)
    assert quality["n_synthetic"] == 6
    assert quality["n_real"] == {"COVID-19": 6, "Normal": 6, "Pneumonia": 6}
    fd = quality["frechet"]
    # copies of the Normal films: (nearly) no distance to real Normal, far from real COVID-19
    assert fd["synthetic_vs_real_normal"] < 0.01 * fd["synthetic_vs_real_covid"]
    assert fd["synthetic_vs_real_covid"] == pytest.approx(fd["real_covid_vs_real_normal"], rel=0.05)
    assert quality["real_vs_synthetic_auroc"] == pytest.approx(1.0)  # stripes vs noise
    assert quality["shortcut_covid_rate"] == 0.0  # the baseline sees a Normal film's size and mode
    predictions = Predictor.from_bundle(bundle).predict(tiny["synthetic"])
    expected = np.mean([p.predicted_index == COVID for p in predictions])
    assert quality["v1_covid_rate"] == pytest.approx(expected)


def test_gan_quality_draws_at_most_max_real_and_needs_both_domains(tiny: dict[str, Any]) -> None:
    quality = gan_quality(tiny["real"], tiny["synthetic"], spatial_size=32, max_real=3)
    assert quality["n_real"] == {"COVID-19": 3, "Normal": 3, "Pneumonia": 3}
    assert quality["v1_covid_rate"] is None
    no_covid = [item for item in tiny["real"] if item["label"] != COVID]
    with pytest.raises(DatasetError, match="no real COVID-19 items"):
        gan_quality(no_covid, tiny["synthetic"], spatial_size=32)
    with pytest.raises(DatasetError, match="no synthetic images"):
        gan_quality(tiny["real"], [], spatial_size=32)
