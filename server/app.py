"""Build and run the gRPC server: CXRTriage, health, reflection (v1 and v1alpha), TLS/mTLS, token, limits.

Health (grpc.health.v1) reports NOT_SERVING for "" and the service until :meth:`Service.warm_up` has
run the model, SERVING then, and NOT_SERVING again from the moment :meth:`Service.stop` starts.
"""

from __future__ import annotations

import logging
import os
import signal
import ssl
import sys
import threading
import time
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import grpc
from cxr_monai.server.auth import BearerTokenInterceptor
from cxr_monai.server.reflection import enable_reflection
from cxr_monai.server.servicer import CXRTriageServicer
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from cxr_monai import log_hygiene
from cxr_monai.api.v1 import cxr_triage_pb2, cxr_triage_pb2_grpc
from cxr_monai.errors import CXRMonaiError

logger = logging.getLogger(__name__)

SERVICE_NAME = cxr_triage_pb2.DESCRIPTOR.services_by_name["CXRTriage"].full_name
HEALTH_SERVICE_NAME = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
#: gRPC's default receive limit is 4 MiB; a 16-bit 3000 x 3000 film is about 18 MB.
DEFAULT_MAX_MESSAGE_MB = 64
#: Threads beyond the work slots and queue places: health, reflection, GetModelInfo and refusals always
#: find one.
SPARE_THREADS = 4
#: grpc's channel argument: the bitset of compression algorithms accepted (bit 0 identity, 1 deflate, 2
#: gzip). gRPC bounds a compressed message only by the decompressed-size limit (64 MiB here), so ~64 kB of
#: gzip on the wire become a 63 MiB request that costs the reader seconds of CPU: by default requests
#: must come uncompressed (films are mostly compressed already), and a compressed one is answered
#: UNIMPLEMENTED before it is inflated.
COMPRESSION_ALGORITHMS_ARG = "grpc.compression_enabled_algorithms_bitset"
IDENTITY_ONLY, IDENTITY_DEFLATE_GZIP = 0b001, 0b111
#: After the grace period, how long calls still running get to reach a stage boundary.
ABANDON_MARGIN_S = 1.0
#: How often the main thread wakes while serving, so that a signal the kernel gave to another thread
#: gets its Python handler run (handlers run only in the main thread, between its bytecodes).
SIGNAL_POLL_S = 0.2


@dataclass(frozen=True)
class ServerConfig:
    """How to serve.

    Attributes:
        address: ``host:port``; port 0 picks a free port. Loopback by default: expose deliberately.
        max_message_mb: largest request/response in MiB (Explain replies that could exceed it are refused).
        tls_cert, tls_key: PEM files; both or neither (then the port is plaintext).
        tls_client_ca: PEM CA bundle; when set, clients must present a certificate it signed (mutual TLS).
        token: when set, every call but health and reflection needs ``authorization: Bearer <token>``.
        max_metadata_kb: largest request metadata (headers) the server accepts, KiB.
        accept_compressed: accept gzip/deflate-compressed requests (bounded only by ``max_message_mb``
            once inflated); off by default: they are answered UNIMPLEMENTED.
    """

    address: str = "127.0.0.1:50051"
    max_message_mb: int = DEFAULT_MAX_MESSAGE_MB
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    token: str | None = None
    max_metadata_kb: int = 16
    accept_compressed: bool = False

    def __post_init__(self) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise CXRMonaiError("TLS needs both a certificate and a key (--tls-cert and --tls-key)")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise CXRMonaiError("mutual TLS (--tls-client-ca) needs --tls-cert and --tls-key")
        if self.max_message_mb < 1:
            raise CXRMonaiError(f"max message size must be at least 1 MiB, got {self.max_message_mb}")
        if self.max_metadata_kb < 1:
            raise CXRMonaiError(f"max metadata size must be at least 1 KiB, got {self.max_metadata_kb}")


