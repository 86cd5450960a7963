"""Export a trained bundle's network for devices and servers: ONNX (plus an int8 variant) or TorchScript.

The exported graph maps the pre-processed batch ``image`` (B, 3, S, S) float32 - the output of
:func:`cxr_monai.transforms.inference_transforms` - to ``logits`` (B, K); B is a dynamic axis. What a
consumer needs to feed it right (spatial size, class order, pre-processing options, opset, model name and
version) travels inside the file (ONNX ``metadata_props``, a TorchScript extra file) and in a JSON beside
it. Every export is verified against the eager network: ONNX Runtime / TorchScript logits on a seeded
random batch and on any images given must be within :data:`TOLERANCE` of eager, or the export fails.

ONNX needs the optional packages ``onnx`` and ``onnxruntime`` (``pip install 'cxr-monai[onnx]'``).
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch

from cxr_monai.atomic import atomic_path, write_json_atomic
from cxr_monai.constants import RESEARCH_USE_NOTICE
from cxr_monai.errors import BundleError, CXRMonaiError
from cxr_monai.io import CXRImage, ImageSource
from cxr_monai.predictor import Predictor

logger = logging.getLogger(__name__)

FORMATS = ("onnx", "torchscript")
#: ONNX opset of the export (ONNX Runtime >= 1.12 runs it; the legacy TorchScript-based exporter is used
#: because the dynamo exporter needs onnxscript).
DEFAULT_OPSET = 17
INPUT_NAME = "image"
OUTPUT_NAME = "logits"
#: Largest allowed |exported - eager| logit difference.
TOLERANCE = 1e-4
#: Name of the metadata entry (ONNX metadata_props key, TorchScript extra file) holding the JSON metadata.
METADATA_KEY = "cxr_monai"
_VERIFY_BATCH = 2  # a batch of two checks the dynamic batch axis as well


def require_onnx() -> tuple[ModuleType, ModuleType]:
    """(onnx, onnxruntime), or a :class:`CXRMonaiError` saying how to install them."""
    try:
        import onnx
        import onnxruntime
    except ImportError as exc:
        raise CXRMonaiError(
            f"ONNX export and the ONNX Runtime backend need the packages onnx and onnxruntime ({exc.name} "
            "is missing): pip install 'cxr-monai[onnx]'"
        ) from exc
    return onnx, onnxruntime


@dataclass(frozen=True)
class Agreement:
    """How an exported model's logits compare with eager on ``inputs`` pre-processed inputs (3, S, S)."""

    inputs: int
    max_abs_logit_diff: float
    max_abs_probability_diff: float
    argmax_agreement: float


@dataclass
class ExportReport:
    """What :func:`export_bundle` wrote and measured (also written as JSON beside the file); the
    agreement is on a seeded random batch of two plus ``verification_images`` real images."""

    path: str
    format: str
    size_bytes: int
    metadata: dict[str, Any]
    verification_images: int
    agreement: Agreement
    int8: dict[str, Any] = field(default_factory=dict)


def model_metadata(predictor: Predictor, fmt: str, opset: int | None) -> dict[str, Any]:
    """The facts a consumer of the exported file needs (no patient data: model facts only)."""
    return {
        "format": fmt,
        "opset": opset,
        "torch": torch.__version__,
        "model_name": predictor.model_name,
        "model_version": predictor.model_version,
        "backbone": predictor.backbone,
        "spatial_size": predictor.spatial_size,
        "class_names": list(predictor.class_names),
        "preprocessing": {
            "chain": "cxr_monai.transforms.inference_transforms",
            **predictor.preprocessing_options,
        },
        "input": {"name": INPUT_NAME, "shape": ["batch", 3, predictor.spatial_size, predictor.spatial_size]},
        "output": {"name": OUTPUT_NAME, "shape": ["batch", len(predictor.class_names)]},
        "intended_use": RESEARCH_USE_NOTICE,
    }


