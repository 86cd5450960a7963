"""Issue 8, "a service that cannot be tied up": each test reproduces one failure listed in its "Why".

A *gate* (a forward pre-hook on the model) holds model calls until the test opens it, so "a long call"
is deterministic and costs no CPU.
"""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import nibabel as nib
import numpy as np
import pydicom
import pytest
from bundle_factory import make_trained_bundle
from cxr_monai.server import servicer as servicer_module
from cxr_monai.server.app import SERVICE_NAME, ServerConfig, Service, build_server
from cxr_monai.server.reflection import V1_SERVICE_NAME
from cxr_monai.server.servicer import CXRTriageServicer, ServiceLimits
from dicom_factory import gradient, make_dataset
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from PIL import Image

from cxr_monai.api.v1 import cxr_triage_pb2 as pb
from cxr_monai.api.v1 import cxr_triage_pb2_grpc as pb_grpc
from cxr_monai.predictor import Predictor
from tests.test_io_errors import deflate_bomb, one_bit_png

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SECRET = "SECRETNAME"


@pytest.fixture(scope="module")
def predictor(tmp_path_factory: pytest.TempPathFactory) -> Predictor:
    return Predictor.from_bundle(make_trained_bundle(tmp_path_factory.mktemp("bundle")), device="cpu")


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


SMALL = png(np.random.default_rng(0).integers(0, 255, (64, 80), dtype=np.uint8))


class Gate:
    """Counts model forward passes; while closed, holds them (up to 30 s)."""

    def __init__(self, predictor: Predictor) -> None:
        self.calls = 0
        self.entered = threading.Event()
        self.open = threading.Event()
        self.open.set()
        self._handle = predictor.model.register_forward_pre_hook(self._hook)

    def _hook(self, module: Any, args: Any) -> None:
        self.calls += 1
        self.entered.set()
        self.open.wait(30)

    def close(self) -> None:
        self.entered.clear()
        self.open.clear()

    def remove(self) -> None:
        self.open.set()
        self._handle.remove()


@pytest.fixture
def gate(predictor: Predictor) -> Iterator[Gate]:
    g = Gate(predictor)
    yield g
    g.remove()


@pytest.fixture
def make_service(predictor: Predictor) -> Iterator[Any]:
    started: list[Service] = []

    def make(limits: ServiceLimits | None = None, warm: bool = True, **config: Any) -> Service:
        service = build_server(
            CXRTriageServicer(predictor, limits or ServiceLimits(max_inflight=4)),
            ServerConfig(address="127.0.0.1:0", **config),
        )
        service.start()
        if warm:
            service.warm_up()
        started.append(service)
        return service

    yield make
    for service in started:
        service.servicer.abandon()
        service.server.stop(None)


def channel(service: Service) -> grpc.Channel:
    return grpc.insecure_channel(f"127.0.0.1:{service.port}")


def health_status(ch: grpc.Channel, service: str = SERVICE_NAME) -> int:
    request = health_pb2.HealthCheckRequest(service=service)
    return int(health_pb2_grpc.HealthStub(ch).Check(request, timeout=5).status)


