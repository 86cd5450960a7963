"""One CycleGAN iteration as the process function of the bundle's ignite engine.

Domain A = Normal, domain B = COVID-19. ``G`` (``generator_ab``) maps A -> B and is the generator kept
for synthesis, ``F`` (``generator_ba``) maps B -> A; ``D_A`` and ``D_B`` judge each domain. Each step
(Zhu et al. 2017): one Adam step on G and F together (adversarial + cycle + identity), then one on D_A
and D_B together, the discriminators seeing fakes drawn from an image history pool. MONAI's GAN engines
train one generator and one discriminator, not two of each with a cycle term, so the step is written here
and given to ``monai.engines.Trainer`` as its ``iteration_update``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from ignite.engine import Engine
from torch import nn

from cxr_monai.gan.losses import CycleGANLoss

#: The scalar losses of one step, as ``engine.state.output`` holds them.
LOSS_KEYS = ("d_loss", "g_adv", "cycle", "identity")


class ImagePool:
    """History of generated images (Shrivastava et al. 2017, as CycleGAN uses it): the discriminator sees,
    for each image, with p = 0.5 a stored older fake (the new one takes its place) and otherwise the new
    one. ``size == 0`` passes images through. A few lines, so not worth a dependency."""

    def __init__(self, size: int = 50, seed: int = 0) -> None:
        self.size = int(size)
        self.images: list[torch.Tensor] = []
        self.generator = torch.Generator().manual_seed(int(seed))

    def query(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) detached fakes -> (B, C, H, W) fakes for the discriminator."""
        if self.size <= 0:
            return images
        out = []
        for image in images.detach():
            image = image.unsqueeze(0)
            if len(self.images) < self.size:
                self.images.append(image)
                out.append(image)
            elif float(torch.rand(1, generator=self.generator)) < 0.5:
                index = int(torch.randint(self.size, (1,), generator=self.generator))
                out.append(self.images[index].clone())
                self.images[index] = image
            else:
                out.append(image)
        return torch.cat(out, 0)


class CycleGANStep:
    """Process function ``(engine, batch) -> losses`` of one CycleGAN iteration.

    ``batch``: ``{"image_a": (B, 1, S, S), "image_b": (B, 1, S, S)}`` in [-1, 1] (Normal, COVID-19).
    ``inferer`` runs every network (``inferer(x, network)``; MONAI's ``SimpleInferer`` calls it).
    """

    def __init__(
        self,
        generator_ab: nn.Module,
        generator_ba: nn.Module,
        discriminator_a: nn.Module,
        discriminator_b: nn.Module,
        optimizer_g: torch.optim.Optimizer,
        optimizer_d: torch.optim.Optimizer,
        loss: CycleGANLoss,
        inferer: Callable[[torch.Tensor, nn.Module], torch.Tensor],
        pool_size: int = 50,
        seed: int = 0,
    ) -> None:
        self.g_ab, self.g_ba = generator_ab, generator_ba
        self.d_a, self.d_b = discriminator_a, discriminator_b
        self.opt_g, self.opt_d = optimizer_g, optimizer_d
        self.loss = loss
        self.inferer = inferer
        self.pool_a = ImagePool(pool_size, seed)
        self.pool_b = ImagePool(pool_size, seed + 1)

    def __call__(self, engine: Engine | None, batch: Mapping[str, torch.Tensor]) -> dict[str, float]:
        """One G/F update then one D_A/D_B update.

        Returns the weighted loss terms: ``d_loss`` (D_A + D_B), ``g_adv`` (both generators'
        adversarial terms), ``cycle`` (both directions, x lambda) and ``identity`` (both, x lambda x 0.5).
        """
        device = next(self.g_ab.parameters()).device
        real_a, real_b = batch["image_a"].to(device), batch["image_b"].to(device)
        run, loss = self.inferer, self.loss
        for net in (self.g_ab, self.g_ba, self.d_a, self.d_b):
            net.train()

        self._discriminators_trainable(False)
        self.opt_g.zero_grad(set_to_none=True)
        fake_b, fake_a = run(real_a, self.g_ab), run(real_b, self.g_ba)
        g_adv = loss.generator_adversarial(run(fake_b, self.d_b)) + loss.generator_adversarial(
            run(fake_a, self.d_a)
        )
        cycle = loss.cycle(run(fake_b, self.g_ba), real_a) + loss.cycle(run(fake_a, self.g_ab), real_b)
        identity = loss.identity(run(real_b, self.g_ab), real_b) + loss.identity(
            run(real_a, self.g_ba), real_a
        )
        (g_adv + cycle + identity).backward()
        self.opt_g.step()

        self._discriminators_trainable(True)
        self.opt_d.zero_grad(set_to_none=True)
        d_b = loss.discriminator(run(real_b, self.d_b), run(self.pool_b.query(fake_b.detach()), self.d_b))
        d_a = loss.discriminator(run(real_a, self.d_a), run(self.pool_a.query(fake_a.detach()), self.d_a))
        (d_a + d_b).backward()
        self.opt_d.step()
        return {
            "d_loss": (d_a + d_b).item(),
            "g_adv": g_adv.item(),
            "cycle": cycle.item(),
            "identity": identity.item(),
        }

    def _discriminators_trainable(self, flag: bool) -> None:
        for net in (self.d_a, self.d_b):
            for p in net.parameters():
                p.requires_grad_(flag)
