"""``cxr-monai serve``: the gRPC service (classification and Grad-CAM) for PACS integrations."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from cxr_monai.commands import (
    bundle_option,
    console,
    examples,
    resolve_bundle,
    site_profiles_option,
    unknown_site_option,
    user_errors,
)
from cxr_monai.constants import MAX_PIXELS, MAX_SIDE

if TYPE_CHECKING:
    import torch

    from cxr_monai.export import OnnxModel

TOKEN_ENV = "CXR_MONAI_TOKEN"
EPILOG = examples(
    "cxr-monai serve --bundle out/train/final --address 0.0.0.0:50051 \\\n"
    "    --token-file token --tls-cert server.crt --tls-key server.key \\\n"
    "    --tls-client-ca clients-ca.crt",
    "cxr-monai serve --bundle out/train/final --backend onnx --max-batch 16",
)


def serve(
    bundle: Path | None = bundle_option(),
    address: str = typer.Option(
        "127.0.0.1:50051",
        "--address",
        metavar="HOST:PORT",
        help="host:port to listen on (0.0.0.0:50051 for all interfaces).",
    ),
    max_message_mb: int = typer.Option(
        64, "--max-message-mb", metavar="MIB", help="Largest request or response, MiB."
    ),
    max_inflight: int = typer.Option(
        4,
        "--max-inflight",
        "--workers",
        metavar="N",
        min=1,
        help="Work slots: images read, pre-processed or modelled at once.",
    ),
    max_queue: int = typer.Option(
        64,
        "--max-queue",
        metavar="N",
        min=0,
        help="Calls waiting for a slot, plus open ClassifyStudy streams; more refused.",
    ),
    queue_timeout_ms: float = typer.Option(
        10000.0,
        "--queue-timeout-ms",
        metavar="MS",
        min=0.0,
        help="Longest wait for a slot or memory before RESOURCE_EXHAUSTED.",
    ),
    stream_idle_timeout: float = typer.Option(
        10.0,
        "--stream-idle-timeout",
        metavar="SECONDS",
        min=0.0,
        help="Cancel a ClassifyStudy stream silent this long (0: never).",
    ),
    max_memory_mb: int = typer.Option(
        4096,
        "--max-memory-mb",
        metavar="MIB",
        min=1,
        help="Memory budget of the images of the calls admitted together.",
    ),
    accept_compressed: bool = typer.Option(
        False,
        "--accept-compressed",
        help="Accept gzip/deflate-compressed requests (refused by default).",
    ),
    request_timeout: float = typer.Option(
        60.0,
        "--request-timeout",
        metavar="SECONDS",
        min=0.0,
        help="Server-side time limit per call, seconds (0: none).",
    ),
    max_pixels: int = typer.Option(
        MAX_PIXELS,
        "--max-pixels",
        metavar="PIXELS",
        min=1,
        help=f"Pixel budget per image (and {MAX_SIDE} per side).",
    ),
    grace: float = typer.Option(
        5.0, "--grace", metavar="SECONDS", min=0.0, help="Seconds calls in flight get at shutdown."
    ),
    tls_cert: Path | None = typer.Option(
        None, "--tls-cert", metavar="PEM", exists=True, help="PEM certificate (with --tls-key)."
    ),
    tls_key: Path | None = typer.Option(
        None, "--tls-key", metavar="PEM", exists=True, help="PEM private key (with --tls-cert)."
    ),
    tls_client_ca: Path | None = typer.Option(
        None,
        "--tls-client-ca",
        metavar="PEM",
        exists=True,
        help="PEM CA: require client certificates it signed (mTLS).",
    ),
    token_file: Path | None = typer.Option(
        None,
        "--token-file",
        metavar="FILE",
        exists=True,
        help=f"File holding the bearer token (instead of ${TOKEN_ENV}).",
    ),
    max_metadata_kb: int = typer.Option(
        16, "--max-metadata-kb", metavar="KIB", min=1, help="Request metadata limit, KiB."
    ),
    device: str | None = typer.Option(
        None, "--device", metavar="DEVICE", help="cpu, cuda, cuda:1 ... (default: cuda if present)."
    ),
    backend: str = typer.Option(
        "auto",
        "--backend",
        metavar="BACKEND",
        help="Classify with onnx (ONNX Runtime), eager PyTorch, or auto: onnx on CPU when "
        "onnxruntime is installed, else eager. Explain stays eager.",
    ),
    onnx_file: Path | None = typer.Option(
        None,
        "--onnx",
        metavar="FILE",
        exists=True,
        help="ONNX file from `cxr-monai export` (default: export at start-up).",
    ),
    onnx_threads: int = typer.Option(
        0, "--onnx-threads", metavar="N", min=0, help="ONNX Runtime threads (0: all cores)."
    ),
    max_batch: int = typer.Option(
        8, "--max-batch", metavar="N", min=1, help="Most Classify images per model call."
    ),
    max_batch_wait_ms: float = typer.Option(
        5.0,
        "--max-batch-wait-ms",
        metavar="MS",
        min=0.0,
        help="How long a Classify image waits for others to batch with.",
    ),
    site_profiles: Path | None = site_profiles_option(),
    unknown_site: str = unknown_site_option(
        "A request whose site has no profile: flag (uncalibrated, said so) or refuse."
    ),
) -> None:
    """Serve classification and Grad-CAM over gRPC (API: protos/cxr_monai/api/v1/cxr_triage.proto).

    Health checking (grpc.health.v1: NOT_SERVING until the model is warm and while draining) and
    server reflection (v1 and v1alpha) are on. A token from --token-file or $CXR_MONAI_TOKEN makes
    every call need `authorization: Bearer <token>` (health and reflection stay open). Stop with
    Ctrl-C or SIGTERM: the process exits within --grace seconds plus about 2.

    Admission counts work: --max-inflight slots are held while an image is read, pre-processed and
    modelled; a burst waits in a queue (--max-queue, --queue-timeout-ms) before RESOURCE_EXHAUSTED; a
    ClassifyStudy stream holds no slot between its messages and is cancelled after --stream-idle-timeout
    without one; each call reserves its image's memory from --max-memory-mb, from the header, before
    decoding. Compressed requests are answered UNIMPLEMENTED unless --accept-compressed.

    Concurrent Classify calls (and the images of a ClassifyStudy stream) share model calls: up to
    --max-batch images, waiting at most --max-batch-wait-ms for each other. --backend onnx classifies
    with ONNX Runtime (the bundle exported at start-up to a temporary file and verified, or --onnx FILE);
    the default, auto, does so on CPU when onnxruntime is installed (on 2 cores eager PyTorch took twice
    the CPU per film), and uses eager PyTorch on a GPU.

    A request naming its site gets that site's calibration (from --site-profiles or <bundle>/sites);
    a site without a profile is flagged uncalibrated in the reply, or with --unknown-site refuse answered
    FAILED_PRECONDITION. A damaged profile, or one fitted for other weights, stops the start.
    """
    bundle_dir = resolve_bundle(bundle)
    # imported here so that `cxr-monai --help` and the other commands do not load grpc and torch
    from cxr_monai.errors import CXRMonaiError
    from cxr_monai.io import ImageLimits
    from cxr_monai.predictor import Predictor
    from cxr_monai.server.app import ServerConfig, build_server, serve_until_signalled
    from cxr_monai.server.auth import read_token_file
    from cxr_monai.server.batching import BatchingConfig
    from cxr_monai.server.servicer import CXRTriageServicer, ServiceLimits

    with user_errors():
        token = read_token_file(token_file) if token_file else os.environ.get(TOKEN_ENV) or None
        limits = ServiceLimits(
            max_inflight=max_inflight,
            request_timeout_s=request_timeout or None,
            image=ImageLimits(max_pixels=max_pixels),
            max_queue=max_queue,
            queue_timeout_s=queue_timeout_ms / 1000.0,
            stream_idle_timeout_s=stream_idle_timeout or None,
            max_memory_mb=max_memory_mb,
        )
        config = ServerConfig(
            address=address,
            max_message_mb=max_message_mb,
            tls_cert=tls_cert,
            tls_key=tls_key,
            tls_client_ca=tls_client_ca,
            token=token,
            max_metadata_kb=max_metadata_kb,
            accept_compressed=accept_compressed,
        )
        if backend not in ("auto", "eager", "onnx"):
            raise CXRMonaiError(f"--backend {backend!r}: expected auto, eager or onnx")
        if onnx_file is not None and backend == "eager":
            raise CXRMonaiError("--onnx needs --backend onnx (or auto)")
        batching = BatchingConfig(max_batch=max_batch, max_wait_ms=max_batch_wait_ms)
        predictor = Predictor.from_bundle(
            bundle_dir, device=device, site_profiles=site_profiles, unknown_site=unknown_site
        )
        if backend == "auto":
            backend = auto_backend(predictor.device, onnx_file is not None)
        onnx_model = _onnx_model(bundle_dir, onnx_file, onnx_threads) if backend == "onnx" else None
        servicer = CXRTriageServicer(predictor, limits, batching=batching, onnx_model=onnx_model)
        service = build_server(servicer, config)
    host = address.rsplit(":", 1)[0]
    scheme = "mutual TLS" if tls_client_ca else "TLS" if tls_cert else "plaintext"
    auth = "token required" if config.token else "no token"
    console.print(
        f"serving {predictor.model_name} {predictor.model_version} ({predictor.backbone}) "
        f"on {host}:{service.port} "
        f"[{scheme}, {auth}, {max_inflight} work slots, {max_queue} queue places, "
        f"classify {backend} in batches of up to {max_batch}; "
        f"site profiles: {', '.join(sorted(predictor.sites.profiles)) or 'none'}, unknown sites "
        f"{unknown_site}]. Research use only - NOT FOR CLINICAL USE.",
        highlight=False,
        markup=False,  # the [...] part is text, not rich markup (it vanished from the banner)
    )
    serve_until_signalled(service, grace_s=grace)


def auto_backend(device: torch.device, onnx_file_given: bool) -> str:
    """``--backend auto``: onnx when an ONNX file is given, or on CPU when onnxruntime is installed;
    eager otherwise (a GPU, or no onnxruntime)."""
    import importlib.util

    if onnx_file_given:
        return "onnx"
    if device.type == "cpu" and importlib.util.find_spec("onnxruntime") is not None:
        return "onnx"
    return "eager"


def _onnx_model(bundle: Path, onnx_file: Path | None, threads: int) -> OnnxModel:
    """The ONNX Runtime session: ``onnx_file``, or the bundle exported (and verified) to a temporary file
    that is loaded and removed at once. Its threads do not spin while idle: calls are read and
    pre-processed in other threads beside it."""
    import tempfile

    from cxr_monai.export import OnnxModel, export_bundle

    if onnx_file is not None:
        return OnnxModel(onnx_file, threads, spinning=False)
    with tempfile.TemporaryDirectory(prefix="cxr-monai-onnx-") as folder:
        report = export_bundle(bundle, "onnx", Path(folder) / "model.onnx", int8=False)
        return OnnxModel(report.path, threads, spinning=False)
