"""The one inference core the CLI and the server share: load a trained bundle, predict batches.

A *trained bundle* is a directory with ``configs/inference.json`` (its ``network_def`` builds the
network; ``backbone`` and ``spatial_size`` describe it), ``configs/metadata.json`` (name, version) and
``models/model.pt`` (a plain ``state_dict`` of that network).

Pre-processing is :func:`cxr_monai.transforms.inference_transforms` - the same chain builder as the
bundle's ``preprocessing`` - so a file gives the same tensor here as through ``monai.bundle``.

Site profiles (``<bundle>/sites/*.json``, :mod:`cxr_monai.site.profile`) are loaded with the bundle and
checked against the SHA-256 of ``models/model.pt``; :meth:`Predictor.predict` applies a film's site
calibration after the network. :meth:`Predictor.predict_tensors` stays the model's own probabilities
(training, evaluation and calibration fitting read those).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.bundle import ConfigParser
from monai.transforms import Compose
from torch import nn

from cxr_monai.constants import CLASS_NAMES, DEFAULT_SPATIAL_SIZE
from cxr_monai.errors import BundleError
from cxr_monai.io import CXRImage, ImageSource
from cxr_monai.networks import read_state_dict
from cxr_monai.site.profile import SITES_DIR, SiteProfiles, SiteStatus, model_digest
from cxr_monai.transforms import inference_transforms

logger = logging.getLogger(__name__)

INFERENCE_CONFIG = Path("configs") / "inference.json"
METADATA = Path("configs") / "metadata.json"
WEIGHTS = Path("models") / "model.pt"


@dataclass(frozen=True)
class Prediction:
    """One image's result.

    Attributes:
        probabilities: float (K,) summing to 1, in class order, as the film's site reads them (the
            model's own when the site has no profile).
        predicted_index, predicted_class: the arg-max of ``probabilities``.
        model_probabilities: float32 (K,), the network's softmax before any site calibration.
        site: the film's site and the profile applied (or the flag that none was).
    """

    probabilities: np.ndarray
    predicted_index: int
    predicted_class: str
    model_probabilities: np.ndarray
    site: SiteStatus


def default_device() -> torch.device:
    """CUDA when available, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def read_bundle_config(bundle_dir: str | Path) -> ConfigParser:
    """Parse ``configs/inference.json`` (with ``configs/metadata.json`` under ``_meta_``, if present).

    Raises:
        BundleError: the directory, ``configs/`` or ``inference.json`` is missing or unreadable.
    """
    bundle = Path(bundle_dir)
    if not bundle.is_dir():
        raise BundleError(
            f"{bundle}: no such bundle directory (expected a trained bundle: configs/, models/)"
        )
    config_file = bundle / INFERENCE_CONFIG
    if not config_file.is_file():
        raise BundleError(
            f"{config_file}: missing; {bundle} is not a trained bundle (configs/inference.json)"
        )
    parser = ConfigParser()
    try:
        parser.read_config(str(config_file))
        if (bundle / METADATA).is_file():
            parser.read_meta(str(bundle / METADATA))
    except (ValueError, OSError) as exc:
        raise BundleError(f"{config_file}: cannot be read ({exc})") from exc
    if "network_def" not in parser:
        raise BundleError(f"{config_file}: has no 'network_def'")
    return parser


