"""The CXRTriage gRPC servicer: read the bytes, predict, explain; errors mapped to status codes.

Every request goes through the same reader, pre-processing and explanation code as the CLI
(:mod:`cxr_monai.io`, :class:`~cxr_monai.predictor.Predictor`, :mod:`cxr_monai.explain.record`).

A call runs in stages: read -> pre-process -> model -> explain -> encode. Before each stage the call is
abandoned when the client cancelled it, its deadline (the client's, or the server's per-request time
limit, whichever is sooner) has passed, or the server is shutting down. Only the model stage is
serialised (one lock per model: Captum attaches hooks to the shared model during Grad-CAM, and a
concurrent forward pass would run through them); reading and pre-processing run in parallel.

Classify (and ClassifyStudy) hand their pre-processed images to a
:class:`~cxr_monai.server.batching.MicroBatcher`, so concurrent calls share one model call. The classify
backend is the eager network (batches under the model lock) or an ONNX Runtime session exported from it
(no lock: it shares nothing with Grad-CAM); Explain always runs eager Grad-CAM.

Sites: a request's ``site`` is resolved against the predictor's site profiles before its image is read;
the site's calibration is applied to the model's probabilities after the model (whichever backend ran it),
and the reply carries the status. A site without a profile is flagged, or under ``--unknown-site refuse``
answered FAILED_PRECONDITION.

Admission (:mod:`cxr_monai.server.admission`) counts work, not open calls: ``max_inflight`` work slots,
held while an image is read, pre-processed, modelled and encoded (a ClassifyStudy stream holds none while
it waits for its next message, and is cancelled after ``stream_idle_timeout_s`` without one); a call that
finds every slot taken waits in a bounded queue (``max_queue`` places, ``queue_timeout_s``) before it is
answered RESOURCE_EXHAUSTED; and a memory budget (``max_memory_mb``) that every call reserves from its
image's header (pixels times a per-method factor) before the pixels are decoded. grpcio's synchronous
server has one thread pool for all services, so the pool is sized slots + queue places + spares: work and
waiting calls can never occupy the threads that answer health, reflection and refusals.
"""

from __future__ import annotations

import enum
import hashlib
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import CancelledError, Future
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from typing import Any, NoReturn, TypeVar

import grpc
import numpy as np
import torch
from cxr_monai.server.admission import Admission, IdleWatch, Refused
from cxr_monai.server.batching import BatchingConfig, MicroBatcher
from monai.data import MetaTensor

