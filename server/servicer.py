"""The CXRTriage gRPC servicer: read the bytes, predict, explain; errors mapped to status codes.

Every request goes through the same reader, pre-processing and explanation code as the CLI
(:mod:`cxr_monai.io`, :class:`~cxr_monai.predictor.Predictor`, :mod:`cxr_monai.explain.record`).
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, NoReturn

import grpc
import numpy as np

from cxr_monai.api.v1 import cxr_triage_pb2 as pb
from cxr_monai.api.v1 import cxr_triage_pb2_grpc
from cxr_monai.constants import RESEARCH_USE_NOTICE
from cxr_monai.errors import CXRMonaiError
from cxr_monai.explain.gradcam import Explainer, area_above, class_index, peak_location
from cxr_monai.explain.record import explained_image
from cxr_monai.io import CXRImage, read_cxr
from cxr_monai.predictor import Predictor

logger = logging.getLogger(__name__)


def request_tag(data: bytes) -> str:
    """A short hash of the request bytes for logs: lets operators correlate calls, reveals nothing."""
    return hashlib.sha256(data).hexdigest()[:12]


class CXRTriageServicer(cxr_triage_pb2_grpc.CXRTriageServicer):
    """Serves one trained bundle.

    Model calls are serialised by a lock: Captum attaches hooks to the shared model during Grad-CAM,
    and a concurrent forward pass would run through them. Reading the file and rendering the outputs run
    in parallel; pre-processing and the network run under the lock.
    """

    def __init__(self, predictor: Predictor, explain_batch_size: int = 1) -> None:
        self._predictor = predictor
        self._explainer = Explainer(predictor.model, predictor.preprocess, batch_size=explain_batch_size)
        self._model_lock = threading.Lock()

    def GetModelInfo(self, request: pb.GetModelInfoRequest, context: grpc.ServicerContext) -> pb.ModelInfo:
        p = self._predictor
        return pb.ModelInfo(
            name=p.model_name,
            version=p.model_version,
            backbone=p.backbone,
            spatial_size=p.spatial_size,
            class_names=list(p.class_names),
            intended_use=RESEARCH_USE_NOTICE,
        )

    def Classify(self, request: pb.ClassifyRequest, context: grpc.ServicerContext) -> pb.ClassifyResponse:
        start = time.perf_counter()
        with _user_errors(context, request.image):
            image = self._read(request.image, context)
            with self._model_lock:
                prediction = self._predictor.predict([image])[0]
            response = self._classification(image, prediction.probabilities)
        self._log("Classify", request.image, response.predicted_class, start)
        return response

    def Explain(self, request: pb.ExplainRequest, context: grpc.ServicerContext) -> pb.ExplainResponse:
        start = time.perf_counter()
        with _user_errors(context, request.image):
            target = self._target(request.target_class, context)
            image = self._read(request.image, context)
            if request.secondary_capture and image.dataset is None:
                _abort(context, grpc.StatusCode.FAILED_PRECONDITION, "secondary_capture needs a DICOM input")
            with self._model_lock:
                result = self._explainer.explain([image], target)[0]
            explained = explained_image(self._predictor, "<request>", image, result)
            heat = explained.heatmap
            response = pb.ExplainResponse(
                classification=self._classification(image, result.probabilities),
                explained_class=self._predictor.class_names[result.target_index],
                heatmap_u8=np.round(heat * 255.0).astype(np.uint8).tobytes(),
                area_above_half=area_above(heat, 0.5),
                overlay_png=explained.overlay_png(),
            )
            if float(heat.max()) > 0:
                response.peak_row, response.peak_column = peak_location(heat)
            if request.secondary_capture:
                response.secondary_capture_dicom = explained.secondary_capture_bytes()
        self._log("Explain", request.image, response.classification.predicted_class, start)
        return response

    def _read(self, data: bytes, context: grpc.ServicerContext) -> CXRImage:
        if not data:
            _abort(context, grpc.StatusCode.INVALID_ARGUMENT, "image: empty; send the file's bytes")
        return read_cxr(data)

    def _target(self, name: str, context: grpc.ServicerContext) -> int | None:
        if not name:
            return None
        try:
            return class_index(name, self._predictor.class_names)
        except CXRMonaiError as exc:
            _abort(context, grpc.StatusCode.INVALID_ARGUMENT, f"target_class: {exc}")

    def _classification(self, image: CXRImage, probabilities: Any) -> pb.ClassifyResponse:
        names = self._predictor.class_names
        probs = np.asarray(probabilities, dtype=np.float64)
        rows, cols = image.shape
        return pb.ClassifyResponse(
            probabilities=[
                pb.ClassProbability(class_name=n, probability=float(p))
                for n, p in zip(names, probs, strict=True)
            ],
            predicted_class=names[int(np.argmax(probs))],
            warnings=list(image.warnings),
            intended_use=RESEARCH_USE_NOTICE,
            rows=rows,
            columns=cols,
        )

    @staticmethod
    def _log(method: str, data: bytes, predicted: str, start: float) -> None:
        elapsed_ms = (time.perf_counter() - start) * 1000.0
        logger.info(
            "%s %s (%d bytes): %s in %.0f ms", method, request_tag(data), len(data), predicted, elapsed_ms
        )


@contextmanager
def _user_errors(context: grpc.ServicerContext, data: bytes) -> Iterator[None]:
    """Turn any :class:`CXRMonaiError` (unreadable image, a header the DICOM writer refuses ...) into
    INVALID_ARGUMENT with its message; the request is logged by hash only."""
    try:
        yield
    except CXRMonaiError as exc:
        logger.info("rejected request %s: %s", request_tag(data), exc)
        _abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc))


def _abort(context: grpc.ServicerContext, code: grpc.StatusCode, message: str) -> NoReturn:
    """``context.abort`` raises; this wrapper tells the type checker so."""
    context.abort(code, message)
    raise AssertionError("unreachable: context.abort raises")
