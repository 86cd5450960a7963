"""CycleGAN networks for one-channel images in [-1, 1] (Zhu et al. 2017, appendix 7.2).

* :class:`ResnetGenerator`: c7s1-k, d2k, d4k, ``n_residual_blocks`` x R4k, u2k, uk, c7s1-1 with
  instance norm, reflection padding and tanh; (B, 1, H, W) -> (B, 1, H, W), H and W divisible by 4.
  MONAI and torchvision have no such generator, hence it is written here.
* :func:`build_discriminator`: the 70 x 70 PatchGAN (C64-C128-C256-C512 -> 1 channel, LeakyReLU 0.2,
  instance norm except on the first layer) as MONAI's ``PatchDiscriminator``; (B, 1, H, W) -> a
  (B, 1, h, w) map of real/fake scores, h = w = H/8 - 2 for H >= 32.

Widths scale with ``base_channels`` (k above; the paper's 64).
"""

from __future__ import annotations

import torch
from monai.networks.nets import PatchDiscriminator
from torch import nn


def _init_normal(module: nn.Module) -> None:
    """Zhu et al.'s initialisation: conv weights ~ N(0, 0.02), biases 0."""
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.normal_(module.weight, 0.0, 0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class ResidualBlock(nn.Module):
    """Two 3x3 convolutions (reflection padding, instance norm) with a skip connection; shape-preserving."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.ReflectionPad2d(1),
            nn.Conv2d(channels, channels, 3),
            nn.InstanceNorm2d(channels),
            nn.ReLU(True),
            nn.ReflectionPad2d(1),
            nn.Conv2d(channels, channels, 3),
            nn.InstanceNorm2d(channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class ResnetGenerator(nn.Module):
    """Image-to-image generator: (B, in_channels, H, W) in [-1, 1] -> (B, out_channels, H, W) in [-1, 1]."""

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 1,
        base_channels: int = 64,
        n_residual_blocks: int = 6,
    ) -> None:
        super().__init__()
        k = int(base_channels)
        layers: list[nn.Module] = [
            nn.ReflectionPad2d(3),
            nn.Conv2d(in_channels, k, 7),
            nn.InstanceNorm2d(k),
            nn.ReLU(True),
        ]
        for width in (k, 2 * k):  # two stride-2 down-samplings
            layers += [nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.InstanceNorm2d(2 * width)]
            layers.append(nn.ReLU(True))
        layers += [ResidualBlock(4 * k) for _ in range(int(n_residual_blocks))]
        for width in (4 * k, 2 * k):  # two stride-2 up-samplings
            layers += [
                nn.ConvTranspose2d(width, width // 2, 3, stride=2, padding=1, output_padding=1),
                nn.InstanceNorm2d(width // 2),
                nn.ReLU(True),
            ]
        layers += [nn.ReflectionPad2d(3), nn.Conv2d(k, out_channels, 7), nn.Tanh()]
        self.model = nn.Sequential(*layers)
        self.apply(_init_normal)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class PatchGANDiscriminator(nn.Module):
    """MONAI's ``PatchDiscriminator`` returning only its last output (MONAI's returns every layer's)."""

    def __init__(self, in_channels: int = 1, base_channels: int = 64, num_layers: int = 3) -> None:
        super().__init__()
        self.net = PatchDiscriminator(
            spatial_dims=2,
            channels=int(base_channels),
            in_channels=in_channels,
            out_channels=1,
            num_layers_d=int(num_layers),
            norm="INSTANCE",
            bias=True,
        )
        self.apply(_init_normal)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_channels, H, W) -> (B, 1, h, w) unbounded scores (LSGAN: no sigmoid)."""
        return self.net(x)[-1]


def build_discriminator(in_channels: int = 1, base_channels: int = 64) -> PatchGANDiscriminator:
    """The 70 x 70 PatchGAN (three stride-2 layers then one stride-1 layer before the score map)."""
    return PatchGANDiscriminator(in_channels=in_channels, base_channels=base_channels, num_layers=3)