class OnnxModel:
    """An ONNX Runtime session of an exported classifier: (B, 3, S, S) float32 -> logits (B, K).

    ``threads``: ONNX Runtime intra-op threads (0: its default, all cores). ``spinning``: whether idle
    intra-op threads spin for the next job (ONNX Runtime's default); a server that reads and pre-processes
    calls in other threads beside the model turns it off: on 2 cores spinning took a third of the CPU of
    each call (63 ms against 42 ms per 1024² film, 21 against 29 calls/s at 32 clients).
    """

    def __init__(self, path: str | Path, threads: int = 0, *, spinning: bool = True) -> None:
        _, ort = require_onnx()
        self.path = Path(path)
        if not self.path.is_file():
            raise BundleError(f"{self.path}: no such ONNX file")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        if not spinning:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(
                str(self.path), sess_options=options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises its own unrelated types for a corrupt file
            raise BundleError(f"{self.path}: not a loadable ONNX model ({type(exc).__name__})") from exc
        props = self.session.get_modelmeta().custom_metadata_map
        if METADATA_KEY not in props:
            raise BundleError(f"{self.path}: not exported by cxr-monai (no '{METADATA_KEY}' metadata)")
        self.metadata: dict[str, Any] = json.loads(props[METADATA_KEY])

    def check_matches(self, predictor: Predictor) -> None:
        """Raise BundleError unless the file was exported for ``predictor``'s input size and classes."""
        expected = model_metadata(predictor, "onnx", None)
        for key in ("spatial_size", "class_names", "backbone", "preprocessing"):
            if self.metadata.get(key) != expected[key]:
                raise BundleError(
                    f"{self.path}: exported with {key} {self.metadata.get(key)!r}, the bundle has "
                    f"{expected[key]!r}; export it again from this bundle"
                )

    def logits(self, batch: np.ndarray | torch.Tensor) -> np.ndarray:
        """(B, 3, S, S) float32 -> logits (B, K) float32."""
        x = batch.detach().cpu().numpy() if isinstance(batch, torch.Tensor) else np.asarray(batch)
        out = self.session.run([OUTPUT_NAME], {INPUT_NAME: np.ascontiguousarray(x, dtype=np.float32)})
        return np.asarray(out[0], dtype=np.float32)


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax of (B, K) logits, float32 (as ``torch.softmax``)."""
    return torch.softmax(torch.from_numpy(np.asarray(logits, dtype=np.float32)), dim=1).numpy()


def eager_logits(predictor: Predictor, batch: torch.Tensor) -> np.ndarray:
    """The bundle network's logits (B, K) float32 for a pre-processed batch (B, 3, S, S)."""
    with torch.inference_mode():
        return predictor.model(batch.to(predictor.device)).float().cpu().numpy()


def verification_batch(
    predictor: Predictor, images: Sequence[ImageSource | CXRImage] = (), seed: int = 0
) -> torch.Tensor:
    """(N, 3, S, S): a seeded standard-normal batch of two (ImageNet-normalised inputs are about N(0, 1))
    followed by ``images`` through the predictor's pre-processing."""
    size = predictor.spatial_size
    generator = torch.Generator().manual_seed(seed)
    parts = [torch.randn(_VERIFY_BATCH, 3, size, size, generator=generator)]
    parts += [torch.as_tensor(predictor.preprocess(image)).float().unsqueeze(0) for image in images]
    return torch.cat(parts)


def agreement(reference: np.ndarray, logits: np.ndarray) -> Agreement:
    """Compare logits (N, K) with reference logits (N, K)."""
    probs, ref_probs = softmax(logits), softmax(reference)
    return Agreement(
        inputs=len(reference),
        max_abs_logit_diff=float(np.max(np.abs(logits - reference))),
        max_abs_probability_diff=float(np.max(np.abs(probs - ref_probs))),
        argmax_agreement=float(np.mean(np.argmax(logits, 1) == np.argmax(reference, 1))),
    )


def export_onnx(predictor: Predictor, out: Path, opset: int = DEFAULT_OPSET) -> dict[str, Any]:
    """Write ``predictor.model`` as ONNX to ``out`` (dynamic batch axis, metadata inside).
    Returns the metadata."""
    onnx, _ = require_onnx()
    metadata = model_metadata(predictor, "onnx", opset)
    model = predictor.model.to("cpu").eval()
    example = torch.zeros(1, 3, predictor.spatial_size, predictor.spatial_size)
    try:
        with atomic_path(out) as tmp, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the legacy exporter's deprecation notice
            torch.onnx.export(
                model,
                (example,),
                str(tmp),
                dynamo=False,
                opset_version=opset,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            )
            proto = onnx.load(str(tmp))
            proto.doc_string = f"{predictor.model_name} {predictor.model_version}: {RESEARCH_USE_NOTICE}"
            entry = proto.metadata_props.add()
            entry.key, entry.value = METADATA_KEY, json.dumps(metadata)
            onnx.checker.check_model(proto)
            onnx.save(proto, str(tmp))
    finally:
        model.to(predictor.device)
    return metadata


def export_torchscript(predictor: Predictor, out: Path) -> dict[str, Any]:
    """Write ``predictor.model`` traced to TorchScript at ``out`` (metadata as an extra file).
    Returns the metadata."""
    metadata = model_metadata(predictor, "torchscript", None)
    model = predictor.model.to("cpu").eval()
    example = torch.zeros(1, 3, predictor.spatial_size, predictor.spatial_size)
    try:
        with atomic_path(out) as tmp, torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.jit deprecation notices
            traced = torch.jit.trace(model, example)
            torch.jit.save(traced, str(tmp), _extra_files={f"{METADATA_KEY}.json": json.dumps(metadata)})
    finally:
        model.to(predictor.device)
    return metadata


def quantize_int8(source: Path, out: Path) -> None:
    """ONNX Runtime dynamic quantisation of ``source``: int8 weights, activations quantised at run time."""
    require_onnx()
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with atomic_path(out) as tmp:
        quantize_dynamic(source, tmp, weight_type=QuantType.QInt8)


def export_bundle(
    bundle: str | Path,
    fmt: str,
    out: str | Path,
    *,
    images: Sequence[ImageSource | CXRImage] = (),
    opset: int = DEFAULT_OPSET,
    int8: bool = True,
    threads: int = 1,
) -> ExportReport:
    """Export ``bundle`` as ``fmt`` (``"onnx"`` or ``"torchscript"``) to ``out``, verify it, write
    ``out`` with suffix ``.json`` (the report), and for ONNX with ``int8`` also ``<out stem>.int8.onnx``.

    Raises:
        CXRMonaiError: unknown format, onnx/onnxruntime missing, or the export disagrees with eager by more
            than :data:`TOLERANCE` (the files are then removed).
        BundleError: the bundle cannot be loaded.
        InvalidImageError: a verification image cannot be read.
    """
    if fmt not in FORMATS:
        raise CXRMonaiError(f"format {fmt!r}: expected one of {', '.join(FORMATS)}")
    out = Path(out)
    predictor = Predictor.from_bundle(bundle, device="cpu", with_sites=False)
    batch = verification_batch(predictor, images)
    reference = eager_logits(predictor, batch)
    report_int8: dict[str, Any] = {}
    if fmt == "onnx":
        metadata = export_onnx(predictor, out, opset)
        found = agreement(reference, OnnxModel(out, threads).logits(batch))
    else:
        metadata = export_torchscript(predictor, out)
        with torch.inference_mode():
            found = agreement(reference, torch.jit.load(str(out)).eval()(batch).float().numpy())
    if found.max_abs_logit_diff > TOLERANCE:
        out.unlink(missing_ok=True)
        raise CXRMonaiError(
            f"{fmt} export of {bundle} disagrees with the eager network: max logit difference "
            f"{found.max_abs_logit_diff:.2e} > {TOLERANCE:g}; nothing was written"
        )
    if fmt == "onnx" and int8:
        int8_path = out.with_name(f"{out.stem}.int8.onnx")
        quantize_int8(out, int8_path)
        report_int8 = {
            "path": str(int8_path),
            "size_bytes": int8_path.stat().st_size,
            "agreement": asdict(agreement(reference, OnnxModel(int8_path, threads).logits(batch))),
        }
    report = ExportReport(str(out), fmt, out.stat().st_size, metadata, len(images), found, report_int8)
    write_json_atomic(out.with_suffix(".json"), asdict(report))
    logger.info("exported %s to %s (max logit difference %.2e)", bundle, out, found.max_abs_logit_diff)
    return report
