"""Grad-CAM heat maps (Captum ``LayerGradCam``) carried back onto the original image's pixel grid.

One call does one forward pass and a backward pass from the target logit to the hooked block only::

    (B, 3, S, S) network input ──► LayerGradCam on ``model.gradcam_layer`` (ReLU'd, (B, 1, h, w))
        ──► bilinear upsampling to (S, S) ──► :func:`to_original_grid` (rows, cols) ──► normalise

:func:`to_original_grid` is the one place that inverts the inference chain's geometry (a stretch resize
of (rows, cols) to (S, S), see :func:`cxr_monai.transforms.inference_transforms`).

With a site calibration (:class:`~cxr_monai.site.profile.SiteStatus`) the predicted class - the one
explained when no class is named - is the arg-max of the calibrated probabilities, not of the logits.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import torch
from captum.attr import LayerAttribution, LayerGradCam
from monai.data import MetaTensor
from monai.transforms import Resize
from torch import nn
from torch.nn.modules import module as torch_module

from cxr_monai.constants import CLASS_NAMES
from cxr_monai.errors import CXRMonaiError
from cxr_monai.io import CXRImage
from cxr_monai.site.profile import SiteStatus

#: Threshold of the normalised map that defines the "heat-map area" (fraction of the image above it).
AREA_THRESHOLD: float = 0.5


def count_hooks(model: nn.Module) -> int:
    """Forward/backward (pre-)hooks on ``model``'s modules plus torch's global module hooks."""
    per_module = sum(
        len(m._forward_hooks)
        + len(m._forward_pre_hooks)
        + len(m._backward_hooks)
        + len(m._backward_pre_hooks)
        for m in model.modules()
    )
    global_hooks = (
        len(torch_module._global_forward_hooks)
        + len(torch_module._global_forward_pre_hooks)
        + len(torch_module._global_backward_hooks)
        + len(torch_module._global_backward_pre_hooks)
    )
    return per_module + global_hooks


def class_index(name: str, class_names: Sequence[str] = CLASS_NAMES) -> int:
    """Position of ``name`` in ``class_names`` (case-insensitive); a CXRMonaiError names the choices."""
    lowered = [c.lower() for c in class_names]
    if name.lower() not in lowered:
        raise CXRMonaiError(f"unknown class {name!r}; expected one of {', '.join(class_names)}")
    return lowered.index(name.lower())


@dataclass(frozen=True)
class GradCAMBatch:
    """Grad-CAM of one batch on the network input grid.

    Attributes:
        maps: float32 (B, S, S), >= 0, not normalised (units of logit x activation).
        probabilities: float32 (B, C), softmax of the logits of the same forward pass (the model's own,
            before any site calibration).
        target_indices: int64 (B,), the class each map explains.
    """

    maps: np.ndarray
    probabilities: np.ndarray
    target_indices: np.ndarray


class GradCAM:
    """Captum ``LayerGradCam`` on ``layer`` (default ``model.gradcam_layer``) of an eager classifier.

    The forward function handed to Captum runs ``model`` once, keeps its logits (for the probabilities)
    and returns each image's target logit (predicted class, or the class given), so the prediction and
    the map come from one forward pass instead of two. That pass records the autograd graph only from
    ``layer`` on (the trunk before it runs without gradients), so a call costs about one inference
    forward plus a backward through the head.

    Not re-entrant across threads for one model: hooks live on the shared modules, so concurrent
    calls on the same model must be serialised (one lock per model).
    """

    def __init__(self, model: nn.Module, layer: nn.Module | None = None) -> None:
        if isinstance(model, torch.jit.ScriptModule):
            raise TypeError("Grad-CAM needs the eager model: hooks do not attach to TorchScript")
        self.model = model
        self.layer: nn.Module = layer if layer is not None else cast(nn.Module, model.gradcam_layer)

    def __call__(
        self,
        inputs: torch.Tensor,
        target: int | None = None,
        calibrate: Callable[[np.ndarray], np.ndarray] | None = None,
    ) -> GradCAMBatch:
        """Explain a batch.

        Args:
            inputs: float32 (B, 3, S, S) network input (already pre-processed).
            target: class index to explain for every image; None explains each image's predicted class.
            calibrate: the model's probabilities (B, C) -> the probabilities the predicted class is read
                from (B, C), e.g. each film's site calibration; None: the arg-max of the logits.

        Raises:
            RuntimeError: Captum left a hook on the model (it removes its own; this guards the contract).
        """
        hooks_before = count_hooks(self.model)
        kept: dict[str, torch.Tensor] = {}

        def target_logit(x: torch.Tensor) -> torch.Tensor:
            # Autograd is needed only from the hooked layer on: run the trunk before it without
            # recording a graph, and switch recording on as the layer starts (grad mode is thread-local).
            enable = self.layer.register_forward_pre_hook(_record_gradients_from_here)
            try:
                with torch.no_grad():
                    logits = self.model(x)
            finally:
                enable.remove()
            kept["logits"] = logits.detach()
            if target is not None:
                index = torch.full((logits.shape[0],), int(target), dtype=torch.long, device=logits.device)
            elif calibrate is not None:
                probabilities = torch.softmax(logits.detach().float(), dim=1).cpu().numpy()
                chosen = np.argmax(calibrate(probabilities), axis=1)
                index = torch.as_tensor(chosen, dtype=torch.long, device=logits.device)
            else:
                index = logits.detach().argmax(dim=1)
            kept["index"] = index
            return logits.gather(1, index[:, None]).squeeze(1)  # (B,): one scalar per image

        cam = LayerGradCam(forward_func=target_logit, layer=self.layer)
        attributions = cam.attribute(inputs, target=None, relu_attributions=True)
        if count_hooks(self.model) != hooks_before:
            raise RuntimeError("Grad-CAM left hooks on the model")
        upsampled = LayerAttribution.interpolate(
            attributions, tuple(inputs.shape[-2:]), interpolate_mode="bilinear"
        )
        return GradCAMBatch(
            maps=upsampled[:, 0].detach().float().cpu().numpy(),
            probabilities=torch.softmax(kept["logits"].float(), dim=1).cpu().numpy(),
            target_indices=kept["index"].cpu().numpy(),
        )


def _record_gradients_from_here(module: nn.Module, args: Any) -> None:
    """Forward pre-hook: switch autograd recording on for the rest of this thread's forward pass."""
    torch.set_grad_enabled(True)


