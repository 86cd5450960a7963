"""Test-split accuracy of a trained bundle: eager PyTorch vs its ONNX export and the int8 ONNX variant.

``cxr-monai export`` checks agreement on a few inputs; this scores all three on a datalist's test split
through the predictor's pre-processing and reports the int8 accuracy change with an image-bootstrap 95 %
interval. Usage::

    cxr-monai export --bundle out/train/final --format onnx --out out/lite0.onnx
    python benchmarks/export_accuracy.py --bundle out/train/final --onnx out/lite0.onnx \\
        --datalist out/prep/datalist.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from cxr_monai.data import get_test_items, load_datalist
from cxr_monai.export import OnnxModel
from cxr_monai.predictor import Predictor


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--onnx", type=Path, required=True, help="fp32 export; <stem>.int8.onnx beside it")
    parser.add_argument("--datalist", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    predictor = Predictor.from_bundle(args.bundle, device="cpu")
    items = get_test_items(load_datalist(args.datalist))
    batch = torch.stack([torch.as_tensor(predictor.preprocess(item["image"])) for item in items]).float()
    truth = np.array([int(item["label"]) for item in items])
    with torch.inference_mode():
        eager = predictor.model(batch).numpy()
    fp32 = OnnxModel(args.onnx).logits(batch)
    int8 = OnnxModel(args.onnx.with_suffix(".int8.onnx")).logits(batch)
    correct = {name: (logits.argmax(1) == truth).astype(float) for name, logits in
               (("eager", eager), ("onnx_fp32", fp32), ("onnx_int8", int8))}  # fmt: skip
    rng = np.random.default_rng(0)
    gap = correct["onnx_int8"] - correct["eager"]
    boot = [gap[rng.integers(0, len(gap), len(gap))].mean() for _ in range(2000)]
    print(json.dumps({
        "n_test_images": len(truth),
        **{f"accuracy_{name}": float(ok.mean()) for name, ok in correct.items()},
        "int8_minus_eager": float(gap.mean()),
        "int8_minus_eager_ci95_image_bootstrap": [float(v) for v in np.percentile(boot, [2.5, 97.5])],
        "int8_same_class_as_eager": float((int8.argmax(1) == eager.argmax(1)).mean()),
        "fp32_max_abs_logit_diff": float(np.abs(fp32 - eager).max()),
    }, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
