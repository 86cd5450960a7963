"""The command-line client on loopback, and mutual TLS (issue 8, "Why" 10; deliverable 5)."""

from __future__ import annotations

import datetime
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from bundle_factory import make_trained_bundle
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from cxr_monai.server.app import ServerConfig, Service, build_server
from cxr_monai.server.servicer import CXRTriageServicer
from PIL import Image
from typer.testing import CliRunner

from cxr_monai.api.v1 import cxr_triage_pb2 as pb
from cxr_monai.api.v1 import cxr_triage_pb2_grpc as pb_grpc
from cxr_monai.client import app
from cxr_monai.constants import CLASS_NAMES
from cxr_monai.predictor import Predictor


@pytest.fixture(scope="module")
def predictor(tmp_path_factory: pytest.TempPathFactory) -> Predictor:
    return Predictor.from_bundle(make_trained_bundle(tmp_path_factory.mktemp("bundle")), device="cpu")


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("img") / "film.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 80), dtype=np.uint8)).save(path)
    return path


def _start(predictor: Predictor, **config: object) -> Service:
    service = build_server(CXRTriageServicer(predictor), ServerConfig(address="127.0.0.1:0", **config))  # type: ignore[arg-type]
    service.start()
    service.warm_up()
    return service


@pytest.fixture(scope="module")
def tokened(predictor: Predictor) -> Iterator[Service]:
    service = _start(predictor, token="s3cret")
    yield service
    service.server.stop(None)


def test_client_classify_explain_info(tokened: Service, image: Path, tmp_path: Path) -> None:
    (tmp_path / "token").write_text("s3cret\n")
    base = ["--target", f"127.0.0.1:{tokened.port}", "--token-file", str(tmp_path / "token")]
    runner = CliRunner()
    result = runner.invoke(app, [*base, "classify", str(image), str(image)])
    assert result.exit_code == 0, result.output
    assert result.output.count("film.png:") == 2 and "80 x 64" in result.output
    assert any(name in result.output for name in CLASS_NAMES)
    out = tmp_path / "out"
    result = runner.invoke(app, [*base, "explain", "-o", str(out), str(image)])
    assert result.exit_code == 0, result.output
    assert "Grad-CAM for" in result.output
    assert Image.open(out / "film.overlay.png").size == (80, 64)
    result = runner.invoke(app, [*base, "info"])
    assert result.exit_code == 0 and "tiny_cnn" in result.output and "NOT FOR CLINICAL USE" in result.output


def test_client_exits_non_zero_with_the_status_name(tokened: Service, image: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    target = ["--target", f"127.0.0.1:{tokened.port}"]
    result = runner.invoke(app, [*target, "classify", str(image)])
    assert result.exit_code == 1 and "UNAUTHENTICATED" in result.output
    (tmp_path / "token").write_text("s3cret")
    (tmp_path / "bad.png").write_bytes(b"not an image")
    result = runner.invoke(
        app, [*target, "--token-file", str(tmp_path / "token"), "classify", str(tmp_path / "bad.png")]
    )
    assert result.exit_code == 1 and "INVALID_ARGUMENT" in result.output


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _cert(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Certificate | None,
    issuer_key: ec.EllipticCurvePrivateKey,
) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer.subject if issuer else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True)
    )
    if subject == "localhost":
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False
        )
    return builder.sign(issuer_key, hashes.SHA256())


def _write(path: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey | None = None) -> Path:
    path.with_suffix(".crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    if key is not None:
        path.with_suffix(".key").write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
    return path.with_suffix(".crt")


def test_mutual_tls_accepts_the_cas_clients_only(predictor: Predictor, image: Path, tmp_path: Path) -> None:
    ca_key, other_key = _key(), _key()
    ca = _cert("test CA", ca_key, None, ca_key)
    other_ca = _cert("other CA", other_key, None, other_key)
    server_key, client_key, rogue_key = _key(), _key(), _key()
    _write(tmp_path / "ca", ca)
    _write(tmp_path / "server", _cert("localhost", server_key, ca, ca_key), server_key)
    _write(tmp_path / "client", _cert("client", client_key, ca, ca_key), client_key)
    _write(tmp_path / "rogue", _cert("rogue", rogue_key, other_ca, other_key), rogue_key)
    service = _start(
        predictor,
        tls_cert=tmp_path / "server.crt",
        tls_key=tmp_path / "server.key",
        tls_client_ca=tmp_path / "ca.crt",
    )
    ca_pem = (tmp_path / "ca.crt").read_bytes()
    request = pb.ClassifyRequest(image=image.read_bytes())

    def classify(who: str | None) -> pb.ClassifyResponse:
        key = (tmp_path / f"{who}.key").read_bytes() if who else None
        chain = (tmp_path / f"{who}.crt").read_bytes() if who else None
        credentials = grpc.ssl_channel_credentials(ca_pem, private_key=key, certificate_chain=chain)
        with grpc.secure_channel(f"localhost:{service.port}", credentials) as ch:
            return pb_grpc.CXRTriageStub(ch).Classify(request, timeout=10)

    try:
        assert classify("client").predicted_class in CLASS_NAMES
        for who in (None, "rogue"):
            with pytest.raises(grpc.RpcError) as info:
                classify(who)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        runner = CliRunner()
        tls = ["--tls-ca", str(tmp_path / "ca.crt"), "--tls-cert", str(tmp_path / "client.crt")]
        tls += ["--tls-key", str(tmp_path / "client.key")]
        result = runner.invoke(app, ["--target", f"localhost:{service.port}", *tls, "classify", str(image)])
        assert result.exit_code == 0, result.output
    finally:
        service.server.stop(None)


def test_mutual_tls_needs_a_server_certificate(tmp_path: Path) -> None:
    from cxr_monai.errors import CXRMonaiError

    with pytest.raises(CXRMonaiError, match="needs --tls-cert"):
        ServerConfig(tls_client_ca=tmp_path / "ca.crt")
