"""``cxr-monai export``: a trained bundle's network as ONNX (plus int8) or TorchScript, verified."""

from __future__ import annotations

from pathlib import Path

import typer

from cxr_monai.commands import console, user_errors


def export(
    bundle: Path = typer.Option(..., "--bundle", help="Trained bundle directory."),
    fmt: str = typer.Option("onnx", "--format", help="onnx or torchscript."),
    out: Path = typer.Option(
        ..., "--out", help="Output file (.onnx / .pt); a .json report is written beside."
    ),
    images: list[Path] = typer.Option(
        [], "--verify-image", exists=True, help="Image to verify exported vs eager logits on (repeatable)."
    ),
    opset: int = typer.Option(17, "--opset", min=13, help="ONNX opset."),
    int8: bool = typer.Option(
        True, "--int8/--no-int8", help="Also write <out>.int8.onnx (dynamic quantisation)."
    ),
) -> None:
    """Export the network for devices and ONNX Runtime: input `image` (B, 3, S, S) pre-processed as the
    bundle does, output `logits` (B, K), dynamic batch. Fails unless the exported logits equal eager within
    1e-4 on a random batch and on every --verify-image.

    Example: cxr-monai export --bundle out/bundle --format onnx --out model.onnx --verify-image film.dcm
    """
    from cxr_monai.export import export_bundle

    with user_errors():
        report = export_bundle(bundle, fmt, out, images=images, opset=opset, int8=int8)
    found = report.agreement
    console.print(
        f"{report.format} written to {report.path} ({report.size_bytes / 2**20:.1f} MiB); "
        f"max |logit - eager| {found.max_abs_logit_diff:.1e} on {found.inputs} inputs "
        f"({report.verification_images} images)",
        highlight=False,
    )
    if report.int8:
        q = report.int8["agreement"]
        console.print(
            f"int8 written to {report.int8['path']} ({report.int8['size_bytes'] / 2**20:.1f} MiB); max "
            f"|probability - eager| {q['max_abs_probability_diff']:.3f}, same class on "
            f"{q['argmax_agreement']:.0%} of inputs",
            highlight=False,
        )
