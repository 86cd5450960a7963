"""Synthetic COVID-19 training images from a trained CycleGAN, and the datalist that includes them.

``synthesize_covid`` runs the Normal -> COVID-19 generator on ``n`` Normal training images drawn with a
seed (each once, in a shuffled order; when ``n`` exceeds their number, further shuffled rounds) and
writes into ``output_dir``::

    images/synthetic_covid_0001.png ...   8-bit grayscale, spatial_size x spatial_size
    datalist.json                         the input datalist with one training item per image appended
    synthesize_report.json                counts, seed, gan_dir, source datalist

A synthetic item is ``{"image", "label": 0, "label_name": "COVID-19", "patient_id":
"synthetic:<source patient>", "source": "cyclegan", "fold": <source fold>, "synthetic": true,
"source_image": <source path>, "gan_fold": <fold the GAN left out, -1 for none>}``: it keeps its
source's fold, so no patient crosses folds, and it is never put in ``test``. Classifier validation skips
synthetic items, and a cross-validation run on fold K trains only on those whose GAN never saw fold K
(``gan_fold == K``; ``cxr_monai.training.fold_items``): a GAN trained on every fold has seen fold K's
COVID-19 images.
"""

from __future__ import annotations

import copy
import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.bundle import ConfigParser
from monai.data import DataLoader, Dataset
from PIL import Image

from cxr_monai.atomic import atomic_path, write_json_atomic
from cxr_monai.constants import CLASS_NAMES
from cxr_monai.data import DATALIST_FILENAME, load_datalist
from cxr_monai.errors import BundleError, DatasetError, WeightsError
from cxr_monai.gan.data import COVID, domain_items, gan_transforms
from cxr_monai.gan.trainer import GENERATOR_FILE

REPORT_FILE = "synthesize_report.json"
IMAGES_DIR = "images"
SYNTHETIC_SOURCE = "cyclegan"


def gan_left_out_fold(gan_dir: str | Path) -> int:
    """The cross-validation fold the GAN was trained without (``logs/run_info.json``); -1 when it saw
    every training fold, or when the record is missing (the safe assumption)."""
    info = Path(gan_dir) / "logs" / "run_info.json"
    try:
        return int(json.loads(info.read_text(encoding="utf-8"))["parameters"]["fold"])
    except (OSError, ValueError, KeyError, TypeError):
        return -1


def load_generator(gan_dir: str | Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, int]:
    """(generator in eval mode, spatial_size) of a trained GAN directory.

    The network is ``network_def`` of ``configs/synthesize.json``, the weights
    ``models/generator_normal2covid.pt``.
    Raises BundleError when the config is missing, WeightsError when the weights are missing or do not fit.
    """
    gan_dir = Path(gan_dir)
    config_path = gan_dir / "configs" / "synthesize.json"
    if not config_path.is_file():
        raise BundleError(f"{config_path} not found: --gan DIR must be a CycleGAN training output_dir")
    parser = ConfigParser()
    parser.read_config(str(config_path))
    weights = gan_dir / "models" / GENERATOR_FILE
    if not weights.is_file():
        raise WeightsError(
            f"generator weights {weights} not found; train the GAN first (bundles/cxr_cyclegan)"
        )
    network = parser.get_parsed_content("network_def")
    try:
        network.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    except (RuntimeError, OSError, ValueError) as exc:
        raise WeightsError(
            f"generator weights {weights} do not fit {config_path}'s network_def: {exc}"
        ) from exc
    return network.to(device).eval(), int(parser["spatial_size"])


