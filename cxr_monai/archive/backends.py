"""The batched forward of ``cxr-monai predict``: pre-processed inputs (B, 3, S, S) -> the model's own
probabilities (B, K) float32, with eager PyTorch (:meth:`Predictor.predict_tensors`) or ONNX Runtime
(an :class:`cxr_monai.export.OnnxModel`, checked against the bundle as ``serve --backend onnx`` does)."""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from cxr_monai.errors import CXRMonaiError
from cxr_monai.predictor import Predictor

BACKENDS = ("eager", "onnx")
#: A batch of inputs -> the model's probabilities (B, K) float32.
Forward = Callable[[torch.Tensor], np.ndarray]


def make_forward(
    predictor: Predictor, backend: str, bundle: Path, onnx_file: Path | None = None, onnx_threads: int = 0
) -> Forward:
    """The forward of ``backend``: ``eager`` the predictor's network; ``onnx`` ONNX Runtime on
    ``onnx_file`` (exported by ``cxr-monai export`` from this bundle) or, without one, on the bundle
    exported now to a temporary file (verified against eager, loaded, removed).

    Raises:
        CXRMonaiError: unknown backend, ``onnx_file`` without ``onnx``, onnxruntime missing, or the file
            was exported from another bundle (BundleError).
    """
    if backend not in BACKENDS:
        raise CXRMonaiError(f"--backend {backend!r}: expected eager or onnx")
    if backend == "eager":
        if onnx_file is not None:
            raise CXRMonaiError("--onnx needs --backend onnx")
        return predictor.predict_tensors
    from cxr_monai.export import OnnxModel, export_bundle, softmax

    if onnx_file is not None:
        model = OnnxModel(onnx_file, onnx_threads)
    else:
        with tempfile.TemporaryDirectory(prefix="cxr-monai-onnx-") as folder:
            report = export_bundle(bundle, "onnx", Path(folder) / "model.onnx", int8=False)
            model = OnnxModel(report.path, onnx_threads)
    model.check_matches(predictor)
    return lambda batch: softmax(model.logits(batch))
