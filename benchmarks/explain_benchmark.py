"""Grad-CAM cost on CPU: latency per image and per batch as a ratio to one forward pass, and memory over
many consecutive calls.

For each backbone (random weights, ``build_network``; no download) at S x S input:
- ``forward``: one inference forward (``torch.inference_mode``), what a plain prediction costs;
- ``gradcam``: one :class:`cxr_monai.explain.gradcam.GradCAM` call (forward with autograd + backward from the
  target logit to the hooked block + bilinear upsampling); it also yields the probabilities.
Forward and Grad-CAM runs alternate so background load hits both alike. Reported: the fastest run of
each (the usual estimate of the uncontended cost on a shared machine), their ratio, and the median of
the ratios of adjacent forward/Grad-CAM pairs (robust to load that changes between pairs).
Memory: resident set size (``/proc/self/statm``) sampled during N consecutive Grad-CAM calls.

Usage::

    python benchmarks/explain_benchmark.py --repeats 5 --memory-calls 1000 --memory-backbone efficientnet_b0
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch

from cxr_monai.explain.gradcam import GradCAM, count_hooks
from cxr_monai.networks import BACKBONES, build_network

RESULTS = Path(__file__).resolve().parent / "results"


def rss_mib() -> float:
    """Resident set size of this process in MiB (Linux)."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def timed(fn: Any) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1000.0


def latency(model: torch.nn.Module, batch: int, size: int, repeats: int) -> dict[str, float]:
    """Median ms of a forward pass and of a Grad-CAM call on a (batch, 3, size, size) input."""
    x = torch.randn(batch, 3, size, size)
    cam = GradCAM(model)

    def forward() -> None:
        with torch.inference_mode():
            model(x)

    def gradcam() -> None:
        cam(x)

    forward()
    gradcam()  # warm-up
    fwd, gc = [], []
    for _ in range(repeats):
        fwd.append(timed(forward))
        gc.append(timed(gradcam))
    assert count_hooks(model) == 0
    f, g = min(fwd), min(gc)
    return {
        "batch": batch,
        "forward_ms": round(f, 1),
        "gradcam_ms": round(g, 1),
        "gradcam_ms_per_image": round(g / batch, 1),
        "ratio": round(g / f, 3),
        "ratio_paired_median": round(statistics.median(b / a for a, b in zip(fwd, gc, strict=True)), 3),
        "forward_ms_median": round(statistics.median(fwd), 1),
        "gradcam_ms_median": round(statistics.median(gc), 1),
    }


def memory(backbone: str, calls: int, batch: int, size: int) -> dict[str, Any]:
    """RSS before, after a warm-up, and every calls/20 Grad-CAM calls; growth after the warm-up."""
    model = build_network(backbone).eval()
    cam = GradCAM(model)
    x = torch.randn(batch, 3, size, size)
    before = rss_mib()
    warmup = 10
    for _ in range(warmup):
        cam(x)
    after_warmup = rss_mib()
    samples = []
    step = max(1, calls // 20)
    start = time.perf_counter()
    for i in range(1, calls + 1):
        cam(x)
        if i % step == 0:
            samples.append([i, round(rss_mib(), 1)])
    elapsed = time.perf_counter() - start
    return {
        "backbone": backbone,
        "calls": calls,
        "batch": batch,
        "spatial_size": size,
        "rss_mib_start": round(before, 1),
        "rss_mib_after_warmup": round(after_warmup, 1),
        "rss_mib_samples": samples,
        "growth_mib_after_warmup": round(samples[-1][1] - after_warmup, 1),
        "growth_mib_second_half": round(samples[-1][1] - samples[len(samples) // 2 - 1][1], 1),
        "hooks_left": count_hooks(model),
        "seconds": round(elapsed, 1),
    }


def note(result: dict[str, Any]) -> str:
    """The markdown note beside the JSON."""
    lines = [
        "# Grad-CAM benchmark (CPU)",
        "",
        f"Machine: {result['machine']['cpu_count']} logical CPUs (shared with other jobs), "
        f"torch {result['machine']['torch']} with {result['machine']['torch_threads']} threads, "
        f"captum {result['machine']['captum']}; random weights, {result['spatial_size']} px, "
        f"fastest of {result['repeats']} alternating runs (ratio = Grad-CAM / forward; paired = median "
        "of the ratios of adjacent runs).",
        "",
        "| backbone | batch | forward ms | Grad-CAM ms | Grad-CAM ms / image | ratio | paired ratio |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for backbone, rows in result["latency"].items():
        for row in rows:
            lines.append(
                f"| {backbone} | {row['batch']} | {row['forward_ms']} | {row['gradcam_ms']} | "
                f"{row['gradcam_ms_per_image']} | {row['ratio']}x | {row['ratio_paired_median']}x |"
            )
    m = result.get("memory")
    if m:
        lines += [
            "",
            f"Memory: {m['calls']} consecutive Grad-CAM calls, {m['backbone']} (the fastest backbone, to "
            f"bound the run on 2 shared cores), batch {m['batch']}: RSS "
            f"{m['rss_mib_after_warmup']} MiB after warm-up, {m['rss_mib_samples'][-1][1]} MiB at the end "
            f"(growth {m['growth_mib_after_warmup']} MiB; {m['growth_mib_second_half']} MiB over the second "
            f"half); hooks left on the model: {m['hooks_left']}.",
        ]
    lines += [
        "",
        "Absolute times on a shared machine move with the other jobs' load (compare rows with care);",
        "the ratios come from adjacent runs of the same model and input. The baseline is an inference",
        "forward (`torch.inference_mode`); a Grad-CAM call also returns the probabilities, so it replaces",
        "the prediction rather than adding to it. Target: ratio <= 1.3.",
        "",
        "Command: `" + result["command"] + "`",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backbones", default=",".join(BACKBONES))
    parser.add_argument("--spatial-size", type=int, default=224)
    parser.add_argument("--batches", default="1,8", help="batch sizes to time")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--memory-calls", type=int, default=1000)
    parser.add_argument("--memory-backbone", default="efficientnet_b0")
    parser.add_argument("--memory-batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--out", type=Path, default=RESULTS / "explain_benchmark.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    result: dict[str, Any] = {
        "machine": {
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "captum": version("captum"),
            "python": platform.python_version(),
            "processor": platform.processor() or platform.machine(),
        },
        "spatial_size": args.spatial_size,
        "repeats": args.repeats,
        "latency": {},
        "command": "python benchmarks/explain_benchmark.py "
        + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "out" and v is not None
        ),
    }
    for backbone in args.backbones.split(","):
        model = build_network(backbone).eval()
        result["latency"][backbone] = [
            latency(model, int(b), args.spatial_size, args.repeats) for b in args.batches.split(",")
        ]
        print(backbone, result["latency"][backbone], flush=True)
    if args.memory_calls > 0:
        result["memory"] = memory(
            args.memory_backbone, args.memory_calls, args.memory_batch, args.spatial_size
        )
        print(result["memory"], flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(note(result))


if __name__ == "__main__":
    main()
