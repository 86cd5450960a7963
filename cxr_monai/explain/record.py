"""What a person or a PACS receives for one explained image: the JSON record, the overlay, the DICOM.

Shared by ``cxr-monai explain``, the gRPC server and the gateway, so all give the same text, numbers and
pictures. Probabilities and the predicted class are the film's site-calibrated ones; every output states
the site's calibration status (:class:`~cxr_monai.site.profile.SiteStatus`): the overlay in one line
(:func:`site_line`), the JSON record in a ``site`` block with the model's own probabilities, the
Secondary Capture in its overlay and ImageComments, the Structured Report in each measurement group.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from cxr_monai.constants import RESEARCH_USE_NOTICE
from cxr_monai.errors import CXRMonaiError
from cxr_monai.explain.gradcam import AREA_THRESHOLD, Explanation, area_above, normalise, peak_location
from cxr_monai.explain.overlay import render_overlay
from cxr_monai.explain.secondary_capture import build_secondary_capture
from cxr_monai.explain.structured_report import build_structured_report
from cxr_monai.io import CXRImage
from cxr_monai.predictor import Predictor
from cxr_monai.site.profile import SiteStatus

#: Record key of the fraction of the image above the map threshold.
AREA_KEY = f"fraction_above_{AREA_THRESHOLD:g}"


@dataclass(frozen=True)
class ExplainedImage:
    """One image's explanation, ready to write or send.

    Attributes:
        image: the image as read.
        result: probabilities, classes and the raw map.
        heatmap: float32 (rows, cols) in [0, 1], normalised by its own maximum (all zero stays zero).
        overlay: uint8 RGB (rows, cols, 3): the film with the map blended in, text and colour bar burned in.
        record: the JSON record (no patient data, no UIDs).
    """

    image: CXRImage
    result: Explanation
    heatmap: np.ndarray
    overlay: np.ndarray
    record: dict[str, Any]

    def overlay_png(self) -> bytes:
        """The overlay encoded as PNG."""
        buffer = io.BytesIO()
        Image.fromarray(self.overlay, mode="RGB").save(buffer, format="PNG")
        return buffer.getvalue()

    @property
    def peak_row_col(self) -> tuple[int, int] | None:
        """(row, column) of the map's maximum on the original grid; None for an all-zero map."""
        peak = self.record["heatmap"]["peak_row_col"]
        return None if peak is None else (int(peak[0]), int(peak[1]))

    @property
    def area_above_threshold(self) -> float:
        """Fraction of the image where the normalised map exceeds :data:`AREA_THRESHOLD`."""
        return float(self.record["heatmap"][AREA_KEY])

    def secondary_capture(self) -> tuple[Any, dict[str, Any]]:
        """(highdicom SCImage of the overlay in the source's study, referencing the source; notes for the
        record: the orientation basis, modality and lossy history used).

        Raises:
            CXRMonaiError: the input was not DICOM, so there is no study to join; InvalidImageError:
                the source lacks a UID the SC needs (see ``build_secondary_capture``).
        """
        if self.image.dataset is None:
            raise CXRMonaiError("not a DICOM input: no source study for a Secondary Capture")
        spacing = self.image.extra.get("pixel_spacing_mm")
        return build_secondary_capture(
            self.image.dataset, self.overlay, spacing, site_status=self.result.site.message()
        )

    def secondary_capture_bytes(self) -> bytes:
        """The Secondary Capture as DICOM Part 10 bytes."""
        return dicom_bytes(self.secondary_capture()[0])

    def structured_report(self) -> Any:
        """highdicom Comprehensive SR (TID 1500) of the classification, referencing the source image.

        Raises:
            CXRMonaiError: the input was not DICOM; InvalidImageError: the source lacks a UID.
        """
        if self.image.dataset is None:
            raise CXRMonaiError("not a DICOM input: no source study for a Structured Report")
        model = self.record["model"]
        return build_structured_report(
            self.image.dataset,
            self.result.probabilities,
            self.result.predicted_index,
            model["name"],
            model["version"],
            class_names=tuple(self.record["probabilities"]),
            site_status=self.result.site.message(),
        )