@dataclass
class Service:
    """A built server with its servicer and health state."""

    server: grpc.Server
    port: int
    servicer: CXRTriageServicer
    health: health.HealthServicer

    def start(self) -> None:
        """Listen; health says NOT_SERVING and work is answered UNAVAILABLE until :meth:`warm_up`."""
        self.server.start()

    def warm_up(self) -> None:
        """Run the model once, then admit work and report SERVING."""
        self.servicer.warm_up()
        for name in ("", SERVICE_NAME):
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)

    def stop(self, grace_s: float = 5.0, notice_s: float = 0.0) -> int:
        """Drain and stop within ``notice_s + grace_s + ABANDON_MARGIN_S``; the calls still running.

        Health turns NOT_SERVING and new work is refused (UNAVAILABLE) at once; for ``notice_s`` the
        port stays open so load balancers see NOT_SERVING; calls in flight then get ``grace_s`` to
        finish, after which they are abandoned at their next stage boundary.
        """
        self.health.enter_graceful_shutdown()
        self.servicer.drain()
        time.sleep(notice_s)
        stopped = self.server.stop(grace_s)
        running = self.servicer.wait_idle(grace_s)
        if running:
            logger.warning("%d call(s) running after the %.1f s grace: abandoning them", running, grace_s)
            self.servicer.abandon()
            running = self.servicer.wait_idle(ABANDON_MARGIN_S)
        stopped.wait(ABANDON_MARGIN_S)
        self.servicer.close()
        return running


def build_server(servicer: CXRTriageServicer, config: ServerConfig) -> Service:
    """A built, not yet started, :class:`Service`; threads are sized from ``servicer.limits``. Library
    warnings and records are scrubbed of header values from here on (:func:`log_hygiene.install`), also
    for a server built without the CLI."""
    log_hygiene.install()
    limit = config.max_message_mb * 1024 * 1024
    servicer.max_reply_bytes = limit
    interceptors = [BearerTokenInterceptor(config.token)] if config.token else []
    # every call in a handler holds a work slot or a queue place (admission), so the pool never runs dry
    threads = servicer.limits.max_inflight + servicer.limits.max_queue + SPARE_THREADS
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=threads, thread_name_prefix="cxr-grpc"),
        interceptors=interceptors,
        options=[
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", limit),
            ("grpc.max_metadata_size", config.max_metadata_kb * 1024),
            (
                COMPRESSION_ALGORITHMS_ARG,
                IDENTITY_DEFLATE_GZIP if config.accept_compressed else IDENTITY_ONLY,
            ),
        ],
        # bounds what waits for a thread (each call may hold a request of up to `limit` bytes)
        maximum_concurrent_rpcs=2 * threads,
    )
    cxr_triage_pb2_grpc.add_CXRTriageServicer_to_server(servicer, server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    enable_reflection((SERVICE_NAME, HEALTH_SERVICE_NAME), server)
    if config.tls_cert is not None:
        port = server.add_secure_port(config.address, _credentials(config))
    else:
        port = server.add_insecure_port(config.address)
    if port == 0:
        raise CXRMonaiError(f"cannot bind {config.address}")
    return Service(server, port, servicer, health_servicer)


def _credentials(config: ServerConfig) -> grpc.ServerCredentials:
    assert config.tls_cert is not None and config.tls_key is not None
    try:
        key, cert = config.tls_key.read_bytes(), config.tls_cert.read_bytes()
        ca = config.tls_client_ca.read_bytes() if config.tls_client_ca else None
    except OSError as exc:
        raise CXRMonaiError(f"cannot read the TLS key, certificate or client CA: {exc}") from exc
    try:  # grpc reports a mismatch only as "Failed to bind", with C-core errors on stderr
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(config.tls_cert, config.tls_key)
    except ssl.SSLError as exc:
        raise CXRMonaiError(
            f"the TLS key (--tls-key) does not match the certificate (--tls-cert), or one of them is not "
            f"PEM ({exc.reason or type(exc).__name__})"
        ) from exc
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=ca, require_client_auth=ca is not None
    )


def serve_until_signalled(service: Service, grace_s: float = 5.0, notice_s: float = 1.0) -> NoReturn:
    """Start, warm up, serve until SIGINT/SIGTERM, then :meth:`Service.stop`.

    A call still running after the grace period and the margin (inside a stage, e.g. a long model call)
    cannot be interrupted in Python; the process exits without waiting for it (status 1; 0 when every
    call ended). Never returns.
    """
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    service.start()
    service.warm_up()
    # never a wait without a timeout: a process-directed signal may land on any thread, and the C
    # handler there only flags it; the main thread must wake to run the Python handler
    while not stop.wait(SIGNAL_POLL_S):
        pass
    logger.info("stopping (notice %.1f s, grace %.1f s)", notice_s, grace_s)
    running = service.stop(grace_s, notice_s)
    if running:
        logger.warning("exiting with %d abandoned call(s) still running", running)
    # A normal exit would wait for the (non-daemon) worker threads of abandoned calls, and the
    # interpreter's teardown of torch and grpc took ~6 s on a loaded 2-core machine: exit at once.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1 if running else 0)
