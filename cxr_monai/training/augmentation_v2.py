"""Augmentation v2 for cross-validation: one CycleGAN per fold, trained without that fold, and its
synthetic COVID-19 images added to that fold's training items only.

For each fold K: the ``cxr_cyclegan`` bundle's ``train.json`` runs with ``fold = K`` (so the GAN never
sees fold K's images, which validate fold K's classifier), then :func:`cxr_monai.gan.synthesize.
synthesize_covid` turns ``n_synthetic`` Normal training images from outside fold K into COVID-19 items
carrying ``gan_fold = K``. All folds' synthetic items go into one augmented datalist; the classifier's
``fold_items`` trains fold K only on items with ``gan_fold == K`` and never validates on synthetic items,
and the test list is the input's, untouched. (A ``--final retrain`` model trains on every fold's
synthetic items.)

GAN runs are cached under ``cache_dir/fold{K}-{key}/`` where ``key`` hashes the datalist's content
(image paths resolved), the fold and the GAN parameters, so a second backbone reuses the first one's GANs::

    fold0-<key>/gan/                   the trained GAN directory (bundle output_dir)
    fold0-<key>/gan/logs/gan_training_items.json   the images the GAN trained on (its ``train#domains``)
    fold0-<key>/synthetic_n100_seed0/  images/, datalist.json, synthesize_report.json, quality.json
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ignite.engine import Events

from cxr_monai.atomic import write_json_atomic
from cxr_monai.data import items_for_fold, load_datalist
from cxr_monai.errors import BundleError, CXRMonaiError
from cxr_monai.gan.synthesize import REPORT_FILE, synthesize_covid
from cxr_monai.gan.trainer import GENERATOR_FILE
from cxr_monai.gan.trainer import default_bundle_root as gan_bundle_root
from cxr_monai.training.layout import RUN_INFO

logger = logging.getLogger(__name__)

AUGMENTATIONS: tuple[str, ...] = ("v1", "v2")
GAN_TRAINING_ITEMS = "gan_training_items.json"
QUALITY_FILE = "quality.json"
AUGMENTED_DATALIST = "augmented_datalist.json"

#: Called as ``progress(stage, done, total)``: stage ``"GAN fold K"`` (iterations), ``"synthesis fold
#: K"`` (images) or ``"GAN quality fold K"`` (0 then 1).
StageCallback = Callable[[str, int, int], None]


@dataclass(frozen=True)
class GanSettings:
    """The CycleGAN parameters a v2 run sets (the rest are the bundle's defaults, the paper's values):
    ``iterations`` (paper 5000), square ``spatial_size`` in pixels, generator/discriminator width
    ``base_channels`` (paper 64), ``n_residual_blocks`` (6), ``seed``."""

    iterations: int = 5000
    spatial_size: int = 128
    base_channels: int = 64
    n_residual_blocks: int = 6
    seed: int = 0

    def overrides(self) -> dict[str, Any]:
        """The ``train.json`` keys these settings fix."""
        return {
            "max_iterations": int(self.iterations),
            "spatial_size": int(self.spatial_size),
            "base_channels": int(self.base_channels),
            "disc_base_channels": int(self.base_channels),
            "n_residual_blocks": int(self.n_residual_blocks),
            "seed": int(self.seed),
        }


def datalist_hash(datalist: str | Path) -> str:
    """SHA-256 of the datalist's content with image paths resolved (the same file moved elsewhere, or a
    relative path now pointing at other images, hashes differently)."""
    content = load_datalist(datalist)
    return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()


def cache_entry(cache_dir: str | Path, data_hash: str, fold: int, settings: GanSettings) -> Path:
    """``cache_dir/fold{K}-{16 hex digits}``: one entry per (datalist content, fold, GAN parameters)."""
    key = json.dumps({"datalist": data_hash, "fold": int(fold), "gan": settings.overrides()}, sort_keys=True)
    return Path(cache_dir) / f"fold{int(fold)}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def _finished(gan_dir: Path, settings: GanSettings, fold: int) -> bool:
    """A GAN directory whose run completed with these parameters (generator written, run_info agrees)."""
    try:
        recorded = json.loads((gan_dir / "logs" / RUN_INFO).read_text(encoding="utf-8"))["parameters"]
    except (OSError, ValueError, KeyError):
        return False
    wanted = {**settings.overrides(), "fold": int(fold)}
    same = all(recorded.get(key) == value for key, value in wanted.items())
    return same and (gan_dir / "models" / GENERATOR_FILE).is_file()


def train_fold_gan(
    datalist: str | Path,
    fold: int,
    settings: GanSettings,
    entry: Path,
    device: str | None = None,
    progress: StageCallback | None = None,
) -> tuple[Path, bool]:
    """Train (or find in the cache ``entry``) the CycleGAN that leaves ``fold`` out; returns (GAN
    directory, cache hit). An interrupted run resumes from its checkpoint (the bundle's own resume)."""
    from monai.bundle import ConfigWorkflow

    gan_dir = entry / "gan"
    stage = f"GAN fold {fold}"
    if _finished(gan_dir, settings, fold):
        if progress is not None:
            progress(stage, settings.iterations, settings.iterations)
        return gan_dir, True
    root = Path(gan_bundle_root())
    overrides: dict[str, Any] = {**settings.overrides(), "fold": int(fold), "datalist": str(datalist)}
    if device:
        overrides["device"] = f"$torch.device({device!r})"
    workflow = ConfigWorkflow(
        config_file=str(root / "configs" / "train.json"),
        meta_file=str(root / "configs" / "metadata.json"),
        logging_file=False,
        workflow_type="train",
        bundle_root=str(root),
        output_dir=str(gan_dir),
        **overrides,
    )
    try:
        workflow.initialize()
        trainer = workflow.trainer
        normal, covid = workflow.parser.get_parsed_content("train#domains")
    except RuntimeError as exc:  # MONAI's config parser wraps what a config expression raised
        cause = exc.__cause__
        raise cause if isinstance(cause, CXRMonaiError) else exc from None
    write_json_atomic(
        gan_dir / "logs" / GAN_TRAINING_ITEMS,
        {
            "fold_left_out": int(fold),
            "normal": [i["image"] for i in normal],
            "covid": [i["image"] for i in covid],
        },
    )
    if progress is not None:
        trainer.add_event_handler(
            Events.ITERATION_COMPLETED, lambda e: progress(stage, e.state.iteration, settings.iterations)
        )
    workflow.run()
    workflow.finalize()
    if not _finished(gan_dir, settings, fold):
        raise BundleError(f"CycleGAN run {gan_dir} ended without writing models/{GENERATOR_FILE}")
    return gan_dir, False


def synthesize_fold(
    gan_dir: Path,
    datalist: str | Path,
    fold: int,
    n_synthetic: int,
    seed: int,
    entry: Path,
    device: str | None = None,
    progress: StageCallback | None = None,
) -> tuple[Path, list[dict[str, Any]]]:
    """Synthesise (or find in the cache) ``n_synthetic`` COVID-19 items from Normal images outside
    ``fold``; returns (synthesis folder, the synthetic items)."""
    folder = entry / f"synthetic_n{int(n_synthetic)}_seed{int(seed)}"
    stage = f"synthesis fold {fold}"
    if not (folder / REPORT_FILE).is_file():
        synthesize_covid(
            gan_dir,
            datalist,
            folder,
            n=n_synthetic,
            seed=seed,
            fold=fold,
            device=device,
            on_image=None if progress is None else (lambda done, total: progress(stage, done, total)),
        )
    elif progress is not None:
        progress(stage, n_synthetic, n_synthetic)
    synthetic = [
        item for item in load_datalist(folder / "datalist.json")["training"] if item.get("synthetic")
    ]
    if any(int(item.get("gan_fold", -1)) != int(fold) for item in synthetic):
        raise BundleError(f"{folder}: synthetic items of another GAN fold; delete the folder and rerun")
    return folder, synthetic


def fold_quality(
    datalist: str | Path,
    fold: int,
    folder: Path,
    synthetic: Sequence[dict[str, Any]],
    seed: int,
    progress: StageCallback | None = None,
) -> dict[str, Any]:
    """:func:`cxr_monai.gan.quality.gan_quality` of one fold's synthetic images against the real training
    images the GAN learnt from (outside ``fold``), cached as ``quality.json`` in the synthesis folder."""
    from cxr_monai.gan.quality import gan_quality

    path = folder / QUALITY_FILE
    stage = f"GAN quality fold {fold}"
    if path.is_file():
        quality: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    else:
        if progress is not None:
            progress(stage, 0, 1)
        real, _ = items_for_fold(load_datalist(datalist), fold)
        quality = gan_quality(real, [str(i["image"]) for i in synthetic], seed=seed)
        write_json_atomic(path, quality)
    if progress is not None:
        progress(stage, 1, 1)
    return quality


def augment_datalist(
    datalist: str | Path,
    folds: Sequence[int],
    out_path: str | Path,
    cache_dir: str | Path,
    settings: GanSettings,
    n_synthetic: int = 100,
    seed: int = 0,
    device: str | None = None,
    quality: bool = True,
    progress: StageCallback | None = None,
) -> dict[str, Any]:
    """Train (or reuse) each fold's GAN, synthesise, optionally measure quality, and write the augmented
    datalist to ``out_path`` (the input's items plus every fold's synthetic items, image paths absolute).
    Returns the record ``cv_summary.json`` keeps under ``augmentation``."""
    data_hash = datalist_hash(datalist)
    content = load_datalist(datalist)
    per_fold = []
    for fold in folds:
        entry = cache_entry(cache_dir, data_hash, fold, settings)
        gan_dir, hit = train_fold_gan(datalist, fold, settings, entry, device, progress)
        logger.info("fold %d: CycleGAN %s (%s)", fold, gan_dir, "cached" if hit else "trained")
        folder, synthetic = synthesize_fold(
            gan_dir, datalist, fold, n_synthetic, seed, entry, device, progress
        )
        content["training"].extend(synthetic)
        per_fold.append(
            {
                "fold": int(fold),
                "gan_dir": str(gan_dir.resolve()),
                "gan_cache_hit": hit,
                "synthetic_dir": str(folder.resolve()),
                "n_synthetic": len(synthetic),
                "quality": fold_quality(datalist, fold, folder, synthetic, seed, progress)
                if quality
                else None,
            }
        )
    write_json_atomic(Path(out_path), content)
    return {
        "kind": "v2",
        "source_datalist": str(Path(datalist).resolve()),
        "datalist_sha256": data_hash,
        "augmented_datalist": str(Path(out_path).resolve()),
        "gan": asdict(settings),
        "n_synthetic": int(n_synthetic),
        "seed": int(seed),
        "cache_dir": str(Path(cache_dir).resolve()),
        "folds": per_fold,
    }


def record_augmentation(out: str | Path, summary: dict[str, Any], record: dict[str, Any]) -> dict[str, Any]:
    """``summary`` with ``augmentation`` = ``record``, rewritten to ``out/cv_summary.json``."""
    from cxr_monai.training.crossval import CV_SUMMARY

    updated = {**summary, "augmentation": record}
    write_json_atomic(Path(out) / CV_SUMMARY, updated)
    return updated
