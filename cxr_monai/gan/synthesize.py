"""Synthetic COVID-19 training images from a trained CycleGAN, and the datalist that includes them.

The bundle's ``inference.json`` is the synthesis: a MONAI ``SupervisedEvaluator`` runs the Normal ->
COVID-19 generator on ``n`` Normal training images drawn with a seed (:func:`source_items`: each once,
in a shuffled order; when ``n`` exceeds their number, further shuffled rounds) and :class:`SyntheticWriter`
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
COVID-19 images. Image paths of the written datalist are absolute (relative ones are resolved against the
input datalist's folder), so it works from its new folder.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from ignite.engine import Engine, Events
from PIL import Image

from cxr_monai.atomic import atomic_path, write_json_atomic
from cxr_monai.constants import CLASS_NAMES
from cxr_monai.data import DATALIST_FILENAME, load_datalist
from cxr_monai.errors import BundleError, CXRMonaiError, DatasetError
from cxr_monai.gan.data import COVID, domain_items
from cxr_monai.training.layout import RUN_INFO

REPORT_FILE = "synthesize_report.json"
IMAGES_DIR = "images"
SYNTHETIC_SOURCE = "cyclegan"


def gan_left_out_fold(gan_dir: str | Path) -> int:
    """The cross-validation fold the GAN was trained without (``logs/run_info.json``); -1 when it saw
    every training fold, or when the record is missing (the safe assumption)."""
    info = Path(gan_dir) / "logs" / RUN_INFO
    try:
        return int(json.loads(info.read_text(encoding="utf-8"))["parameters"]["fold"])
    except (OSError, ValueError, KeyError, TypeError):
        return -1


def source_items(datalist: str | Path, n: int, seed: int = 0, fold: int = -1) -> list[dict[str, Any]]:
    """``n`` real Normal training items (outside ``fold`` when >= 0), drawn with ``seed``: successive
    shuffles of the pool, so every Normal image is used once before any is used twice.
    DatasetError for ``n < 1`` or a datalist without Normal (or COVID-19) training items."""
    if int(n) < 1:
        raise DatasetError(f"n = {n}: ask for at least one synthetic image")
    normal, _ = domain_items(datalist, fold)
    rng = np.random.default_rng(seed)
    rounds = -(-int(n) // len(normal))
    order = np.concatenate([rng.permutation(len(normal)) for _ in range(rounds)])[: int(n)]
    return [normal[i] for i in order]


class SyntheticWriter:
    """Evaluator handler writing the generator's outputs (``engine.state.output["pred"]``, (B, 1, S, S)
    in [-1, 1], in the order of ``sources``) as PNGs, then at ``COMPLETED`` the extended datalist and the
    report (module doc). Images appear under ``images/`` only once all are written."""

    def __init__(
        self,
        output_dir: str,
        datalist: str,
        sources: list[dict[str, Any]],
        gan_dir: str,
        seed: int = 0,
        fold: int = -1,
    ) -> None:
        if not output_dir:
            raise BundleError("no output directory given: pass --output_dir DIR")
        self.out = Path(output_dir).resolve()
        self.datalist = Path(datalist).resolve()
        self.sources = sources
        self.gan_dir = Path(gan_dir).resolve()
        self.gan_fold = gan_left_out_fold(gan_dir)
        self.seed, self.fold = int(seed), int(fold)
        self.items: list[dict[str, Any]] = []
        self.staging = self.out

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._write_batch)
        engine.add_event_handler(Events.COMPLETED, self._completed)

    def _started(self, engine: Engine) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        for stale in self.out.glob(f".{IMAGES_DIR}.*"):  # left by an interrupted run
            shutil.rmtree(stale, ignore_errors=True)
        self.staging = Path(tempfile.mkdtemp(prefix=f".{IMAGES_DIR}.", dir=self.out))
        self.items = []

    def _write_batch(self, engine: Engine) -> None:
        fakes = _pred(engine).detach().clamp(-1, 1)
        pixels = ((fakes[:, 0].cpu().numpy() + 1.0) * 127.5).round().astype(np.uint8)
        for image in pixels:
            source = self.sources[len(self.items)]
            name = f"synthetic_covid_{len(self.items) + 1:04d}.png"
            with atomic_path(self.staging / name) as tmp:
                Image.fromarray(image).save(tmp, format="PNG")
            self.items.append(
                {
                    "image": str(self.out / IMAGES_DIR / name),
                    "label": COVID,
                    "label_name": CLASS_NAMES[COVID],
                    "patient_id": f"synthetic:{source['patient_id']}",
                    "source": SYNTHETIC_SOURCE,
                    "fold": int(source["fold"]),
                    "synthetic": True,
                    "source_image": str(source["image"]),
                    "gan_fold": self.gan_fold,
                }
            )

    def _completed(self, engine: Engine) -> None:
        final_images = self.out / IMAGES_DIR
        if final_images.exists():
            shutil.rmtree(final_images)
        self.staging.rename(final_images)
        extended = load_datalist(self.datalist)
        extended["training"].extend(self.items)
        write_json_atomic(self.out / DATALIST_FILENAME, extended)
        report = {
            "gan_dir": str(self.gan_dir),
            "source_datalist": str(self.datalist),
            "datalist": str(self.out / DATALIST_FILENAME),
            "seed": self.seed,
            "fold_excluded": self.fold if self.fold >= 0 else None,
            "gan_fold": self.gan_fold,
            "spatial_size": int(_pred(engine).shape[-1]),
            "synthetic_images": len(self.items),
            "distinct_source_images": len({item["source_image"] for item in self.items}),
            "normal_pool": len(domain_items(extended, self.fold)[0]),
            "synthetic_per_fold": {
                str(f): sum(1 for item in self.items if item["fold"] == f)
                for f in sorted({item["fold"] for item in self.items})
            },
            "training_items": len(extended["training"]),
            "test_items": len(extended["test"]),
        }
        write_json_atomic(self.out / REPORT_FILE, report)


def _pred(engine: Engine) -> torch.Tensor:
    """The generator's output batch (B, 1, S, S) of the evaluator's last iteration."""
    return cast(dict[str, torch.Tensor], engine.state.output)["pred"]


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
    """Run the trained GAN directory's ``configs/inference.json`` (module doc) and return its report.

    ``on_image(done, total)`` is called after each batch. BundleError when ``gan_dir`` is not a trained
    GAN directory or its generator file is missing or does not fit; DatasetError for a bad datalist.
    """
    from monai.bundle import ConfigWorkflow

    config = Path(gan_dir) / "configs" / "inference.json"
    if not config.is_file():
        raise BundleError(f"{config} not found: --gan DIR must be a CycleGAN training output_dir")
    overrides: dict[str, Any] = {
        "datalist": str(datalist),
        "output_dir": str(output_dir),
        "n": int(n),
        "seed": int(seed),
        "batch_size": int(batch_size),
        "fold": int(fold),
    }
    if device is not None:
        overrides["device"] = f"$torch.device('{torch.device(device)}')"
    workflow = ConfigWorkflow(
        config_file=str(config),
        meta_file=str(config.parent / "metadata.json"),
        logging_file=False,  # the caller's logging stays as configured
        workflow_type="infer",
        **overrides,
    )
    try:
        workflow.initialize()
        evaluator = workflow.evaluator
    except RuntimeError as exc:  # MONAI's config parser wraps what a config expression raised
        cause = exc.__cause__
        raise cause if isinstance(cause, CXRMonaiError) else exc from None
    if on_image is not None:
        total = int(n)
        evaluator.add_event_handler(
            Events.ITERATION_COMPLETED,
            lambda engine: on_image(min(engine.state.iteration * int(batch_size), total), total),
        )
    workflow.run()
    workflow.finalize()
    return dict(json.loads((Path(output_dir) / REPORT_FILE).read_text(encoding="utf-8")))