class Predictor:
    """A network in eval mode plus its pre-processing.

    Attributes:
        model: the eager ``nn.Module`` (eval mode, on ``device``); logits (B, K) from (B, 3, S, S).
        backbone: the bundle's ``backbone`` name.
        spatial_size: S, the square input side in pixels.
        model_name, model_version: from ``metadata.json`` (``"unknown"`` when absent).
        class_names: the class order of the probabilities.
        preprocessing_options: ``histogram_equalize`` / ``crop_borders`` as the bundle was trained with.
        preprocess: path/bytes/CXRImage -> tensor (3, S, S), ImageNet-normalised.
        device: where the network runs.
        model_digest: SHA-256 (hex) of the weights file (``"unknown"`` when not loaded from a bundle).
        sites: the site profiles of this model and the unknown-site policy (none: every film flagged).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        backbone: str,
        spatial_size: int = DEFAULT_SPATIAL_SIZE,
        model_name: str = "unknown",
        model_version: str = "unknown",
        class_names: Sequence[str] = CLASS_NAMES,
        device: str | torch.device | None = None,
        histogram_equalize: bool = False,
        crop_borders: bool = False,
        model_digest: str = "unknown",
        sites: SiteProfiles | None = None,
    ) -> None:
        self.device = torch.device(device) if device is not None else default_device()
        self.model = model.to(self.device).eval()
        self.backbone = backbone
        self.spatial_size = int(spatial_size)
        self.model_name = model_name
        self.model_version = model_version
        self.class_names = tuple(class_names)
        self.preprocessing_options = {"histogram_equalize": histogram_equalize, "crop_borders": crop_borders}
        self.preprocess: Compose = inference_transforms(self.spatial_size, histogram_equalize, crop_borders)
        self.model_digest = model_digest
        self.sites = sites if sites is not None else SiteProfiles({})

    @classmethod
    def from_bundle(
        cls,
        bundle_dir: str | Path,
        device: str | torch.device | None = None,
        site_profiles: str | Path | None = None,
        unknown_site: str = "flag",
        with_sites: bool = True,
    ) -> Predictor:
        """Build ``network_def`` from the bundle, load ``models/model.pt`` into it (strictly) and load the
        site profiles of ``site_profiles`` (default ``<bundle>/sites``; none when it does not exist).
        ``with_sites=False`` loads none (commands that score the model's own probabilities: evaluate,
        compare, export, site calibrate), so a stale profile cannot block them.

        ``unknown_site``: ``flag`` (a film of a site without a profile keeps the model's probabilities,
        marked uncalibrated) or ``refuse`` (:meth:`predict` raises ``SiteNotCalibratedError``).

        Raises:
            BundleError: a config or the weights file is missing, unreadable, or does not fit the network;
                a site profile is damaged or was fitted for other weights.
        """
        bundle = Path(bundle_dir)
        parser = read_bundle_config(bundle)
        weights = bundle / WEIGHTS
        if not weights.is_file():
            raise BundleError(f"{weights}: missing; {bundle} holds no trained weights (models/model.pt)")
        try:
            network = parser.get_parsed_content("network_def", instantiate=True)
        # ConfigParser wraps a construction error in RuntimeError; a bad reference or target raises the rest
        except (RuntimeError, ValueError, KeyError, TypeError, AttributeError, ImportError) as exc:
            raise BundleError(f"{bundle / INFERENCE_CONFIG}: cannot build 'network_def' ({exc})") from exc
        if not isinstance(network, nn.Module):
            raise BundleError(f"{bundle / INFERENCE_CONFIG}: 'network_def' is not a torch nn.Module")
        state = read_state_dict(weights, BundleError)
        try:
            network.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            first_line = str(exc).splitlines()[0]
            detail = " ".join(line.strip() for line in str(exc).splitlines()[1:3])
            raise BundleError(
                f"{weights}: does not match the bundle's network_def ({first_line} {detail[:300]})"
            ) from exc
        digest = model_digest(weights)
        sites = (
            SiteProfiles.load(site_profiles or bundle / SITES_DIR, digest, unknown_site)
            if with_sites
            else SiteProfiles({}, unknown_site)
        )
        meta: dict[str, Any] = parser.get("_meta_", {}) or {}
        backbone = _parsed(parser, "backbone", getattr(network, "backbone_name", "unknown"))
        predictor = cls(
            network,
            backbone=str(backbone),
            spatial_size=int(_parsed(parser, "spatial_size", DEFAULT_SPATIAL_SIZE)),
            model_name=str(meta.get("name", bundle.name)),
            model_version=str(meta.get("version", "unknown")),
            device=device,
            histogram_equalize=bool(_parsed(parser, "histogram_equalize", False)),
            crop_borders=bool(_parsed(parser, "crop_borders", False)),
            model_digest=digest,
            sites=sites,
        )
        logger.info(
            "loaded bundle %s (%s, backbone %s, %d px) on %s; site profiles: %s (unknown sites: %s)",
            bundle,
            predictor.model_version,
            predictor.backbone,
            predictor.spatial_size,
            predictor.device,
            ", ".join(sorted(sites.profiles)) or "none",
            unknown_site,
        )
        return predictor

    @torch.inference_mode()
    def predict_tensors(self, batch: torch.Tensor) -> np.ndarray:
        """Pre-processed images (B, 3, S, S) -> probabilities (B, K), float32."""
        logits = self.model(batch.to(self.device))
        return torch.softmax(logits.float(), dim=1).cpu().numpy()

    def predict(
        self, images: Sequence[ImageSource | CXRImage], batch_size: int = 8, site: str | None = None
    ) -> list[Prediction]:
        """Classify images (paths, file bytes or decoded :class:`CXRImage`) from ``site`` (None: unknown),
        ``batch_size`` at a time; the site's calibration, when it has a profile, is applied.

        Raises:
            SiteNotCalibratedError: the site has no profile and the policy is ``refuse`` (before any image
                is read).
            InvalidImageError: an image cannot be read (the message names it).
        """
        status = self.sites.resolve(site)
        results: list[Prediction] = []
        for batch in self._batches(images, batch_size):
            for probs in self.predict_tensors(batch):
                calibrated = status.apply(probs)
                index = int(np.argmax(calibrated))
                results.append(Prediction(calibrated, index, self.class_names[index], probs, status))
        return results

    def predict_with_features(
        self, images: Sequence[ImageSource | CXRImage], batch_size: int = 8
    ) -> tuple[np.ndarray, np.ndarray]:
        """Probabilities (N, K) and pooled trunk features (N, F), float32, from one forward pass per batch,
        with the same pre-processing as :meth:`predict`.

        The features are the input of the network's ``head`` (the paper's head: global average pooling,
        dense, dropout, dense), global-average-pooled over space when it is a feature map (B, F, h, w):
        for :class:`cxr_monai.networks.CXRClassifier` the trunk's pooled output (F = 1280 for
        EfficientNet-B0, 2048 for ResNet50, 512 for VGG16).

        Raises:
            BundleError: the network has no ``head`` module.
            InvalidImageError: an image cannot be read (the message names it).
        """
        if not images:
            raise ValueError("no images given")
        head = getattr(self.model, "head", None)
        if not isinstance(head, nn.Module):
            raise BundleError(
                f"network {type(self.model).__name__} has no 'head' module: pooled features need one"
            )
        captured: list[torch.Tensor] = []
        hook = head.register_forward_pre_hook(lambda _module, args: captured.append(args[0]))
        probs: list[np.ndarray] = []
        try:
            for batch in self._batches(images, batch_size):
                probs.append(self.predict_tensors(batch))
        finally:
            hook.remove()
        pooled = [x.float().mean(dim=(2, 3)) if x.ndim == 4 else x.float().flatten(1) for x in captured]
        return np.concatenate(probs), torch.cat(pooled).cpu().numpy()

    def _batches(self, images: Sequence[ImageSource | CXRImage], batch_size: int) -> Iterator[torch.Tensor]:
        """Pre-processed batches (B, 3, S, S) of ``images``, ``batch_size`` at a time."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        for start in range(0, len(images), batch_size):
            chunk = images[start : start + batch_size]
            yield torch.stack([torch.as_tensor(self.preprocess(image)) for image in chunk])


def _parsed(parser: ConfigParser, key: str, default: Any) -> Any:
    """The resolved value of a top-level config key, or ``default`` when the config lacks it."""
    return parser.get_parsed_content(key) if key in parser else default
