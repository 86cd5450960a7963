"""``cxr-monai export``: a trained bundle's network as ONNX (plus int8) or TorchScript, verified."""

from __future__ import annotations

from pathlib import Path

import typer

from cxr_monai.commands import bundle_option, console, examples, resolve_bundle, user_errors

EPILOG = examples(
    "cxr-monai export --bundle out/train/final --format onnx --out model.onnx \\\n"
    "    --verify-image film.dcm",
)


def export(
    bundle: Path | None = bundle_option(),
    fmt: str = typer.Option("onnx", "--format", metavar="FORMAT", help="onnx or torchscript."),
    out: Path = typer.Option(
        ..., "--out", metavar="FILE", help="Output file (.onnx / .pt); a .json report is written beside."
    ),
    images: list[Path] = typer.Option(
        [],
        "--verify-image",
        metavar="FILE",
        exists=True,
        help="Image to verify exported vs eager logits on (repeatable).",
    ),
    opset: int = typer.Option(17, "--opset", metavar="N", min=13, help="ONNX opset."),
    int8: bool = typer.Option(
        True, "--int8/--no-int8", help="Also write <out>.int8.onnx (dynamic quantisation)."
    ),
) -> None:
    """Export the network for devices and ONNX Runtime: input `image` (B, 3, S, S) pre-processed as the
    bundle does, output `logits` (B, K), dynamic batch. Fails unless the exported logits equal eager within
    1e-4 on a random batch and on every --verify-image.
    """
    bundle_dir = resolve_bundle(bundle)
    from cxr_monai.export import export_bundle

    with user_errors():
        report = export_bundle(bundle_dir, fmt, out, images=images, opset=opset, int8=int8)
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