def to_original_grid(
    heatmap: np.ndarray, original_shape: tuple[int, int], cropped: tuple[int, int, int, int] = (0, 0, 0, 0)
) -> np.ndarray:
    """Carry a map from the network grid (S, S) back onto the original image's (rows, cols).

    The inference chain stretches (rows, cols) to (S, S) with MONAI ``Resize`` (bilinear, pixel centres
    aligned, ``align_corners=False``); the inverse is the same resize back. With ``crop_borders`` the
    chain first cropped ``cropped`` = (top, bottom, left, right) pixels of dark frame: the map is resized
    onto the cropped region and the frame gets 0. Flips are not part of the inference chain.

    Returns: float32 (rows, cols), values within the input map's range (and 0).
    """
    rows, cols = (int(s) for s in original_shape)
    top, bottom, left, right = (int(c) for c in cropped)
    inner = (rows - top - bottom, cols - left - right)
    resize = Resize(inner, mode="bilinear", anti_aliasing=False)
    out = np.zeros((rows, cols), dtype=np.float32)
    resized = resize(torch.as_tensor(np.asarray(heatmap, dtype=np.float32))[None])
    out[top : top + inner[0], left : left + inner[1]] = np.asarray(resized[0], dtype=np.float32)
    return out


def crop_of(x: Any) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) pixels a ``CropForeground`` step of the pre-processing removed, read from
    the MetaTensor's record of applied operations; zeros when there was none."""
    for op in getattr(x, "applied_operations", []) or []:
        if op.get("class") == "CropForeground":
            top, bottom, left, right = (int(v) for v in op["extra_info"]["cropped"])
            return top, bottom, left, right
    return (0, 0, 0, 0)


def normalise(heatmap: np.ndarray, maximum: float | None = None) -> np.ndarray:
    """Scale a non-negative map to [0, 1] by ``maximum`` (default: its own maximum).

    An all-zero map (or ``maximum == 0``) stays all zero instead of dividing by zero.
    """
    peak = float(np.max(heatmap)) if maximum is None else float(maximum)
    if peak <= 0.0:
        return np.zeros_like(heatmap, dtype=np.float32)
    return np.clip(heatmap / peak, 0.0, 1.0).astype(np.float32)