def code_of(fn: Any, *args: Any, **kwargs: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        fn(*args, **kwargs)
    return info.value.code(), info.value.details() or ""


def in_thread(fn: Any, *args: Any, **kwargs: Any) -> tuple[threading.Thread, dict[str, Any]]:
    """Run ``fn`` in a thread; the dict gets "result" or "error"."""
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["result"] = fn(*args, **kwargs)
        except grpc.RpcError as exc:
            out["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out


# --- Why 1 and 5: budgets before decoding; the server stays responsive ---------------------------------


def test_a_9999_squared_png_and_a_deflate_bomb_are_refused_at_once(make_service: Any) -> None:
    service = make_service()
    with channel(service) as ch:
        stub = pb_grpc.CXRTriageStub(ch)
        start = time.perf_counter()
        code, details = code_of(stub.Classify, pb.ClassifyRequest(image=one_bit_png(9999, 9999)), timeout=30)
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "99,980,001 pixels" in details
        code, details = code_of(stub.Classify, pb.ClassifyRequest(image=deflate_bomb(200)), timeout=30)
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "inflates to more than" in details
        assert time.perf_counter() - start < 5.0  # decoding either took minutes and gigabytes
        assert health_status(ch) == SERVING


def test_the_pixel_budget_is_the_servers(make_service: Any) -> None:
    service = make_service(ServiceLimits(image=servicer_module.ImageLimits(max_pixels=4000)))
    with channel(service) as ch:
        code, details = code_of(
            pb_grpc.CXRTriageStub(ch).Classify, pb.ClassifyRequest(image=SMALL), timeout=10
        )
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "limit is 4,000 pixels" in details


# --- Why 2: cancelled and expired calls do not run ----------------------------------------------------


def test_expired_and_cancelled_calls_never_reach_the_model(make_service: Any, gate: Gate) -> None:
    service = make_service(ServiceLimits(max_inflight=8))
    with channel(service) as ch:
        stub = pb_grpc.CXRTriageStub(ch)
        gate.close()
        first, out = in_thread(stub.Classify, pb.ClassifyRequest(image=SMALL), timeout=30)
        assert gate.entered.wait(10)
        calls = gate.calls
        futures = [stub.Classify.future(pb.ClassifyRequest(image=SMALL), timeout=0.3) for _ in range(4)]
        cancelled = [stub.Classify.future(pb.ClassifyRequest(image=SMALL), timeout=30) for _ in range(2)]
        time.sleep(0.2)
        for future in cancelled:
            future.cancel()
        for future in futures:
            assert future.exception(timeout=10).code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert service.servicer.wait_idle(5) == 1  # only the first call is left
        gate.open.set()
        first.join(10)
        assert "result" in out
        assert gate.calls == calls  # none of the six reached the model
        start = time.perf_counter()
        stub.Classify(pb.ClassifyRequest(image=SMALL), timeout=10)
        assert time.perf_counter() - start < 2.0 and gate.calls == calls + 1


def test_the_server_time_limit_abandons_a_call(make_service: Any, gate: Gate) -> None:
    service = make_service(ServiceLimits(request_timeout_s=0.5))
    with channel(service) as ch:
        stub = pb_grpc.CXRTriageStub(ch)
        gate.close()
        first, out = in_thread(stub.Explain, pb.ExplainRequest(image=SMALL), timeout=30)
        assert gate.entered.wait(10)
        code, details = code_of(stub.Classify, pb.ClassifyRequest(image=SMALL), timeout=30)
        assert code == grpc.StatusCode.DEADLINE_EXCEEDED and "0.5 s time limit" in details
        gate.open.set()
        first.join(10)
        assert out["error"].code() == grpc.StatusCode.DEADLINE_EXCEEDED  # stopped after the model


# --- Why 3 and 10: health states, load shedding, health while saturated --------------------------------


def test_health_is_not_serving_until_warm_and_from_the_start_of_draining(make_service: Any) -> None:
    service = make_service(warm=False)
    with channel(service) as ch:
        stub = pb_grpc.CXRTriageStub(ch)
        assert health_status(ch) == NOT_SERVING and health_status(ch, "") == NOT_SERVING
        code, details = code_of(stub.Classify, pb.ClassifyRequest(image=SMALL), timeout=10)
        assert code == grpc.StatusCode.UNAVAILABLE and "warming up" in details
        service.warm_up()
        assert health_status(ch) == SERVING
        assert stub.Classify(pb.ClassifyRequest(image=SMALL), timeout=10).predicted_class
        stopper, _ = in_thread(service.stop, 0.2, 1.0)
        time.sleep(0.3)  # inside the 1 s notice: the port is open, the answer is NOT_SERVING
        assert health_status(ch) == NOT_SERVING
        code, details = code_of(stub.Classify, pb.ClassifyRequest(image=SMALL), timeout=10)
        assert code == grpc.StatusCode.UNAVAILABLE and "shutting down" in details
        stopper.join(10)


def test_a_saturated_server_sheds_work_and_still_answers_health_and_reflection(
    make_service: Any, gate: Gate
) -> None:
    service = make_service(ServiceLimits(max_inflight=2, max_queue=0))  # no wait queue: refused at once
    with channel(service) as ch:
        stub = pb_grpc.CXRTriageStub(ch)
        gate.close()
        held = [in_thread(stub.Classify, pb.ClassifyRequest(image=SMALL), timeout=30) for _ in range(2)]
        assert gate.entered.wait(10)
        deadline = time.monotonic() + 10
        while service.servicer.wait_idle(0) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        start = time.perf_counter()
        code, details = code_of(stub.Classify, pb.ClassifyRequest(image=SMALL), timeout=10)
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "2 calls in flight" in details
        for _ in range(10):
            assert health_status(ch) == SERVING
        assert SERVICE_NAME in ProtoReflectionDescriptorDatabase(ch).get_services()
        assert time.perf_counter() - start < 3.0
        gate.open.set()
        for thread, out in held:
            thread.join(10)
            assert "result" in out


# --- Why 4: shutdown bounded by the grace period --------------------------------------------------------


def test_shutdown_is_bounded_by_grace_and_a_long_call_is_abandoned_at_its_next_stage(
    make_service: Any, gate: Gate, monkeypatch: pytest.MonkeyPatch
) -> None:
    explained: list[int] = []
    real = servicer_module.explained_image
    monkeypatch.setattr(servicer_module, "explained_image", lambda *a: explained.append(1) or real(*a))
    service = make_service()
    with channel(service) as ch:
        gate.close()
        call, out = in_thread(pb_grpc.CXRTriageStub(ch).Explain, pb.ExplainRequest(image=SMALL), timeout=60)
        assert gate.entered.wait(10)
        start = time.perf_counter()
        running = service.stop(grace_s=0.5)
        elapsed = time.perf_counter() - start
        assert running == 1  # still inside the model: Python cannot interrupt it
        assert elapsed < 0.5 + 1.0 + 1.0  # grace + abandon margin + slack, not the call's length
        gate.open.set()
        call.join(10)
        assert out["error"].code() in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE)
        assert service.servicer.wait_idle(5) == 0
        assert explained == []  # abandoned after the model, before the explain stage


# --- Why 6: malformed header values never reach a status message or a log -------------------------------


@pytest.mark.parametrize(
    ("keyword", "value"),
    [
        ("PatientBirthDate", f"1970-01-01 {SECRET}"),
        ("PatientSex", SECRET),
        ("StudyDate", SECRET),
        ("StudyTime", SECRET),
        ("SpecificCharacterSet", SECRET),
    ],
)
def test_malformed_header_values_are_repaired_in_the_secondary_capture_and_never_quoted(
    make_service: Any, caplog: pytest.LogCaptureFixture, keyword: str, value: str
) -> None:
    """Values highdicom refuses (a sex, date, time or character set that is none) are emptied or
    normalised in our outputs (cxr_monai.explain.source_header): the call succeeds, and the value is in
    neither the Secondary Capture nor the log."""
    ds = make_dataset(gradient(12), bits_stored=12)
    setattr(ds, keyword, value)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    service = make_service()
    with caplog.at_level("DEBUG"), channel(service) as ch:
        stub = pb_grpc.CXRTriageStub(ch)
        request = pb.ExplainRequest(image=buffer.getvalue(), secondary_capture=True)
        reply = stub.Explain(request, timeout=30)
        assert stub.Classify(pb.ClassifyRequest(image=buffer.getvalue()), timeout=30).predicted_class
    sc = pydicom.dcmread(io.BytesIO(reply.secondary_capture_dicom))
    assert SECRET not in str(sc.get(keyword, ""))
    assert SECRET.encode() not in reply.secondary_capture_dicom
    assert SECRET not in caplog.text
    assert "ERROR" not in {r.levelname for r in caplog.records}


# --- Why 7: non-finite and degenerate images -------------------------------------------------------------


def test_nan_images_are_refused_and_degenerate_ones_warned(make_service: Any) -> None:
    nan = nib.Nifti1Image(np.full((64, 64, 1), np.nan, np.float32), np.eye(4)).to_bytes()
    service = make_service()
    with channel(service) as ch:
        stub = pb_grpc.CXRTriageStub(ch)
        code, details = code_of(stub.Classify, pb.ClassifyRequest(image=nan), timeout=10)
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "NaN or infinite" in details
        for pixels, words in (
            (np.zeros((1, 1), np.uint8), "1 x 1 pixels"),
            (np.full((1, 2000), 7, np.uint8), "aspect ratio is 2000.0:1"),
            (np.zeros((256, 256), np.uint8), "constant"),
        ):
            response = stub.Classify(pb.ClassifyRequest(image=png(pixels)), timeout=10)
            assert any(words in w for w in response.warnings), response.warnings
            assert np.isfinite([p.probability for p in response.probabilities]).all()


# --- Why 8: replies over the message limit are refused before the work ------------------------------------


def test_an_explain_reply_over_the_limit_is_refused_before_the_model(make_service: Any, gate: Gate) -> None:
    big = png(np.random.default_rng(2).integers(0, 255, (700, 700), dtype=np.uint8))
    service = make_service(max_message_mb=1)
    with channel(service) as ch:
        stub = pb_grpc.CXRTriageStub(ch)
        calls = gate.calls
        code, details = code_of(stub.Explain, pb.ExplainRequest(image=big), timeout=30)
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "omit_overlay_png" in details
        assert gate.calls == calls
        response = stub.Explain(pb.ExplainRequest(image=big, omit_overlay_png=True), timeout=30)
        assert len(response.heatmap_u8) == 700 * 700 and not response.overlay_png
        assert gate.calls == calls + 1


# --- Why 9: reflection v1 ----------------------------------------------------------------------------------


def test_reflection_v1_resolves_the_classify_method(make_service: Any) -> None:
    service = make_service()
    with channel(service) as ch:
        call = ch.stream_stream(
            f"/{V1_SERVICE_NAME}/ServerReflectionInfo",
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
        )
        requests = [
            reflection_pb2.ServerReflectionRequest(list_services=""),
            reflection_pb2.ServerReflectionRequest(file_containing_symbol="cxr_monai.v1.CXRTriage.Classify"),
        ]
        listed, described = list(call(iter(requests), timeout=10))
    assert {s.name for s in listed.list_services_response.service} >= {SERVICE_NAME, V1_SERVICE_NAME}
    pool = descriptor_pool.DescriptorPool()
    protos = [
        descriptor_pb2.FileDescriptorProto.FromString(b)
        for b in described.file_descriptor_response.file_descriptor_proto
    ]
    for proto in sorted(protos, key=lambda p: p.name != "google/protobuf/descriptor.proto"):
        pool.Add(proto)
    method = pool.FindMethodByName("cxr_monai.v1.CXRTriage.Classify")
    assert method.input_type.full_name == "cxr_monai.v1.ClassifyRequest"
    assert method.output_type.full_name == "cxr_monai.v1.ClassifyResponse"


# --- Why 10: token handling, unauthenticated bodies, metadata limit -------------------------------------


def test_bearer_is_case_insensitive_and_unauthenticated_bodies_are_not_read(make_service: Any) -> None:
    service = make_service(token="s3cret", max_message_mb=1)
    with channel(service) as ch:
        stub = pb_grpc.CXRTriageStub(ch)
        for scheme in ("bearer", "BEARER", "Bearer"):
            metadata = (("authorization", f"{scheme} s3cret"),)
            assert stub.Classify(pb.ClassifyRequest(image=SMALL), metadata=metadata, timeout=10).rows == 64
        # 2 MiB is over the 1 MiB message limit: reading the body would answer RESOURCE_EXHAUSTED
        code, _ = code_of(stub.Classify, pb.ClassifyRequest(image=b"\0" * 2**21), timeout=10)
        assert code == grpc.StatusCode.UNAUTHENTICATED
        huge = (("authorization", "Bearer s3cret"), ("x-padding", "x" * 40_000))
        code, _ = code_of(stub.Classify, pb.ClassifyRequest(image=SMALL), metadata=huge, timeout=10)
        assert code in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.INTERNAL)


def test_token_file(tmp_path: Path) -> None:
    from cxr_monai.server.auth import read_token_file

    from cxr_monai.errors import CXRMonaiError

    (tmp_path / "token").write_text("  s3cret\n")
    assert read_token_file(tmp_path / "token") == "s3cret"
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(CXRMonaiError, match="one token"):
        read_token_file(tmp_path / "empty")
    with pytest.raises(CXRMonaiError, match="cannot read"):
        read_token_file(tmp_path / "missing")


def test_no_secret_in_an_ordinary_dicom_log(make_service: Any, caplog: pytest.LogCaptureFixture) -> None:
    ds = make_dataset(gradient(12), bits_stored=12, PatientName=f"{SECRET}^X")
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    service = make_service()
    with caplog.at_level("DEBUG"), channel(service) as ch:
        response = pb_grpc.CXRTriageStub(ch).Explain(
            pb.ExplainRequest(image=buffer.getvalue(), secondary_capture=True), timeout=30
        )
    assert pydicom.dcmread(io.BytesIO(response.secondary_capture_dicom)).PatientName == f"{SECRET}^X"
    assert SECRET not in caplog.text