def synthesize_covid(
    gan_dir: str | Path,
    datalist: str | Path,
    output_dir: str | Path,
    n: int = 100,
    seed: int = 0,
    batch_size: int = 8,
    fold: int = -1,
    device: str | torch.device | None = None,
    on_image: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Write ``n`` synthetic COVID-19 images, the extended datalist and the report (module doc).

    Sources are real Normal training items (outside ``fold`` when >= 0). ``on_image(done, total)`` is
    called after each batch. Returns the report dict. Images appear only once all are written.
    """
    if int(n) < 1:
        raise DatasetError(f"n = {n}: ask for at least one synthetic image")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    generator, spatial_size = load_generator(gan_dir, device)
    gan_fold = gan_left_out_fold(gan_dir)
    content = load_datalist(datalist)
    normal, _ = domain_items(content, fold)
    rng = np.random.default_rng(seed)
    # Successive shuffles of the pool: every Normal image is used once before any is used twice.
    rounds = -(-int(n) // len(normal))
    order = np.concatenate([rng.permutation(len(normal)) for _ in range(rounds)])[: int(n)]
    chosen = [normal[i] for i in order]

    out = Path(output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    final_images = out / IMAGES_DIR
    staging = Path(tempfile.mkdtemp(prefix=f".{IMAGES_DIR}.", dir=out))
    try:
        new_items = _write_images(
            generator, chosen, staging, final_images, spatial_size, batch_size, device, on_image, gan_fold
        )
        if final_images.exists():
            shutil.rmtree(final_images)
        staging.rename(final_images)
    finally:
        shutil.rmtree(staging, ignore_errors=True)

    extended = copy.deepcopy(content)
    extended["training"].extend(new_items)
    write_json_atomic(out / DATALIST_FILENAME, extended)
    report = {
        "gan_dir": str(Path(gan_dir).resolve()),
        "source_datalist": str(Path(datalist).resolve()),
        "datalist": str(out / DATALIST_FILENAME),
        "seed": int(seed),
        "fold_excluded": int(fold) if fold >= 0 else None,
        "gan_fold": gan_fold,
        "spatial_size": spatial_size,
        "synthetic_images": len(new_items),
        "distinct_source_images": len({item["source_image"] for item in new_items}),
        "normal_pool": len(normal),
        "synthetic_per_fold": {
            str(f): sum(1 for item in new_items if item["fold"] == f)
            for f in sorted({item["fold"] for item in new_items})
        },
        "training_items": len(extended["training"]),
        "test_items": len(extended["test"]),
    }
    write_json_atomic(out / REPORT_FILE, report)
    return report


def _write_images(
    generator: torch.nn.Module,
    sources: list[dict[str, Any]],
    staging: Path,
    final_dir: Path,
    spatial_size: int,
    batch_size: int,
    device: torch.device,
    on_image: Callable[[int, int], None] | None,
    gan_fold: int,
) -> list[dict[str, Any]]:
    """Generate from ``sources`` in order into PNGs in ``staging``; items name their ``final_dir`` path."""
    data = [{"image": item["image"]} for item in sources]
    loader = DataLoader(
        Dataset(data, gan_transforms(spatial_size, augment=False)), batch_size=int(batch_size)
    )
    items: list[dict[str, Any]] = []
    with torch.no_grad():
        for batch in loader:
            fakes = generator(batch["image"].to(device)).clamp(-1, 1)
            pixels = ((fakes[:, 0].cpu().numpy() + 1.0) * 127.5).round().astype(np.uint8)
            for image in pixels:
                source = sources[len(items)]
                name = f"synthetic_covid_{len(items) + 1:04d}.png"
                with atomic_path(staging / name) as tmp:
                    Image.fromarray(image).save(tmp, format="PNG")
                items.append(
                    {
                        "image": str(final_dir / name),
                        "label": COVID,
                        "label_name": CLASS_NAMES[COVID],
                        "patient_id": f"synthetic:{source['patient_id']}",
                        "source": SYNTHETIC_SOURCE,
                        "fold": int(source["fold"]),
                        "synthetic": True,
                        "source_image": str(source["image"]),
                        "gan_fold": gan_fold,
                    }
                )
            if on_image is not None:
                on_image(len(items), len(sources))
    return items