def normalise_series(heatmaps: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Normalise each map of a series by the series maximum, so areas compare from study to study."""
    series_max = max((float(np.max(h)) for h in heatmaps), default=0.0)
    return [normalise(h, series_max) for h in heatmaps]


def peak_location(heatmap: np.ndarray) -> tuple[int, int]:
    """(row, col) of the map's maximum, in the map's own pixel grid."""
    row, col = np.unravel_index(int(np.argmax(heatmap)), heatmap.shape)
    return int(row), int(col)


def area_above(heatmap: np.ndarray, threshold: float = AREA_THRESHOLD) -> float:
    """Fraction of the pixels of a normalised map strictly above ``threshold``."""
    return float(np.mean(heatmap > threshold))


@dataclass(frozen=True)
class Explanation:
    """Prediction and Grad-CAM of one image.

    Attributes:
        probabilities: float (C,) as the film's site reads them (the model's own when uncalibrated).
        predicted_index: argmax of ``probabilities``.
        target_index: the class the map explains.
        raw_map: float32 (rows, cols) on the original pixel grid, >= 0, not normalised.
        model_probabilities: float32 (C,), the model's own, before any site calibration.
        site: the film's site and the profile applied (or the flag that none was).
    """

    probabilities: np.ndarray
    predicted_index: int
    target_index: int
    raw_map: np.ndarray
    model_probabilities: np.ndarray
    site: SiteStatus

    @classmethod
    def of(
        cls, model_probabilities: np.ndarray, target_index: int, raw_map: np.ndarray, site: SiteStatus
    ) -> Explanation:
        """The explanation of one film from the model's probabilities (C,), calibrated for ``site``."""
        probabilities = site.apply(model_probabilities)
        return cls(
            probabilities=probabilities,
            predicted_index=int(np.argmax(probabilities)),
            target_index=int(target_index),
            raw_map=raw_map,
            model_probabilities=model_probabilities,
            site=site,
        )


class Explainer:
    """Pre-process, predict and explain images in batches with one eager model.

    Args:
        model: the eager classifier (eval mode) with a ``gradcam_layer``.
        preprocess: CXRImage -> float32 (3, S, S), e.g. ``inference_transforms(S)``.
        batch_size: images per Grad-CAM call.
    """

    def __init__(
        self,
        model: nn.Module,
        preprocess: Callable[[Any], Any],
        batch_size: int = 8,
        layer: nn.Module | None = None,
    ) -> None:
        self.cam = GradCAM(model, layer)
        self.preprocess = preprocess
        self.batch_size = max(1, int(batch_size))
        self.device = next(model.parameters()).device

    def explain(
        self, images: Sequence[CXRImage], target: int | None = None, sites: Sequence[SiteStatus] | None = None
    ) -> list[Explanation]:
        """One :class:`Explanation` per image, in order; ``target`` None explains the predicted class.

        ``sites``: each image's site status (its calibration picks the predicted class); None: every
        image uncalibrated, site unknown.
        """
        statuses = list(sites) if sites is not None else [SiteStatus(None, None)] * len(images)
        if len(statuses) != len(images):
            raise ValueError(f"{len(statuses)} site statuses for {len(images)} images")
        results: list[Explanation] = []
        for start in range(0, len(images), self.batch_size):
            chunk = images[start : start + self.batch_size]
            chunk_sites = statuses[start : start + self.batch_size]
            with torch.no_grad():  # pre-processing only; Grad-CAM below enables gradients itself
                inputs = [self.preprocess(img) for img in chunk]
                batch = torch.stack([_plain_tensor(x) for x in inputs])
            out = self.cam(batch.float().to(self.device), target, _calibrator(chunk_sites))
            for i, image in enumerate(chunk):
                raw_map = to_original_grid(out.maps[i], image.shape, crop_of(inputs[i]))
                results.append(
                    Explanation.of(out.probabilities[i], int(out.target_indices[i]), raw_map, chunk_sites[i])
                )
        return results


def _calibrator(sites: Sequence[SiteStatus]) -> Callable[[np.ndarray], np.ndarray] | None:
    """Probabilities (B, C) -> each row calibrated for its film's site; None when no site has a profile."""
    if not any(site.calibrated for site in sites):
        return None
    return lambda p: np.stack([site.apply(row) for site, row in zip(sites, p, strict=True)])


def _plain_tensor(x: Any) -> torch.Tensor:
    """A MONAI MetaTensor (or array) as a plain tensor, so the model sees no metadata."""
    return x.as_tensor() if isinstance(x, MetaTensor) else torch.as_tensor(x)
