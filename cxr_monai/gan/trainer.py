"""CycleGAN training: the alternating generator/discriminator step and the bundle's training run.

Domain A = Normal, domain B = COVID-19. ``G`` maps A -> B (the generator kept for synthesis), ``F`` maps
B -> A; ``D_A`` and ``D_B`` judge each domain. Each step (Zhu et al. 2017): one Adam step on G and F
together (adversarial + cycle + identity), then one on D_A and D_B together with fakes drawn from an image
history pool. MONAI's GAN engines train one generator and one discriminator, not two of each with a cycle
term, so the step is written here.

A trained GAN directory (``output_dir``) holds::

    configs/  metadata.json, train.json and synthesize.json with the run's parameters written in; logging.conf
    models/   generator_normal2covid.pt (plain state_dict of the ``network_def`` in synthesize.json)
    logs/     gan_log.json (mean losses per log interval), run_info.json, samples.png
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.utils import convert_to_tensor, set_determinism
from PIL import Image
from torchvision.utils import make_grid

from cxr_monai.atomic import atomic_path, write_json_atomic, write_text_atomic
from cxr_monai.bundles import bundle_dir
from cxr_monai.data import load_datalist
from cxr_monai.errors import BundleError
from cxr_monai.gan.data import domain_items, domain_loader, endless
from cxr_monai.gan.losses import CycleGANLoss
from cxr_monai.gan.networks import ResnetGenerator, build_discriminator

logger = logging.getLogger(__name__)

BUNDLE_NAME = "cxr_cyclegan"
GENERATOR_FILE = "generator_normal2covid.pt"
LOG_FILE = "gan_log.json"
SAMPLES_FILE = "samples.png"
RUN_INFO = "run_info.json"
CONFIG_FILES = ("metadata.json", "train.json", "synthesize.json", "logging.conf")
#: Parameters that synthesis needs to rebuild the generator and its input; written into synthesize.json.
SYNTHESIS_PARAMETERS = ("spatial_size", "base_channels", "n_residual_blocks")
LOSS_KEYS = ("d_loss", "g_adv", "cycle", "identity")


class ImagePool:
    """History of generated images (Shrivastava et al. 2017, as CycleGAN uses it): the discriminator sees,
    for each image, with p = 0.5 a stored older fake (the new one takes its place) and otherwise the new
    one. ``size == 0`` passes images through. A few lines, so not worth a dependency."""

    def __init__(self, size: int = 50, seed: int = 0) -> None:
        self.size = int(size)
        self.images: list[torch.Tensor] = []
        self.rng = random.Random(seed)

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
            elif self.rng.random() < 0.5:
                index = self.rng.randrange(self.size)
                out.append(self.images[index].clone())
                self.images[index] = image
            else:
                out.append(image)
        return torch.cat(out, 0)


class CycleGAN:
    """The four networks, their two Adam optimizers (lr 2e-4, betas (0.5, 0.999)) and the training step."""

    def __init__(
        self,
        base_channels: int = 64,
        n_residual_blocks: int = 6,
        disc_base_channels: int = 64,
        learning_rate: float = 2e-4,
        lambda_cycle: float = 10.0,
        lambda_identity: float = 0.5,
        pool_size: int = 50,
        seed: int = 0,
        device: str | torch.device = "cpu",
    ) -> None:
        self.device = torch.device(device)
        self.g_ab = ResnetGenerator(1, 1, base_channels, n_residual_blocks).to(self.device)
        self.g_ba = ResnetGenerator(1, 1, base_channels, n_residual_blocks).to(self.device)
        self.d_a = build_discriminator(1, disc_base_channels).to(self.device)
        self.d_b = build_discriminator(1, disc_base_channels).to(self.device)
        self.loss = CycleGANLoss(lambda_cycle, lambda_identity)
        betas = (0.5, 0.999)
        self.opt_g = torch.optim.Adam(
            [*self.g_ab.parameters(), *self.g_ba.parameters()], lr=learning_rate, betas=betas
        )
        self.opt_d = torch.optim.Adam(
            [*self.d_a.parameters(), *self.d_b.parameters()], lr=learning_rate, betas=betas
        )
        self.pool_a = ImagePool(pool_size, seed)
        self.pool_b = ImagePool(pool_size, seed + 1)

    def step(self, real_a: torch.Tensor, real_b: torch.Tensor) -> dict[str, float]:
        """One G/F update then one D_A/D_B update on batches (B, 1, S, S) in [-1, 1].

        Returns the weighted loss terms: ``d_loss`` (D_A + D_B), ``g_adv`` (both generators'
        adversarial terms), ``cycle`` (both directions, x lambda) and ``identity`` (both, x lambda x 0.5).
        """
        real_a, real_b = real_a.to(self.device), real_b.to(self.device)
        for net in (self.g_ab, self.g_ba, self.d_a, self.d_b):
            net.train()

        self._discriminators_trainable(False)
        self.opt_g.zero_grad(set_to_none=True)
        fake_b, fake_a = self.g_ab(real_a), self.g_ba(real_b)
        g_adv = self.loss.generator_adversarial(self.d_b(fake_b)) + self.loss.generator_adversarial(
            self.d_a(fake_a)
        )
        cycle = self.loss.cycle(self.g_ba(fake_b), real_a) + self.loss.cycle(self.g_ab(fake_a), real_b)
        identity = self.loss.identity(self.g_ab(real_b), real_b) + self.loss.identity(
            self.g_ba(real_a), real_a
        )
        (g_adv + cycle + identity).backward()
        self.opt_g.step()

        self._discriminators_trainable(True)
        self.opt_d.zero_grad(set_to_none=True)
        d_b = self.loss.discriminator(self.d_b(real_b), self.d_b(self.pool_b.query(fake_b.detach())))
        d_a = self.loss.discriminator(self.d_a(real_a), self.d_a(self.pool_a.query(fake_a.detach())))
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


def default_bundle_root() -> str:
    """Directory of the shipped ``cxr_cyclegan`` bundle (package data of ``cxr_monai.bundles``)."""
    return str(bundle_dir(BUNDLE_NAME))


def train_cyclegan(
    datalist: str,
    output_dir: str,
    iterations: int = 5000,
    spatial_size: int = 128,
    fold: int = -1,
    batch_size: int = 1,
    base_channels: int = 64,
    n_residual_blocks: int = 6,
    disc_base_channels: int = 64,
    learning_rate: float = 2e-4,
    lambda_cycle: float = 10.0,
    lambda_identity: float = 0.5,
    pool_size: int = 50,
    log_interval: int = 50,
    seed: int = 0,
    num_workers: int = 0,
    cache_rate: float = 1.0,
    device: str | torch.device | None = None,
    bundle_root: str | None = None,
) -> str:
    """Train Normal -> COVID-19 for ``iterations`` steps and write a trained GAN directory (module doc).

    ``spatial_size`` must be a multiple of 4 and at least 32. Returns ``output_dir`` (absolute).
    Raises DatasetError for a bad datalist or an empty domain, BundleError for a bad output_dir/size.
    """
    if not output_dir:
        raise BundleError("no output directory given: pass --output_dir DIR")
    if int(spatial_size) < 32 or int(spatial_size) % 4:
        raise BundleError(f"spatial_size {spatial_size}: expected a multiple of 4, at least 32")
    if not datalist:
        raise BundleError("no datalist given: pass --datalist FILE (made by `cxr-monai prepare`)")
    params: dict[str, Any] = {k: v for k, v in locals().items() if k not in ("device", "bundle_root")}
    params["datalist"] = str(Path(datalist).resolve())
    out = _prepare_output_dir(bundle_root or default_bundle_root(), output_dir, params)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    set_determinism(seed=seed)

    normal, covid = domain_items(load_datalist(datalist), fold)
    logger.info(
        "CycleGAN Normal -> COVID-19: %d Normal, %d COVID-19 training images", len(normal), len(covid)
    )
    loaders = [
        domain_loader(items, spatial_size, batch_size, seed + i, num_workers, cache_rate)
        for i, items in enumerate((normal, covid))
    ]
    stream_a, stream_b = endless(loaders[0]), endless(loaders[1])
    gan = CycleGAN(
        base_channels,
        n_residual_blocks,
        disc_base_channels,
        learning_rate,
        lambda_cycle,
        lambda_identity,
        pool_size,
        seed,
        device,
    )
    log: list[dict[str, Any]] = []
    window: dict[str, list[float]] = {key: [] for key in LOSS_KEYS}
    start = time.perf_counter()
    for iteration in range(1, int(iterations) + 1):
        for key, value in gan.step(next(stream_a), next(stream_b)).items():
            window[key].append(value)
        if iteration % int(log_interval) == 0 or iteration == int(iterations):
            entry = {"iteration": iteration, **{k: float(np.mean(v)) for k, v in window.items()}}
            entry["seconds"] = round(time.perf_counter() - start, 2)
            log.append(entry)
            write_json_atomic(out / "logs" / LOG_FILE, log)
            logger.info(
                "iteration %d/%d %s", iteration, iterations, {k: round(entry[k], 4) for k in LOSS_KEYS}
            )
            window = {key: [] for key in LOSS_KEYS}

    with atomic_path(out / "models" / GENERATOR_FILE) as tmp:
        torch.save({k: v.detach().cpu() for k, v in gan.g_ab.state_dict().items()}, tmp)
    _write_samples(gan, loaders[0], out / "logs" / SAMPLES_FILE)
    info = json.loads((out / "logs" / RUN_INFO).read_text(encoding="utf-8"))
    info.update(
        {
            "normal_images": len(normal),
            "covid_images": len(covid),
            "device": str(device),
            "train_seconds": round(time.perf_counter() - start, 2),
        }
    )
    write_json_atomic(out / "logs" / RUN_INFO, info)
    return str(out)


def _write_samples(gan: CycleGAN, loader: Any, path: Path, count: int = 4) -> None:
    """PNG grid, one column per Normal image: real Normal / synthetic COVID-19 / reconstructed Normal."""
    batches = []
    for batch in loader:  # batches hold batch_size images (often 1): gather ``count``
        batches.append(convert_to_tensor(batch["image"], track_meta=False))
        if sum(len(b) for b in batches) >= count:
            break
    real = torch.cat(batches)[:count].to(gan.device)
    with torch.no_grad():
        gan.g_ab.eval()
        gan.g_ba.eval()
        fake = gan.g_ab(real)
        rec = gan.g_ba(fake)
    rows = torch.cat([real, fake, rec]).cpu()
    grid = make_grid((rows.clamp(-1, 1) + 1) / 2, nrow=real.shape[0], padding=2, pad_value=1.0)
    pixels = (grid[0].numpy() * 255).round().astype(np.uint8)
    with atomic_path(path) as tmp:
        Image.fromarray(pixels).save(tmp, format="PNG")


def _prepare_output_dir(bundle_root: str, output_dir: str, params: Mapping[str, Any]) -> Path:
    """Create configs/ (with the run's parameters), models/, logs/ and logs/run_info.json."""
    out = Path(output_dir).resolve()
    source = Path(bundle_root).resolve() / "configs"
    if out == source.parent or source.parent in out.parents:
        raise BundleError(f"output_dir {out} is inside the source bundle; pass --output_dir DIR elsewhere")
    for sub in ("configs", "models", "logs"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    for name in CONFIG_FILES:
        src = source / name
        if not src.is_file():
            raise BundleError(f"bundle config {src} is missing")
        if not name.endswith(".json"):
            write_text_atomic(out / "configs" / name, src.read_text(encoding="utf-8"))
            continue
        config = json.loads(src.read_text(encoding="utf-8"))
        if name == "train.json":
            config.update({k: v for k, v in params.items() if k in config})
            config["output_dir"] = str(out)
        elif name == "synthesize.json":
            config.update({k: params[k] for k in SYNTHESIS_PARAMETERS})
            config["gan_dir"] = str(out)
        write_json_atomic(out / "configs" / name, config)
    write_json_atomic(
        out / "logs" / RUN_INFO,
        {
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "parameters": dict(params),
            "versions": _versions(),
        },
    )
    return out


def _versions() -> dict[str, str]:
    import monai

    return {"monai": monai.__version__, "torch": torch.__version__, "numpy": np.__version__}
