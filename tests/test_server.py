"""The gRPC service end to end on loopback: results, errors, limits, auth, TLS, health, reflection."""

from __future__ import annotations

import datetime
import io
import json
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pydicom
import pytest
from bundle_factory import make_trained_bundle
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from cxr_monai.server.app import SERVICE_NAME, ServerConfig, build_server
from cxr_monai.server.servicer import CXRTriageServicer, ServiceLimits
from dicom_factory import make_dataset, save
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from PIL import Image

from cxr_monai.api.v1 import cxr_triage_pb2 as pb
from cxr_monai.api.v1 import cxr_triage_pb2_grpc as pb_grpc
from cxr_monai.constants import CLASS_NAMES, RESEARCH_USE_NOTICE
from cxr_monai.predictor import Predictor

ROWS, COLS = 48, 64


@pytest.fixture(scope="module")
def predictor(tmp_path_factory: pytest.TempPathFactory) -> Predictor:
    return Predictor.from_bundle(make_trained_bundle(tmp_path_factory.mktemp("bundle")), device="cpu")


@pytest.fixture(scope="module")
def png_bytes() -> bytes:
    rng = np.random.default_rng(0)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (ROWS, COLS), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def dicom_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rng = np.random.default_rng(1)
    ds = make_dataset(rng.integers(0, 4095, (ROWS, COLS), dtype=np.uint16), bits_stored=12)
    return save(ds, tmp_path_factory.mktemp("dicom") / "study.dcm")


def _start(
    predictor: Predictor, limits: ServiceLimits | None = None, **config: Any
) -> tuple[grpc.Server, int]:
    service = build_server(
        CXRTriageServicer(predictor, limits), ServerConfig(address="127.0.0.1:0", **config)
    )
    service.start()
    service.warm_up()
    return service.server, service.port


