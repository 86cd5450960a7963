"""A command-line client of the gRPC service: ``python -m cxr_monai.client --target HOST:PORT ...``.

Prints one result per file; on a failed call prints the status name and message and exits 1.
"""

from __future__ import annotations

import os
from pathlib import Path

import grpc
import typer
from rich.console import Console

from cxr_monai.api.v1 import cxr_triage_pb2 as pb
from cxr_monai.api.v1 import cxr_triage_pb2_grpc as pb_grpc
from cxr_monai.commands.serve import TOKEN_ENV

app = typer.Typer(
    add_completion=False, help="Call a cxr-monai server. Research use only - NOT FOR CLINICAL USE."
)
console = Console(highlight=False)
#: Matches the server's default message limit (a 16-bit 3000 x 3000 film is about 18 MB).
MAX_MESSAGE_BYTES = 64 * 1024 * 1024


class _Options:
    target: str = "127.0.0.1:50051"
    credentials: grpc.ChannelCredentials | None = None
    metadata: tuple[tuple[str, str], ...] = ()
    timeout: float = 60.0


_options = _Options()


@app.callback()
def main(
    target: str = typer.Option("127.0.0.1:50051", "--target", help="host:port of the server."),
    tls_ca: Path | None = typer.Option(
        None, "--tls-ca", exists=True, help="PEM CA to verify the server (TLS)."
    ),
    tls_cert: Path | None = typer.Option(
        None, "--tls-cert", exists=True, help="PEM client certificate (mTLS)."
    ),
    tls_key: Path | None = typer.Option(None, "--tls-key", exists=True, help="PEM client key (mTLS)."),
    token_file: Path | None = typer.Option(
        None, "--token-file", exists=True, help=f"Bearer token file (default: ${TOKEN_ENV})."
    ),
    timeout: float = typer.Option(60.0, "--timeout", min=0.1, help="Deadline per call, seconds."),
) -> None:
    """Connection options; then a command."""
    if (tls_cert is None) != (tls_key is None):
        raise typer.BadParameter("--tls-cert and --tls-key go together")
    _options.target, _options.timeout = target, timeout
    if tls_ca or tls_cert:
        _options.credentials = grpc.ssl_channel_credentials(
            root_certificates=tls_ca.read_bytes() if tls_ca else None,
            private_key=tls_key.read_bytes() if tls_key else None,
            certificate_chain=tls_cert.read_bytes() if tls_cert else None,
        )
    token = token_file.read_text(encoding="utf-8").strip() if token_file else os.environ.get(TOKEN_ENV)
    _options.metadata = (("authorization", f"Bearer {token}"),) if token else ()


def _channel() -> grpc.Channel:
    options = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)]
    options.append(("grpc.max_send_message_length", MAX_MESSAGE_BYTES))
    if _options.credentials is not None:
        return grpc.secure_channel(_options.target, _options.credentials, options=options)
    return grpc.insecure_channel(_options.target, options=options)


def _failed(exc: grpc.RpcError) -> typer.Exit:
    console.print(f"[red]{exc.code().name}[/red]: {exc.details()}")
    return typer.Exit(1)


def _print_classification(name: str, response: pb.ClassifyResponse) -> None:
    probs = "  ".join(f"{p.class_name} {p.probability:.3f}" for p in response.probabilities)
    console.print(f"{name}: {response.predicted_class}  ({probs})  {response.columns} x {response.rows}")
    if response.site_status:  # empty from a server older than the site fields
        console.print(f"  {response.site_status}")
    for warning in response.warnings:
        console.print(f"  warning: {warning}")


@app.command()
def info() -> None:
    """The served model: name, version, backbone, classes, intended use."""
    with _channel() as ch:
        try:
            model = pb_grpc.CXRTriageStub(ch).GetModelInfo(
                pb.GetModelInfoRequest(), metadata=_options.metadata, timeout=_options.timeout
            )
        except grpc.RpcError as exc:
            raise _failed(exc) from None
    console.print(f"{model.name} {model.version} ({model.backbone}, {model.spatial_size} px)")
    console.print(f"classes: {', '.join(model.class_names)}")
    console.print(
        f"calibrated sites: {', '.join(model.calibrated_sites) or 'none'}; others: {model.unknown_site}"
    )
    console.print(model.intended_use)


@app.command()
def classify(
    files: list[Path] = typer.Argument(..., exists=True, dir_okay=False),
    site: str = typer.Option("", "--site", help="The films' site (its calibration is applied)."),
) -> None:
    """Class probabilities of each file."""
    with _channel() as ch:
        stub = pb_grpc.CXRTriageStub(ch)
        for path in files:
            request = pb.ClassifyRequest(image=path.read_bytes(), site=site)
            try:
                response = stub.Classify(request, metadata=_options.metadata, timeout=_options.timeout)
            except grpc.RpcError as exc:
                console.print(f"{path.name}:", end=" ")
                raise _failed(exc) from None
            _print_classification(path.name, response)


@app.command()
def explain(
    files: list[Path] = typer.Argument(..., exists=True, dir_okay=False),
    output: Path | None = typer.Option(
        None, "--output", "-o", help="Write <name>.overlay.png (and .sc.dcm) here."
    ),
    target_class: str = typer.Option("", "--class", help="Class to explain (default: the predicted one)."),
    secondary_capture: bool = typer.Option(False, "--secondary-capture", help="Also get a DICOM SC."),
    site: str = typer.Option("", "--site", help="The films' site (its calibration is applied)."),
) -> None:
    """Grad-CAM of each file: prediction, peak and area above 0.5; overlay/SC written with --output."""
    with _channel() as ch:
        stub = pb_grpc.CXRTriageStub(ch)
        for path in files:
            request = pb.ExplainRequest(
                image=path.read_bytes(),
                target_class=target_class,
                secondary_capture=secondary_capture,
                omit_overlay_png=output is None,
                site=site,
            )
            try:
                response = stub.Explain(request, metadata=_options.metadata, timeout=_options.timeout)
            except grpc.RpcError as exc:
                console.print(f"{path.name}:", end=" ")
                raise _failed(exc) from None
            _print_classification(path.name, response.classification)
            peak = (
                f"peak (row {response.peak_row}, column {response.peak_column})"
                if response.HasField("peak_row")
                else "map all zero"
            )
            console.print(
                f"  Grad-CAM for {response.explained_class}: {peak}, "
                f"{response.area_above_half:.1%} of the image above 0.5"
            )
            if output is not None:
                output.mkdir(parents=True, exist_ok=True)
                (output / f"{path.stem}.overlay.png").write_bytes(response.overlay_png)
                if response.secondary_capture_dicom:
                    (output / f"{path.stem}.sc.dcm").write_bytes(response.secondary_capture_dicom)


if __name__ == "__main__":
    app()
