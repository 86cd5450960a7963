"""``cxr-monai serve``: the gRPC service (classification and Grad-CAM) for PACS integrations."""

from __future__ import annotations

import os
from pathlib import Path

import typer

from cxr_monai.commands import console, user_errors

TOKEN_ENV = "CXR_MONAI_TOKEN"


def serve(
    bundle: Path = typer.Option(..., "--bundle", envvar="CXR_MONAI_BUNDLE", help="Trained bundle directory."),
    address: str = typer.Option(
        "127.0.0.1:50051", "--address", help="host:port to listen on (0.0.0.0:50051 for all interfaces)."
    ),
    max_message_mb: int = typer.Option(64, "--max-message-mb", help="Largest request or response, MiB."),
    workers: int = typer.Option(4, "--workers", min=1, help="Request threads."),
    tls_cert: Path | None = typer.Option(
        None, "--tls-cert", exists=True, help="PEM certificate (with --tls-key)."
    ),
    tls_key: Path | None = typer.Option(
        None, "--tls-key", exists=True, help="PEM private key (with --tls-cert)."
    ),
    device: str | None = typer.Option(
        None, "--device", help="cpu, cuda, cuda:1 ... (default: cuda if present)."
    ),
) -> None:
    """Serve classification and Grad-CAM over gRPC (API: protos/cxr_monai/api/v1/cxr_triage.proto).

    Health checking (grpc.health.v1) and server reflection are on. Set $CXR_MONAI_TOKEN to require
    `authorization: Bearer <token>` on every call (health and reflection stay open). Stop with Ctrl-C.

    Example: CXR_MONAI_TOKEN=s3cret cxr-monai serve --bundle out/bundle --address 0.0.0.0:50051 \\
    --tls-cert server.crt --tls-key server.key
    """
    # imported here so that `cxr-monai --help` and the other commands do not load grpc and torch
    from cxr_monai.predictor import Predictor
    from cxr_monai.server.app import ServerConfig, build_server, serve_until_signalled
    from cxr_monai.server.servicer import CXRTriageServicer

    with user_errors():
        config = ServerConfig(
            address=address,
            max_message_mb=max_message_mb,
            workers=workers,
            tls_cert=tls_cert,
            tls_key=tls_key,
            token=os.environ.get(TOKEN_ENV) or None,
        )
        predictor = Predictor.from_bundle(bundle, device=device)
        server, port = build_server(CXRTriageServicer(predictor), config)
    host = address.rsplit(":", 1)[0]
    scheme = "TLS" if tls_cert else "plaintext"
    auth = "token required" if config.token else "no token"
    console.print(
        f"serving {predictor.model_name} {predictor.model_version} ({predictor.backbone}) on {host}:{port} "
        f"[{scheme}, {auth}]. Research use only - NOT FOR CLINICAL USE.",
        highlight=False,
    )
    serve_until_signalled(server)