@pytest.fixture(scope="module")
def stub(predictor: Predictor) -> Iterator[pb_grpc.CXRTriageStub]:
    server, port = _start(predictor, ServiceLimits(max_inflight=8))
    limit = 64 * 1024 * 1024
    options = [("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit)]
    with grpc.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:
        yield pb_grpc.CXRTriageStub(channel)
    server.stop(None)


def test_model_info(stub: pb_grpc.CXRTriageStub) -> None:
    info = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
    assert tuple(info.class_names) == CLASS_NAMES
    assert info.backbone == "tiny_cnn" and info.spatial_size == 32
    assert info.intended_use == RESEARCH_USE_NOTICE


def test_classify_matches_the_predictor(
    stub: pb_grpc.CXRTriageStub, predictor: Predictor, png_bytes: bytes
) -> None:
    response = stub.Classify(pb.ClassifyRequest(image=png_bytes), timeout=10)
    names = [p.class_name for p in response.probabilities]
    probs = np.array([p.probability for p in response.probabilities])
    assert tuple(names) == CLASS_NAMES
    expected = predictor.predict([png_bytes])[0]
    np.testing.assert_allclose(probs, expected.probabilities, rtol=1e-5, atol=1e-6)
    assert response.predicted_class == expected.predicted_class
    assert (response.rows, response.columns) == (ROWS, COLS)
    assert response.intended_use == RESEARCH_USE_NOTICE


def test_explain_dicom_returns_map_overlay_and_secondary_capture(
    stub: pb_grpc.CXRTriageStub, dicom_file: Path
) -> None:
    response = stub.Explain(
        pb.ExplainRequest(image=dicom_file.read_bytes(), secondary_capture=True), timeout=30
    )
    heat = np.frombuffer(response.heatmap_u8, dtype=np.uint8).reshape(ROWS, COLS)
    assert heat.max() in (0, 255)  # normalised by its own maximum
    if heat.max() == 255:
        assert (response.peak_row, response.peak_column) == np.unravel_index(int(np.argmax(heat)), heat.shape)
    assert response.area_above_half == pytest.approx(float(np.mean(heat > 127.5)), abs=0.02)
    assert Image.open(io.BytesIO(response.overlay_png)).size == (COLS, ROWS)
    source = pydicom.dcmread(dicom_file)
    sc = pydicom.dcmread(io.BytesIO(response.secondary_capture_dicom))
    assert sc.StudyInstanceUID == source.StudyInstanceUID
    assert sc.SOPInstanceUID != source.SOPInstanceUID and sc.SeriesInstanceUID != source.SeriesInstanceUID
    assert (sc.Rows, sc.Columns) == (ROWS, COLS)
    assert "NOT FOR CLINICAL USE" in sc.SeriesDescription


def test_explain_named_class(stub: pb_grpc.CXRTriageStub, png_bytes: bytes) -> None:
    response = stub.Explain(pb.ExplainRequest(image=png_bytes, target_class="pneumonia"), timeout=30)
    assert response.explained_class == "Pneumonia"
    assert not response.secondary_capture_dicom


@pytest.mark.parametrize(
    ("request_", "code", "words"),
    [
        (pb.ExplainRequest(image=b"not an image at all"), grpc.StatusCode.INVALID_ARGUMENT, "not"),
        (pb.ExplainRequest(image=b""), grpc.StatusCode.INVALID_ARGUMENT, "empty"),
        (pb.ExplainRequest(image=b"x", target_class="flu"), grpc.StatusCode.INVALID_ARGUMENT, "COVID-19"),
    ],
)
def test_bad_requests_get_a_precise_status_and_the_server_stays_up(
    stub: pb_grpc.CXRTriageStub,
    png_bytes: bytes,
    request_: pb.ExplainRequest,
    code: grpc.StatusCode,
    words: str,
) -> None:
    with pytest.raises(grpc.RpcError) as info:
        stub.Explain(request_, timeout=10)
    assert info.value.code() == code
    assert words in info.value.details()
    assert stub.Classify(pb.ClassifyRequest(image=png_bytes), timeout=10).predicted_class in CLASS_NAMES


def test_secondary_capture_of_a_png_is_a_failed_precondition(
    stub: pb_grpc.CXRTriageStub, png_bytes: bytes
) -> None:
    with pytest.raises(grpc.RpcError) as info:
        stub.Explain(pb.ExplainRequest(image=png_bytes, secondary_capture=True), timeout=10)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_concurrent_calls_give_the_single_call_answers(
    stub: pb_grpc.CXRTriageStub, png_bytes: bytes, dicom_file: Path
) -> None:
    """Classify and Explain interleaved from 6 threads on two images: every answer equals the one a
    lone call gives (a Grad-CAM hook leaking into a concurrent forward pass would change it)."""
    images = (png_bytes, dicom_file.read_bytes())

    def probabilities(response: pb.ClassifyResponse) -> tuple[float, ...]:
        return tuple(round(p.probability, 5) for p in response.probabilities)

    def call(i: int) -> tuple[int, tuple[float, ...], bytes]:
        image = images[i % 2]
        if i % 3:
            explained = stub.Explain(pb.ExplainRequest(image=image), timeout=60)
            return i % 2, probabilities(explained.classification), explained.heatmap_u8
        return i % 2, probabilities(stub.Classify(pb.ClassifyRequest(image=image), timeout=60)), b""

    alone = {k: probabilities(stub.Classify(pb.ClassifyRequest(image=images[k]), timeout=60)) for k in (0, 1)}
    maps = {k: stub.Explain(pb.ExplainRequest(image=images[k]), timeout=60).heatmap_u8 for k in (0, 1)}
    with ThreadPoolExecutor(max_workers=6) as pool:
        for k, probs, heat in pool.map(call, range(18)):
            assert probs == alone[k]
            if heat:
                assert heat == maps[k]


def test_a_dicom_the_secondary_capture_cannot_use_is_an_invalid_argument(
    stub: pb_grpc.CXRTriageStub, dicom_file: Path, tmp_path: Path, png_bytes: bytes
) -> None:
    ds = pydicom.dcmread(dicom_file)
    del ds.StudyInstanceUID
    broken = save(ds, tmp_path / "no_study_uid.dcm").read_bytes()
    with pytest.raises(grpc.RpcError) as info:
        stub.Explain(pb.ExplainRequest(image=broken, secondary_capture=True), timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert stub.Classify(pb.ClassifyRequest(image=png_bytes), timeout=10).predicted_class in CLASS_NAMES


def test_message_limit_rejects_large_requests_only(predictor: Predictor, png_bytes: bytes) -> None:
    server, port = _start(predictor, max_message_mb=1)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.CXRTriageStub(channel)
            with pytest.raises(grpc.RpcError) as info:
                stub.Classify(pb.ClassifyRequest(image=b"\0" * (2 * 1024 * 1024)), timeout=10)
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert stub.Classify(pb.ClassifyRequest(image=png_bytes), timeout=10).predicted_class
    finally:
        server.stop(None)


def test_token_guards_the_service_but_not_health_or_reflection(
    predictor: Predictor, png_bytes: bytes
) -> None:
    server, port = _start(predictor, token="s3cret")
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.CXRTriageStub(channel)
            for metadata in ((), (("authorization", "Bearer wrong"),)):
                with pytest.raises(grpc.RpcError) as info:
                    stub.Classify(pb.ClassifyRequest(image=png_bytes), metadata=metadata, timeout=10)
                assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
            ok = stub.Classify(
                pb.ClassifyRequest(image=png_bytes),
                metadata=(("authorization", "Bearer s3cret"),),
                timeout=10,
            )
            assert ok.predicted_class in CLASS_NAMES
            health = health_pb2_grpc.HealthStub(channel)
            status = health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=10).status
            assert status == health_pb2.HealthCheckResponse.SERVING
            assert SERVICE_NAME in ProtoReflectionDescriptorDatabase(channel).get_services()
    finally:
        server.stop(None)


def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "server.crt", tmp_path / "server.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert_path, key_path


def test_tls(predictor: Predictor, png_bytes: bytes, tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path)
    server, port = _start(predictor, tls_cert=cert, tls_key=key)
    try:
        credentials = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
        with grpc.secure_channel(f"localhost:{port}", credentials) as channel:
            response = pb_grpc.CXRTriageStub(channel).Classify(
                pb.ClassifyRequest(image=png_bytes), timeout=10
            )
            assert response.predicted_class in CLASS_NAMES
        with grpc.insecure_channel(f"localhost:{port}") as plain, pytest.raises(grpc.RpcError):
            pb_grpc.CXRTriageStub(plain).Classify(pb.ClassifyRequest(image=png_bytes), timeout=5)
    finally:
        server.stop(None)


def test_tls_needs_both_files_and_readable_ones(predictor: Predictor, tmp_path: Path) -> None:
    from cxr_monai.errors import CXRMonaiError

    with pytest.raises(CXRMonaiError, match="both"):
        ServerConfig(tls_cert=tmp_path / "a.crt")
    config = ServerConfig(address="127.0.0.1:0", tls_cert=tmp_path / "a.crt", tls_key=tmp_path / "a.key")
    with pytest.raises(CXRMonaiError, match="cannot read the TLS key, certificate or client CA"):
        build_server(CXRTriageServicer(predictor), config)


def test_server_logs_no_patient_data(
    stub: pb_grpc.CXRTriageStub, dicom_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    source = pydicom.dcmread(dicom_file)
    with caplog.at_level("DEBUG"):
        stub.Explain(pb.ExplainRequest(image=dicom_file.read_bytes()), timeout=30)
        with pytest.raises(grpc.RpcError):
            stub.Classify(pb.ClassifyRequest(image=dicom_file.read_bytes()[:400]), timeout=10)
    text = caplog.text
    assert "Explain" in text  # the servicer did log the call
    for secret in (str(source.PatientName), str(source.PatientID), source.StudyInstanceUID):
        assert secret not in text


def test_grpc_threads_do_not_leak(predictor: Predictor) -> None:
    before = threading.active_count()
    for _ in range(3):
        server, _port = _start(predictor)
        server.stop(None).wait()
    assert threading.active_count() <= before + 2


def test_explain_over_grpc_matches_the_cli_record_and_map(
    stub: pb_grpc.CXRTriageStub, predictor: Predictor, dicom_file: Path, tmp_path: Path
) -> None:
    """The server and ``cxr-monai explain`` share one path: same probabilities, peak, area and map."""
    from cxr_monai.explain.files import explain_files
    from cxr_monai.explain.gradcam import Explainer
    from cxr_monai.explain.record import explained_image
    from cxr_monai.io import read_cxr

    reply = stub.Explain(pb.ExplainRequest(image=dicom_file.read_bytes(), secondary_capture=True), timeout=60)
    explain_files([dicom_file], predictor, tmp_path, ("json", "dcm"), None, 1)
    record = json.loads((tmp_path / "study.json").read_text())
    served = {p.class_name: p.probability for p in reply.classification.probabilities}
    assert served == pytest.approx(record["probabilities"], abs=1e-6)
    assert reply.classification.predicted_class == record["predicted_class"]
    assert [reply.peak_row, reply.peak_column] == record["heatmap"]["peak_row_col"]
    assert reply.area_above_half == pytest.approx(record["heatmap"]["fraction_above_0.5"], abs=1e-6)
    assert record["secondary_capture"]["written"] is True

    image = read_cxr(dicom_file)
    result = Explainer(predictor.model, predictor.preprocess, 1).explain([image])[0]
    explained = explained_image(predictor, dicom_file.name, image, result)
    served_map = np.frombuffer(reply.heatmap_u8, dtype=np.uint8).reshape(image.shape)
    assert np.abs(served_map.astype(int) - np.round(explained.heatmap * 255).astype(int)).max() <= 1


def test_building_the_secondary_capture_leaves_the_record_untouched(
    predictor: Predictor, dicom_file: Path
) -> None:
    from cxr_monai.explain.gradcam import Explainer
    from cxr_monai.explain.record import explained_image
    from cxr_monai.io import read_cxr

    image = read_cxr(dicom_file)
    result = Explainer(predictor.model, predictor.preprocess, 1).explain([image])[0]
    explained = explained_image(predictor, dicom_file.name, image, result)
    before = json.dumps(explained.record, sort_keys=True)
    sc, notes = explained.secondary_capture()
    assert str(sc.SOPClassUID) == "1.2.840.10008.5.1.4.1.1.7" and notes
    assert json.dumps(explained.record, sort_keys=True) == before
