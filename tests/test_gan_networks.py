"""CycleGAN networks, losses and the training step on random 32 px tensors (base_channels 4)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.inferers import SimpleInferer

from cxr_monai.gan.engine import CycleGANStep, ImagePool
from cxr_monai.gan.losses import CycleGANLoss
from cxr_monai.gan.networks import ResnetGenerator, build_discriminator


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _batch(seed: int, size: int = 32, batch: int = 2) -> torch.Tensor:
    return torch.rand(batch, 1, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.mark.parametrize("size", [32, 48])
def test_generator_keeps_shape_and_range(size: int) -> None:
    out = ResnetGenerator(base_channels=4, n_residual_blocks=2)(_batch(0, size))
    assert out.shape == (2, 1, size, size)
    assert out.min() >= -1 and out.max() <= 1


def test_generator_width_follows_base_channels() -> None:
    small = sum(p.numel() for p in ResnetGenerator(base_channels=4, n_residual_blocks=1).parameters())
    large = sum(p.numel() for p in ResnetGenerator(base_channels=8, n_residual_blocks=1).parameters())
    assert 3.5 < large / small < 4.1  # conv weights grow with the square of the width


@pytest.mark.parametrize(("size", "patches"), [(32, 2), (64, 6)])
def test_patchgan_gives_a_score_map(size: int, patches: int) -> None:
    scores = build_discriminator(base_channels=4)(_batch(1, size))
    assert scores.shape == (2, 1, patches, patches)


def test_lsgan_terms() -> None:
    loss = CycleGANLoss()
    ones, zeros = torch.ones(2, 1, 2, 2), torch.zeros(2, 1, 2, 2)
    assert float(loss.generator_adversarial(ones)) == pytest.approx(0.0)
    assert float(loss.generator_adversarial(zeros)) == pytest.approx(1.0)
    assert float(loss.discriminator(ones, zeros)) == pytest.approx(0.0)
    assert float(loss.discriminator(zeros, ones)) == pytest.approx(1.0)
    x = torch.zeros(1, 1, 4, 4)
    assert float(loss.cycle(x + 0.1, x)) == pytest.approx(1.0)  # 10 x 0.1
    assert float(loss.identity(x + 0.1, x)) == pytest.approx(0.5)  # 0.5 x 10 x 0.1


def test_image_pool_returns_same_shape_and_stored_fakes() -> None:
    pool = ImagePool(size=2, seed=0)
    first = pool.query(torch.zeros(2, 1, 4, 4))
    assert torch.equal(first, torch.zeros(2, 1, 4, 4))
    later = torch.cat([pool.query(torch.ones(1, 1, 4, 4)) for _ in range(20)])
    assert later.shape == (20, 1, 4, 4)
    assert {float(x.mean()) for x in later} == {0.0, 1.0}  # some old fakes come back, some new pass
    assert torch.equal(ImagePool(size=0).query(torch.ones(3, 1, 2, 2)), torch.ones(3, 1, 2, 2))


def _small_gan() -> CycleGANStep:
    """The step as train.json builds it: two generators, two discriminators, one Adam for each pair."""
    torch.manual_seed(0)
    g_ab, g_ba = (ResnetGenerator(base_channels=4, n_residual_blocks=1) for _ in range(2))
    d_a, d_b = (build_discriminator(base_channels=4) for _ in range(2))
    opt_g = torch.optim.Adam([*g_ab.parameters(), *g_ba.parameters()], lr=2e-4, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam([*d_a.parameters(), *d_b.parameters()], lr=2e-4, betas=(0.5, 0.999))
    return CycleGANStep(g_ab, g_ba, d_a, d_b, opt_g, opt_d, CycleGANLoss(), SimpleInferer(), pool_size=4)


def test_one_step_updates_every_network_and_stays_finite() -> None:
    gan = _small_gan()
    nets = {"g_ab": gan.g_ab, "g_ba": gan.g_ba, "d_a": gan.d_a, "d_b": gan.d_b}
    before = {name: [p.detach().clone() for p in net.parameters()] for name, net in nets.items()}
    losses = gan(None, {"image_a": _batch(2), "image_b": _batch(3)})
    assert set(losses) == {"d_loss", "g_adv", "cycle", "identity"}
    assert all(np.isfinite(v) and v > 0 for v in losses.values())
    for name, net in nets.items():
        params = list(net.parameters())
        assert all(torch.isfinite(p).all() for p in params), name
        assert any(not torch.equal(a, b) for a, b in zip(before[name], params, strict=True)), name
    assert all(p.requires_grad for p in gan.d_a.parameters())  # re-enabled after the generator step


def _discs(*discs: tuple[float, float, float]) -> torch.Tensor:
    """(len(discs), 1, 32, 32): a bright disc (centre x, centre y, radius in [-1, 1] units) on a ramp."""
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 32), torch.linspace(-1, 1, 32), indexing="ij")
    images = [torch.where((xx - x) ** 2 + (yy - y) ** 2 < r * r, 0.8, -0.6 + 0.3 * yy) for x, y, r in discs]
    return torch.stack(images)[:, None]


def test_cycle_loss_decreases_on_a_fixed_batch() -> None:
    gan = _small_gan()
    real_a = _discs((-0.3, 0.0, 0.4), (0.3, 0.2, 0.3))
    real_b = _discs((0.0, -0.3, 0.5), (0.2, 0.3, 0.25))
    cycle = [gan(None, {"image_a": real_a, "image_b": real_b})["cycle"] for _ in range(30)]
    assert np.mean(cycle[-3:]) < 0.7 * np.mean(cycle[:3])