def dicom_bytes(dataset: Any) -> bytes:
    """A pydicom/highdicom data set as DICOM Part 10 bytes (preamble + file meta)."""
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def heatmap_summary(heat: np.ndarray) -> dict[str, Any]:
    """Where and how much a normalised map (rows, cols) in [0, 1] lights up: ``peak_row_col`` (None for an
    all-zero map) and the fraction of pixels above :data:`AREA_THRESHOLD` (key :data:`AREA_KEY`)."""
    row, col = peak_location(heat)
    return {"peak_row_col": [row, col] if float(heat.max()) > 0 else None, AREA_KEY: area_above(heat)}


def site_line(status: SiteStatus) -> str:
    """The overlay's line on the site: ``Site: site X calibrated (bias, 10 films, 2026-12-02)`` or
    ``Site X: uncalibrated - probabilities NOT calibrated for this hospital`` (``Site unknown`` without
    a site)."""
    if status.profile is not None:
        return f"Site: {status.profile.summary()}"
    return f"Site {status.site or 'unknown'}: uncalibrated - probabilities NOT calibrated for this hospital"


def overlay_lines(predictor: Predictor, image: CXRImage, result: Explanation) -> list[str]:
    """Text burned into the overlay: prediction, probabilities, site status, explained class, model,
    warnings, notice."""
    names = predictor.class_names
    probs = "  ".join(f"{n} {p:.2f}" for n, p in zip(names, result.probabilities, strict=True))
    lines = [f"Predicted: {names[result.predicted_index]}   ({probs})", site_line(result.site)]
    lines.append(
        f"Grad-CAM for: {names[result.target_index]}   model {predictor.model_name} "
        f"{predictor.model_version} ({predictor.backbone})"
    )
    lines.extend(f"Warning: {w}" for w in image.warnings)
    lines.append(RESEARCH_USE_NOTICE)
    return lines


def explanation_record(
    predictor: Predictor, source_name: str, image: CXRImage, result: Explanation, heat: np.ndarray
) -> dict[str, Any]:
    """The JSON record of one input (no patient data, no UIDs). ``probabilities`` are the site-calibrated
    ones; ``site`` holds the site's status and the model's own probabilities."""
    names = predictor.class_names
    model_probabilities = {n: float(p) for n, p in zip(names, result.model_probabilities, strict=True)}
    return {
        "input": source_name,
        "source_format": image.source_format,
        "original_shape": list(image.shape),
        "probabilities": {n: float(p) for n, p in zip(names, result.probabilities, strict=True)},
        "predicted_class": names[result.predicted_index],
        "explained_class": names[result.target_index],
        "site": {**result.site.to_record(), "model_probabilities": model_probabilities},
        "model": {
            "name": predictor.model_name,
            "version": predictor.model_version,
            "backbone": predictor.backbone,
            "spatial_size": predictor.spatial_size,
        },
        "heatmap": {
            "method": "Grad-CAM (Captum LayerGradCam, ReLU, bilinear), mapped to the original pixel grid",
            "normalisation": "per image, divided by its maximum",
            **heatmap_summary(heat),
        },
        "warnings": list(image.warnings),
        "intended_use": RESEARCH_USE_NOTICE,
    }


def explained_image(
    predictor: Predictor, source_name: str, image: CXRImage, result: Explanation
) -> ExplainedImage:
    """Normalise the map, render the overlay and build the record for one image."""
    heat = normalise(result.raw_map)
    overlay = render_overlay(image.pixels, heat, overlay_lines(predictor, image, result))
    record = explanation_record(predictor, source_name, image, result, heat)
    return ExplainedImage(image=image, result=result, heatmap=heat, overlay=overlay, record=record)
