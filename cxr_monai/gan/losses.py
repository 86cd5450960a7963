"""CycleGAN objective (Zhu et al. 2017): LSGAN adversarial terms, cycle consistency and identity.

Weights as in the paper: cycle L1 x ``lambda_cycle`` (10), identity L1 x ``lambda_identity`` x
``lambda_cycle`` (0.5 x 10). The adversarial terms are MONAI's least-squares ``PatchAdversarialLoss``
(targets 1 = real, 0 = fake, mean over the patch score map).
"""

from __future__ import annotations

import torch
from monai.losses import PatchAdversarialLoss
from torch import nn


class CycleGANLoss(nn.Module):
    """The three loss terms; every method takes and returns tensors, the losses being scalars."""

    def __init__(self, lambda_cycle: float = 10.0, lambda_identity: float = 0.5) -> None:
        super().__init__()
        self.lambda_cycle = float(lambda_cycle)
        self.lambda_identity = float(lambda_identity)
        self.adversarial = PatchAdversarialLoss(criterion="least_squares")
        self.l1 = nn.L1Loss()

    def generator_adversarial(self, fake_scores: torch.Tensor) -> torch.Tensor:
        """LSGAN generator term: mean (D(G(x)) - 1)^2."""
        return self._scalar(self.adversarial(fake_scores, target_is_real=True, for_discriminator=False))

    def discriminator(self, real_scores: torch.Tensor, fake_scores: torch.Tensor) -> torch.Tensor:
        """LSGAN discriminator term, halved as in the paper: 0.5 (mean (D(y) - 1)^2 + mean D(G(x))^2)."""
        real = self._scalar(self.adversarial(real_scores, target_is_real=True, for_discriminator=True))
        fake = self._scalar(self.adversarial(fake_scores, target_is_real=False, for_discriminator=True))
        return 0.5 * (real + fake)

    def cycle(self, reconstructed: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        """``lambda_cycle`` x mean |F(G(x)) - x|."""
        return self.lambda_cycle * self.l1(reconstructed, real)

    def identity(self, same: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        """``lambda_identity`` x ``lambda_cycle`` x mean |G(y) - y| (G fed an image of its target domain)."""
        return self.lambda_identity * self.lambda_cycle * self.l1(same, real)

    @staticmethod
    def _scalar(value: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
        # PatchAdversarialLoss returns a list only for list input; we always pass one score map.
        return value if isinstance(value, torch.Tensor) else torch.stack(value).mean()
