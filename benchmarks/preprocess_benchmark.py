"""Pre-processing cost on one CPU thread: the inference chain with its former resize (MONAI
``Resize(anti_aliasing=True)``: Gaussian blur + bilinear) against
:class:`cxr_monai.transforms.AntialiasedResize`.

Both chains are :func:`cxr_monai.transforms.inference_transforms` (min-max, resize, 3 channels, ImageNet
normalisation); the old one has the resize step swapped back. Inputs are decoded images (decoding is the
same for both): the real 1024 x 1024 NIH DICOM when ``../shared/data`` is there, else a synthetic film, and
a synthetic 3000 x 3000 film. Reported: the fastest of ``--repeats`` runs per image (ms), the resize step
alone, the speed-up, and the old/new difference of the (1, S, S) resized image in grey levels [0, 255].

Usage::

    python -m benchmarks.preprocess_benchmark --repeats 3
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.transforms import Compose, Resize

from cxr_monai.constants import DEFAULT_SPATIAL_SIZE
from cxr_monai.io import CXRImage, read_cxr
from cxr_monai.transforms import AntialiasedResize, inference_transforms

RESULTS = Path(__file__).resolve().parent / "results"
REAL_1024 = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "dicom"


def old_chain(spatial_size: int) -> Compose:
    """The inference chain with MONAI's Gaussian-antialiased ``Resize`` in place of the new step."""
    steps = [
        Resize((spatial_size, spatial_size), mode="bilinear", anti_aliasing=True)
        if isinstance(t, AntialiasedResize)
        else t
        for t in inference_transforms(spatial_size).transforms
    ]
    return Compose(steps)


def synthetic_film(side: int, seed: int = 0) -> CXRImage:
    """A (side, side) 12-bit-range film: smooth anatomy-like gradients, a sharp block, noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:side, 0:side].astype(np.float32) / side
    pixels = 1500.0 + 1200.0 * y + 600.0 * np.sin(x * 6.0) + rng.normal(0.0, 40.0, (side, side))
    pixels[side // 5 : side // 3, side // 6 : side // 2] = 4000.0
    return CXRImage(pixels.astype(np.float32), "synthetic", "F", extra={"pixel_spacing_mm": None})


def inputs() -> dict[str, CXRImage]:
    real = sorted(REAL_1024.glob("nih_*.dcm"))
    first = read_cxr(real[0]) if real else synthetic_film(1024)
    label = "NIH DX DICOM" if real else "synthetic"
    return {f"1024x1024 ({label})": first, "3000x3000 (synthetic)": synthetic_film(3000)}


def fastest_ms(fn: Callable[[], Any], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000.0)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--spatial-size", type=int, default=DEFAULT_SPATIAL_SIZE)
    parser.add_argument("--out", type=Path, default=RESULTS / "preprocess_benchmark.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    size = args.spatial_size
    new, old = inference_transforms(size), old_chain(size)
    before_resize = Compose(new.transforms[:3])  # load, channel first, min-max: (1, H, W) in [0, 255]
    new_resize, old_resize = (
        AntialiasedResize(size),
        Resize((size, size), mode="bilinear", anti_aliasing=True),
    )
    rows: list[dict[str, Any]] = []
    for name, image in inputs().items():
        pixels = torch.as_tensor(before_resize(image))
        row = {
            "input": name,
            "old_chain_ms": fastest_ms(lambda image=image: old(image), args.repeats),
            "new_chain_ms": fastest_ms(lambda image=image: new(image), args.repeats),
            "old_resize_ms": fastest_ms(lambda p=pixels: old_resize(p), args.repeats),
            "new_resize_ms": fastest_ms(lambda p=pixels: new_resize(p), args.repeats),
        }
        diff = np.abs(np.asarray(new_resize(pixels)) - np.asarray(old_resize(pixels)))[0]
        row["speedup_chain"] = row["old_chain_ms"] / row["new_chain_ms"]
        row["speedup_resize"] = row["old_resize_ms"] / row["new_resize_ms"]
        row["grey_levels_inner_mean_abs_diff"] = float(diff[1:-1, 1:-1].mean())
        row["grey_levels_inner_max_abs_diff"] = float(diff[1:-1, 1:-1].max())
        row["grey_levels_frame_max_abs_diff"] = float(diff.max())
        rows.append(row)
        print(json.dumps(row))
    report = {
        "spatial_size": size,
        "threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "machine": f"{platform.processor() or platform.machine()}, shared 2-core CPU (other jobs running)",
        "torch": torch.__version__,
        "results": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        "# Pre-processing: MONAI Gaussian-antialiased Resize vs AntialiasedResize (1 thread)",
        "",
        f"`python -m benchmarks.preprocess_benchmark --repeats {args.repeats}`; fastest of {args.repeats} "
        f"runs, S = {size}, decoded input (decoding excluded); a shared, loaded 2-core machine.",
        "",
        "| input | old chain ms | new chain ms | speed-up | old resize ms | new resize ms "
        "| inner mean / max diff (of 255) | frame max diff |",
        "|---|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['input']} | {r['old_chain_ms']:.1f} | {r['new_chain_ms']:.1f} | {r['speedup_chain']:.0f}x "
        f"| {r['old_resize_ms']:.1f} | {r['new_resize_ms']:.1f} | {r['grey_levels_inner_mean_abs_diff']:.3f} "
        f"/ {r['grey_levels_inner_max_abs_diff']:.2f} | {r['grey_levels_frame_max_abs_diff']:.1f} |"
        for r in rows
    ]
    lines += [
        "",
        "The frame (outermost row/column) differs most: MONAI's Gaussian pads with zeros and darkened it.",
    ]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
