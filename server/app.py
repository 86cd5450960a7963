"""Build and run the gRPC server: CXRTriage service, health, reflection, TLS, token auth, size limits."""

from __future__ import annotations

import logging
import signal
import threading
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
from cxr_monai.server.auth import BearerTokenInterceptor
from cxr_monai.server.servicer import CXRTriageServicer
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from cxr_monai.api.v1 import cxr_triage_pb2, cxr_triage_pb2_grpc
from cxr_monai.errors import CXRMonaiError

logger = logging.getLogger(__name__)

SERVICE_NAME = cxr_triage_pb2.DESCRIPTOR.services_by_name["CXRTriage"].full_name
#: gRPC's default receive limit is 4 MiB; a 16-bit 3000 x 3000 film is about 18 MB.
DEFAULT_MAX_MESSAGE_MB = 64


@dataclass(frozen=True)
class ServerConfig:
    """How to serve.

    Attributes:
        address: ``host:port``; port 0 picks a free port. Loopback by default: expose deliberately.
        max_message_mb: largest request/response in MiB.
        workers: threads serving requests (model calls are serialised; see the servicer).
        tls_cert, tls_key: PEM files; both or neither (then the port is plaintext).
        token: when set, every call but health and reflection needs ``authorization: Bearer <token>``.
    """

    address: str = "127.0.0.1:50051"
    max_message_mb: int = DEFAULT_MAX_MESSAGE_MB
    workers: int = 4
    tls_cert: Path | None = None
    tls_key: Path | None = None
    token: str | None = None

    def __post_init__(self) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise CXRMonaiError("TLS needs both a certificate and a key (--tls-cert and --tls-key)")
        if self.max_message_mb < 1:
            raise CXRMonaiError(f"max message size must be at least 1 MiB, got {self.max_message_mb}")


def build_server(servicer: CXRTriageServicer, config: ServerConfig) -> tuple[grpc.Server, int]:
    """A started-ready (not started) server and the port it bound."""
    limit = config.max_message_mb * 1024 * 1024
    interceptors = [BearerTokenInterceptor(config.token)] if config.token else []
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=config.workers),
        interceptors=interceptors,
        options=[
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", limit),
        ],
    )
    cxr_triage_pb2_grpc.add_CXRTriageServicer_to_server(servicer, server)

    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
        server,
    )

    if config.tls_cert is not None and config.tls_key is not None:
        try:
            key, cert = config.tls_key.read_bytes(), config.tls_cert.read_bytes()
        except OSError as exc:
            raise CXRMonaiError(f"cannot read the TLS key or certificate: {exc}") from exc
        credentials = grpc.ssl_server_credentials([(key, cert)])
        port = server.add_secure_port(config.address, credentials)
    else:
        port = server.add_insecure_port(config.address)
    if port == 0:
        raise CXRMonaiError(f"cannot bind {config.address}")
    return server, port


def serve_until_signalled(server: grpc.Server, grace_s: float = 5.0) -> None:
    """Start ``server`` and block until SIGINT/SIGTERM, then stop with ``grace_s`` for calls in flight."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    server.start()
    stop.wait()
    logger.info("stopping (grace %.1f s)", grace_s)
    server.stop(grace_s).wait()