from cxr_monai.api.v1 import cxr_triage_pb2 as pb
from cxr_monai.api.v1 import cxr_triage_pb2_grpc
from cxr_monai.constants import RESEARCH_USE_NOTICE
from cxr_monai.errors import CXRMonaiError, DatasetError, InvalidImageError
from cxr_monai.explain.gradcam import (
    Explanation,
    GradCAM,
    class_index,
    crop_of,
    to_original_grid,
)
from cxr_monai.explain.record import explained_image
from cxr_monai.export import OnnxModel, softmax
from cxr_monai.io import DEFAULT_LIMITS, CXRImage, ImageLimits, read_cxr
from cxr_monai.predictor import Predictor
from cxr_monai.site.profile import SiteNotCalibratedError, SiteStatus, check_site_name

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: What building the Secondary Capture raises for a malformed source header value (a date that is not
#: a date, an unknown character set, a sex that is not M/F/O ...); the messages quote the value.
_HEADER_VALUE_ERRORS = (
    ValueError,
    TypeError,
    AttributeError,
    KeyError,
    IndexError,
    LookupError,
    UnicodeError,
)
#: Bytes of a reply besides the per-pixel parts (probabilities, names, warnings) - a generous bound.
_REPLY_OVERHEAD_BYTES = 64 * 1024
#: How often a call waiting for the model re-checks its deadline and the server's state.
_POLL_S = 0.05
#: Most images one ClassifyStudy call may stream.
MAX_STUDY_IMAGES = 64
#: Peak memory of one call per decoded pixel (bytes), measured on a 7,071 x 7,071 PNG (50 megapixels)
#: with the EfficientNet-Lite2 bundle: Classify 771 MB (the float32 image and pre-processing copies),
#: Explain 3.47 GB (the map on the original grid, its normalised copy and the overlay rendered at full
#: size); a Secondary Capture adds an RGB copy and its encoding.
CLASSIFY_BYTES_PER_PIXEL = 16
EXPLAIN_BYTES_PER_PIXEL = 72
SECONDARY_CAPTURE_BYTES_PER_PIXEL = 8


def request_tag(data: bytes) -> str:
    """A short hash of the request bytes for logs: lets operators correlate calls, reveals nothing."""
    return hashlib.sha256(data).hexdigest()[:12]


@dataclass(frozen=True)
class ServiceLimits:
    """What one server admits.

    Attributes:
        max_inflight: work slots: images read, pre-processed, modelled or encoded at once.
        request_timeout_s: server-side time limit per call (seconds), or None for the client's deadline only.
        image: pixel budgets checked from the header before decoding.
        max_queue: calls waiting for a slot (or for memory) plus open ClassifyStudy streams; beyond it
            a call gets RESOURCE_EXHAUSTED at once.
        queue_timeout_s: longest wait for a slot or for memory before RESOURCE_EXHAUSTED.
        stream_idle_timeout_s: a ClassifyStudy stream that sends no message for this long is cancelled
            (None: never).
        max_memory_mb: memory budget (MiB) for the images and requests of the calls admitted together;
            an image whose estimate exceeds it is refused from its header.
    """

    max_inflight: int = 4
    request_timeout_s: float | None = 60.0
    image: ImageLimits = field(default_factory=lambda: DEFAULT_LIMITS)
    max_queue: int = 64
    queue_timeout_s: float = 10.0
    stream_idle_timeout_s: float | None = 10.0
    max_memory_mb: int = 4096

    def __post_init__(self) -> None:
        if self.max_inflight < 1:
            raise CXRMonaiError(f"max in-flight calls must be at least 1, got {self.max_inflight}")
        if self.request_timeout_s is not None and self.request_timeout_s <= 0:
            raise CXRMonaiError(f"request timeout must be positive, got {self.request_timeout_s}")
        if self.max_queue < 0:
            raise CXRMonaiError(f"max queue must be 0 or more, got {self.max_queue}")
        if self.queue_timeout_s < 0:
            raise CXRMonaiError(f"queue timeout must be 0 or more, got {self.queue_timeout_s}")
        if self.stream_idle_timeout_s is not None and self.stream_idle_timeout_s <= 0:
            raise CXRMonaiError(f"stream idle timeout must be positive, got {self.stream_idle_timeout_s}")
        if self.max_memory_mb < 1:
            raise CXRMonaiError(f"memory budget must be at least 1 MiB, got {self.max_memory_mb}")


@dataclass(frozen=True, eq=False)
class MeteredLimits(ImageLimits):
    """The server's :class:`ImageLimits` for one image: every reader calls :meth:`check` with the header's
    rows and columns before decoding, and ``on_check`` then reserves the image's memory (or refuses)."""

    on_check: Callable[[int, int], None] | None = None

    def check(self, rows: int, cols: int, name: str, what: str = "image") -> None:
        super().check(rows, cols, name, what)
        if self.on_check is not None:
            self.on_check(rows, cols)


class State(enum.Enum):
    """Where the servicer is in its life: it admits work only while SERVING."""

    WARMING = "warming up"
    SERVING = "serving"
    DRAINING = "shutting down"


class _Abandon(Exception):
    """A call stops at a stage boundary; carries the status to answer with."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


def reply_bytes_bound(rows: int, cols: int, *, overlay: bool, secondary_capture: bool) -> int:
    """Worst-case size (bytes) of an ExplainResponse for a ``rows`` x ``cols`` image.

    The heat map is one byte per pixel; the overlay PNG is bounded by its raw RGB size (PNG can exceed
    it only by a few bytes per row, inside the overhead); the Secondary Capture is uncompressed RGB.
    """
    pixels = rows * cols
    return pixels * (1 + 3 * overlay + 3 * secondary_capture) + rows * 8 + _REPLY_OVERHEAD_BYTES


class CXRTriageServicer(cxr_triage_pb2_grpc.CXRTriageServicer):
    """Serves one trained bundle; see the module docstring for stages, deadlines and load shedding.

    Starts in :attr:`State.WARMING` (work answered UNAVAILABLE) until :meth:`warm_up` has run the model.
    ``max_reply_bytes`` (set by the server to its message limit): an Explain whose worst-case reply is
    larger is refused before the model runs.
    """

    def __init__(
        self,
        predictor: Predictor,
        limits: ServiceLimits | None = None,
        *,
        batching: BatchingConfig | None = None,
        onnx_model: OnnxModel | None = None,
    ) -> None:
        self._predictor = predictor
        self.limits = limits or ServiceLimits()
        self.max_reply_bytes = 64 * 1024 * 1024
        self._cam = GradCAM(predictor.model)
        self._model_lock = threading.Lock()
        if onnx_model is not None:
            onnx_model.check_matches(predictor)
            self.backend = "onnx"
            self.batcher = MicroBatcher(lambda batch: softmax(onnx_model.logits(batch)), batching)
        else:
            self.backend = "eager"
            self.batcher = MicroBatcher(predictor.predict_tensors, batching, lock=self._model_lock)
        limits = self.limits
        self.admission = Admission(
            limits.max_inflight, limits.max_queue, limits.queue_timeout_s, limits.max_memory_mb * 2**20
        )
        timeout = limits.stream_idle_timeout_s
        self._idle_watch = IdleWatch(timeout) if timeout is not None else None
        self._inflight = 0
        self._idle = threading.Condition()
        self._abandon = threading.Event()
        self.state = State.WARMING

    # --- life cycle -------------------------------------------------------------------------------

    def warm_up(self) -> None:
        """One forward pass and one Grad-CAM on a blank input, then admit work (:attr:`State.SERVING`)."""
        size = self._predictor.spatial_size
        blank = torch.zeros(1, 3, size, size)
        with self._model_lock:
            self._cam(blank.to(self._predictor.device), None)
        self.batcher.run([blank[0]])
        self.state = State.SERVING
        logger.info("model warm: serving")

    def drain(self) -> None:
        """Admit no new work (answered UNAVAILABLE); calls in flight go on."""
        self.state = State.DRAINING

    def abandon(self) -> None:
        """Calls in flight stop at their next stage boundary (answered UNAVAILABLE)."""
        self._abandon.set()

    def close(self) -> None:
        """Refuse new work to the batcher and cancel images still waiting for the model."""
        self.batcher.close()
        if self._idle_watch is not None:
            self._idle_watch.close()

    def wait_idle(self, timeout_s: float) -> int:
        """Wait up to ``timeout_s`` for calls in flight to end; the number still running."""
        with self._idle:
            self._idle.wait_for(lambda: self._inflight == 0, timeout=max(0.0, timeout_s))
            return self._inflight

    # --- RPCs -------------------------------------------------------------------------------------

    def GetModelInfo(self, request: pb.GetModelInfoRequest, context: grpc.ServicerContext) -> pb.ModelInfo:
        p = self._predictor
        return pb.ModelInfo(
            name=p.model_name,
            version=p.model_version,
            backbone=p.backbone,
            spatial_size=p.spatial_size,
            class_names=list(p.class_names),
            intended_use=RESEARCH_USE_NOTICE,
            classify_backend=self.backend,
            calibrated_sites=sorted(p.sites.profiles),
            unknown_site=p.sites.unknown_site,
        )

    def Classify(self, request: pb.ClassifyRequest, context: grpc.ServicerContext) -> pb.ClassifyResponse:
        with self._call("Classify", context, request.image) as call:
            site = self._site(request.site)
            image = call.stage("read", self._read, request.image, call.limits(CLASSIFY_BYTES_PER_PIXEL))
            tensor, _ = call.stage("pre-process", self._preprocess, image)
            probabilities = call.batched([self.batcher.submit(tensor[0])])[0]
            response = call.stage(
                "encode", self._classification, image.shape, image.warnings, probabilities, site
            )
            call.predicted = _described(response)
        return response

    def ClassifyStudy(
        self, requests: Iterable[pb.ClassifyRequest], context: grpc.ServicerContext
    ) -> pb.ClassifyStudyResponse:
        with self._call("ClassifyStudy", context, stream=True) as call:
            # what the replies need of each image (its shape and warnings); its pixels are dropped once
            # pre-processed, and with them its memory reservation
            images: list[tuple[tuple[int, int], tuple[str, ...]]] = []
            futures: list[Future[np.ndarray]] = []
            site = SiteStatus(None, None)
            try:
                for index, request in enumerate(call.messages(requests)):
                    if index == 0:  # the first message's site applies to the whole study
                        site = self._site(request.site)
                    if index == MAX_STUDY_IMAGES:
                        raise InvalidImageError(f"a study holds at most {MAX_STUDY_IMAGES} images")
                    call.add_request(request.image)
                    with call.working(len(request.image)):
                        try:
                            limits = call.limits(CLASSIFY_BYTES_PER_PIXEL)
                            image = call.stage("read", self._read, request.image, limits)
                            tensor, _ = call.stage("pre-process", self._preprocess, image)
                        except CXRMonaiError as exc:
                            raise InvalidImageError(f"image {index}: {exc}") from exc
                        images.append((image.shape, image.warnings))
                        del image
                        futures.append(self.batcher.submit(tensor[0]))  # the model starts while more arrive
                if not images:
                    raise InvalidImageError("no image: stream one ClassifyRequest per image")
                with call.working(0):
                    probabilities = call.batched(futures)
            finally:
                for future in futures:
                    future.cancel()
            results = [
                call.stage("encode", self._classification, shape, warnings, p, site)
                for (shape, warnings), p in zip(images, probabilities, strict=True)
            ]
            call.predicted = ", ".join(_described(r) for r in results)
        return pb.ClassifyStudyResponse(results=results)

    def Explain(self, request: pb.ExplainRequest, context: grpc.ServicerContext) -> pb.ExplainResponse:
        with self._call("Explain", context, request.image) as call:
            target = self._target(request.target_class)
            site = self._site(request.site)
            per_pixel = (
                EXPLAIN_BYTES_PER_PIXEL + SECONDARY_CAPTURE_BYTES_PER_PIXEL * request.secondary_capture
            )
            image = call.stage("read", self._read, request.image, call.limits(per_pixel))
            if request.secondary_capture and image.dataset is None:
                raise _Abandon(grpc.StatusCode.FAILED_PRECONDITION, "secondary_capture needs a DICOM input")
            rows, cols = image.shape
            bound = reply_bytes_bound(
                rows, cols, overlay=not request.omit_overlay_png, secondary_capture=request.secondary_capture
            )
            if bound > self.max_reply_bytes:
                raise _Abandon(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"the reply for a {cols} x {rows} image could reach {bound / 2**20:.0f} MiB, over the "
                    f"server's {self.max_reply_bytes / 2**20:.0f} MiB message limit; ask without the "
                    "overlay (omit_overlay_png) or the Secondary Capture, or send a smaller image",
                )
            tensor, cropped = call.stage("pre-process", self._preprocess, image)
            calibrate = site.apply if site.calibrated else None
            out = call.model(lambda: self._cam(tensor.to(self._predictor.device), target, calibrate))
            raw_map = to_original_grid(out.maps[0], image.shape, cropped)
            result = Explanation.of(out.probabilities[0], int(out.target_indices[0]), raw_map, site)
            explained = call.stage("explain", explained_image, self._predictor, "<request>", image, result)
            response = call.stage("encode", self._explain_response, explained, request)
            call.predicted = _described(response.classification)
        return response

    # --- stages -----------------------------------------------------------------------------------

    def _read(self, data: bytes, limits: ImageLimits) -> CXRImage:
        if not data:
            raise InvalidImageError("image: empty; send the file's bytes")
        return read_cxr(data, limits=limits)

    def _preprocess(self, image: CXRImage) -> tuple[torch.Tensor, tuple[int, int, int, int]]:
        """((1, 3, S, S) float32, the dark frame cropped as (top, bottom, left, right)), outside the lock."""
        with torch.no_grad():
            x = self._predictor.preprocess(image)
        tensor = x.as_tensor() if isinstance(x, MetaTensor) else torch.as_tensor(x)
        return tensor.float().unsqueeze(0), crop_of(x)

    def _target(self, name: str) -> int | None:
        if not name:
            return None
        try:
            return class_index(name, self._predictor.class_names)
        except CXRMonaiError as exc:
            raise _Abandon(grpc.StatusCode.INVALID_ARGUMENT, f"target_class: {exc}") from exc

    def _site(self, name: str) -> SiteStatus:
        """The status of a request's ``site`` (empty: unknown); a malformed name is INVALID_ARGUMENT, a
        site refused by the unknown-site policy FAILED_PRECONDITION (one line, the server stays up)."""
        if name:
            try:
                check_site_name(name)
            except DatasetError:
                raise _Abandon(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    "site: not a site name (1-64 letters, digits, '.', '_' or '-', starting with a letter "
                    "or digit)",
                ) from None
        try:
            return self._predictor.sites.resolve(name)
        except SiteNotCalibratedError as exc:
            raise _Abandon(grpc.StatusCode.FAILED_PRECONDITION, str(exc)) from None

    def _classification(
        self, shape: tuple[int, int], warnings: Iterable[str], probabilities: Any, site: SiteStatus
    ) -> pb.ClassifyResponse:
        """The reply for the model's ``probabilities`` (K,) of an image of ``shape`` (rows, columns) read
        with ``warnings``, calibrated for ``site``."""
        names = self._predictor.class_names
        model = np.asarray(probabilities, dtype=np.float64)
        probs = site.apply(model)
        rows, cols = shape
        return pb.ClassifyResponse(
            probabilities=_class_probabilities(names, probs),
            predicted_class=names[int(np.argmax(probs))],
            warnings=list(warnings),
            intended_use=RESEARCH_USE_NOTICE,
            rows=rows,
            columns=cols,
            site=site.site or "",
            site_calibrated=site.calibrated,
            site_status=site.message(),
            model_probabilities=_class_probabilities(names, model),
        )

    def _explain_response(self, explained: Any, request: pb.ExplainRequest) -> pb.ExplainResponse:
        heat, result = explained.heatmap, explained.result
        response = pb.ExplainResponse(
            classification=self._classification(
                explained.image.shape, explained.image.warnings, result.model_probabilities, result.site
            ),
            explained_class=self._predictor.class_names[result.target_index],
            heatmap_u8=np.round(heat * 255.0).astype(np.uint8).tobytes(),
            area_above_half=explained.area_above_threshold,
        )
        if not request.omit_overlay_png:
            response.overlay_png = explained.overlay_png()
        if explained.peak_row_col is not None:
            response.peak_row, response.peak_column = explained.peak_row_col
        if request.secondary_capture:
            try:
                response.secondary_capture_dicom = explained.secondary_capture_bytes()
            except CXRMonaiError:
                raise
            # pydicom/highdicom quote the offending header value (patient data) in these messages:
            # only the exception type is passed on
            except _HEADER_VALUE_ERRORS as exc:
                raise InvalidImageError(
                    "the source DICOM header has a malformed value the Secondary Capture cannot carry "
                    f"({type(exc).__name__}); fix the header or ask without secondary_capture"
                ) from None
        return response

    # --- admission, deadlines, errors -------------------------------------------------------------

    @contextmanager
    def _call(
        self, method: str, context: grpc.ServicerContext, data: bytes = b"", *, stream: bool = False
    ) -> Iterator[_Call]:
        """Admit one call (or refuse it), run its stages, map every error to a documented status.

        ``data``: a unary call's image bytes, reserved from the memory budget at once; the call then takes
        a work slot, waiting in the queue when none is free. A ``stream`` holds a queue place instead and
        takes a slot per image (:meth:`_Call.working`)."""
        start = time.monotonic()
        if self.state is not State.SERVING:
            _abort(context, grpc.StatusCode.UNAVAILABLE, f"server is {self.state.value}; retry later")
        with self._idle:
            self._inflight += 1
        call = _Call(self, context, start)
        call.add_request(data)
        try:
            call.admit(method, stream, len(data))
            call.checkpoint("read")
            yield call
        except _Abandon as exc:
            logger.info("%s %s %s: %s", method, call.described(), exc.code.name, exc)
            _abort(context, exc.code, str(exc))
        except CXRMonaiError as exc:
            logger.info("%s %s rejected: %s", method, call.described(), exc)
            _abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except Exception as exc:
            # the message and traceback may quote input values (patient data): the type only
            logger.error("%s %s failed: internal error %s", method, call.described(), type(exc).__name__)
            _abort(
                context,
                grpc.StatusCode.INTERNAL,
                f"internal error ({type(exc).__name__}); see the server log",
            )
        else:
            elapsed_ms = (time.monotonic() - start) * 1000.0
            logger.info("%s %s: %s in %.0f ms", method, call.described(), call.predicted, elapsed_ms)
        finally:
            call.release()
            with self._idle:
                self._inflight -= 1
                self._idle.notify_all()


class _Call:
    """One admitted call: its deadline and the checks between stages."""

    def __init__(self, servicer: CXRTriageServicer, context: grpc.ServicerContext, start: float) -> None:
        self._servicer = servicer
        self._admission = servicer.admission
        self._context = context
        self.predicted = ""
        self._slot = False
        self._place = False
        self._memory = 0
        self._tags: list[str] = []
        self._bytes = 0
        remaining = context.time_remaining()
        limit = servicer.limits.request_timeout_s
        candidates = [start + r for r in (remaining, limit) if r is not None]
        self._deadline = min(candidates) if candidates else None
        self._server_limit = limit is not None and (remaining is None or limit < remaining)

    def add_request(self, data: bytes) -> None:
        """Note one image's bytes for the log line (a short hash and the size; never the content)."""
        if data:
            self._tags.append(request_tag(data))
            self._bytes += len(data)

    def described(self) -> str:
        """``<tag> (<bytes> bytes)``; a study lists its first tags and the image count."""
        tags = ",".join(self._tags[:3]) + (f",... ({len(self._tags)} images)" if len(self._tags) > 3 else "")
        return f"{tags or '-'} ({self._bytes} bytes)"

    # --- admission: slots, queue place, memory --------------------------------------------------------

    def admit(self, method: str, stream: bool, request_bytes: int) -> None:
        """A unary call: reserve its request's bytes, then take a slot (waiting in the queue). A stream:
        hold a queue place for its life."""
        try:
            if stream:
                self._admission.take_place(method)
                self._place = True
            else:
                self._reserve_now(request_bytes)
                self._admission.slot(self._queued, self._deadline)
                self._slot = True
        except Refused as exc:
            raise _Abandon(exc.code, str(exc)) from None

    def _reserve_now(self, n: int) -> None:
        self._admission.reserve_now(n, "the request")
        self._memory += n

    def _queued(self) -> None:
        """The checkpoint of a call waiting in the queue: a draining server starts nothing new."""
        if self._servicer.state is State.DRAINING:
            raise _Abandon(grpc.StatusCode.UNAVAILABLE, "server shutting down; the call had not started")
        self.checkpoint("a work slot")

    @contextmanager
    def working(self, request_bytes: int) -> Iterator[None]:
        """A stream's unit of work: its bytes reserved, a slot held (waiting in the queue if need be);
        both, and the memory its image reserved, given back at the end."""
        held = self._memory
        try:
            self._reserve_now(request_bytes)
            self._admission.slot(self._queued, self._deadline)
        except Refused as exc:
            self._release_memory_above(held)
            raise _Abandon(exc.code, str(exc)) from None
        self._slot = True
        try:
            yield
        finally:
            self._slot = False
            self._admission.release_slot()
            self._release_memory_above(held)

    def _release_memory_above(self, held: int) -> None:
        self._admission.release_memory(self._memory - held)
        self._memory = held

    def limits(self, bytes_per_pixel: int) -> MeteredLimits:
        """The server's image limits for one image of this call, reserving ``bytes_per_pixel`` times its
        pixels from the memory budget once the reader has its header (before any decoding)."""

        def reserve(rows: int, cols: int) -> None:
            n = rows * cols * bytes_per_pixel
            what = f"a {cols} x {rows} image"
            try:
                self._admission.reserve(n, what, lambda: self.checkpoint("read"), self._deadline)
            except Refused as exc:
                raise _Abandon(exc.code, str(exc)) from None
            self._memory += n

        image = self._servicer.limits.image
        values = {f.name: getattr(image, f.name) for f in fields(ImageLimits)}
        return MeteredLimits(**values, on_check=reserve)

    def release(self) -> None:
        """Give back whatever the call still holds (at its end)."""
        if self._slot:
            self._slot = False
            self._admission.release_slot()
        if self._place:
            self._place = False
            self._admission.release_place()
        self._release_memory_above(0)

    def messages(self, requests: Iterable[T]) -> Iterator[T]:
        """A stream's messages; waiting for each is bounded by the stream idle timeout, after which the
        call is cancelled (CANCELLED)."""
        watch = self._servicer._idle_watch
        iterator = iter(requests)
        while True:
            ticket = watch.watch(self._context.cancel) if watch is not None else None
            cancelled = False
            request: T | None = None
            try:
                request = next(iterator)
            except StopIteration:
                pass
            except grpc.RpcError:  # the call was cancelled under the wait (by the client or by us)
                cancelled = True
            if ticket is not None and watch is not None and watch.unwatch(ticket):
                raise _Abandon(
                    grpc.StatusCode.CANCELLED,
                    f"no message for {watch.timeout_s:g} s (the stream idle timeout); stream cancelled",
                )
            if cancelled:
                raise _Abandon(grpc.StatusCode.CANCELLED, "call cancelled while streaming")
            if request is None:
                return
            yield request

    def _left(self) -> float | None:
        return None if self._deadline is None else self._deadline - time.monotonic()

    def checkpoint(self, stage: str) -> None:
        """Raise :class:`_Abandon` when the call must not go on to ``stage``."""
        if self._servicer._abandon.is_set():
            raise _Abandon(grpc.StatusCode.UNAVAILABLE, f"server shutting down; abandoned before {stage}")
        if not self._context.is_active():
            raise _Abandon(grpc.StatusCode.CANCELLED, f"call cancelled; abandoned before {stage}")
        left = self._left()
        if left is not None and left <= 0:
            which = (
                f"the server's {self._servicer.limits.request_timeout_s:g} s time limit"
                if self._server_limit
                else "the deadline"
            )
            raise _Abandon(grpc.StatusCode.DEADLINE_EXCEEDED, f"{which} passed before {stage}")

    def stage(self, name: str, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` after a checkpoint."""
        self.checkpoint(name)
        return fn(*args)

    def model(self, fn: Callable[[], T]) -> T:
        """``fn()`` under the model lock; waiting for the lock is abandoned like a stage."""
        lock = self._servicer._model_lock
        while True:
            self.checkpoint("model")
            left = self._left()
            if lock.acquire(timeout=_POLL_S if left is None else max(0.0, min(_POLL_S, left))):
                break
        try:
            return fn()
        finally:
            lock.release()

    def batched(self, futures: list[Future[np.ndarray]]) -> list[np.ndarray]:
        """The results of images handed to the batcher; the call's thread serves the batcher meanwhile.
        Waiting is abandoned like a stage, cancelling the futures: images still waiting never reach
        the model."""
        batcher = self._servicer.batcher
        try:
            while not all(f.done() for f in futures):
                self.checkpoint("model")
                left = self._left()
                batcher.serve(
                    _POLL_S if left is None else max(0.0, min(_POLL_S, left)),
                    lambda: self.checkpoint("model"),
                )
            return [future.result() for future in futures]
        except CancelledError:  # the batcher was closed under the call
            raise _Abandon(
                grpc.StatusCode.UNAVAILABLE, "server shutting down; abandoned waiting for the model"
            ) from None
        finally:
            for future in futures:
                future.cancel()  # no-op for a finished one


def _class_probabilities(names: Iterable[str], probabilities: np.ndarray) -> list[pb.ClassProbability]:
    return [
        pb.ClassProbability(class_name=n, probability=float(p))
        for n, p in zip(names, probabilities, strict=True)
    ]


def _described(response: pb.ClassifyResponse) -> str:
    """A reply for the log line: the predicted class and the site's calibration (a site name is the
    caller's configuration, not patient data)."""
    site = response.site or "unknown site"
    return (
        f"{response.predicted_class} ({site}, {'calibrated' if response.site_calibrated else 'uncalibrated'})"
    )


def _abort(context: grpc.ServicerContext, code: grpc.StatusCode, message: str) -> NoReturn:
    """``context.abort`` raises; this wrapper tells the type checker so."""
    context.abort(code, message)
    raise AssertionError("unreachable: context.abort raises")
