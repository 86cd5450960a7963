"""gRPC service cost on CPU: what the transport adds to the library, and throughput under concurrent clients.

Serves a trained bundle on loopback (in this process, like ``cxr-monai serve``) and, for each input,
times (median and 95th percentile of N calls):
- ``library``: :meth:`Predictor.predict` on the file's bytes (read + pre-process + forward), no gRPC;
- ``Classify`` and ``Explain`` (map, overlay PNG; with a Secondary Capture for DICOM) over gRPC;
then ``Classify`` throughput with several concurrent clients. Inputs: the real DICOM files given and a
synthetic 16-bit 3000 x 3000 DICOM (about 18 MB, beyond gRPC's default 4 MiB limit).

``--load`` instead measures the service under concurrent clients (issue 8, item 6): Classify of one real
1024 x 1024 DICOM at 1, 8 and 32 clients (``--calls-per-client`` each) against the micro-batched ONNX
Runtime backend - throughput, p50, p99 - as a ratio to in-process batched ONNX Runtime (read,
pre-process, one ``OnnxModel.logits`` per ``--max-batch`` images) on the same image in the same run; then
the latency of a small Classify alone and while 9999 x 9999 PNGs (refused from the header) and 3000 x 3000
DICOMs (admitted) are sent beside it. One thread for torch and ONNX Runtime.

Usage::

    python benchmarks/server_benchmark.py --bundle out/train/final --dicom-dir ../shared/data/dicom
    python -m benchmarks.server_benchmark --load --bundle B --dicom-dir ../shared/data/dicom \\
        --calls-per-client 20
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from importlib.metadata import version
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import torch
from cxr_monai.server.app import ServerConfig, Service, build_server
from cxr_monai.server.batching import BatchingConfig
from cxr_monai.server.servicer import CXRTriageServicer, ServiceLimits
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian, generate_uid

from cxr_monai.api.v1 import cxr_triage_pb2 as pb
from cxr_monai.api.v1 import cxr_triage_pb2_grpc as pb_grpc
from cxr_monai.export import OnnxModel, export_bundle
from cxr_monai.predictor import Predictor

RESULTS = Path(__file__).resolve().parent / "results"
MESSAGE_LIMIT = 64 * 1024 * 1024


def large_dicom(side: int = 3000) -> bytes:
    """A synthetic 16-bit (12 stored) DX film of ``side`` x ``side`` pixels as Part 10 bytes."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:side, 0:side]
    film = 2000 + 1500 * np.exp(-(((yy - side / 2) / (side / 3)) ** 2 + ((xx - side / 2) / (side / 4)) ** 2))
    pixels = (film + rng.normal(0, 30, film.shape)).clip(0, 4095).astype(np.uint16)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = DigitalXRayImageStorageForPresentation
    ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID = (
        generate_uid(),
        generate_uid(),
        generate_uid(),
    )
    ds.Modality, ds.BodyPartExamined, ds.ViewPosition = "DX", "CHEST", "PA"
    ds.PatientName, ds.PatientID = "Benchmark^Synthetic", "BENCH-0001"
    ds.set_pixel_data(pixels, "MONOCHROME2", 12)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def timed(call: Any, repeats: int) -> dict[str, float]:
    """Median and 95th percentile wall time of ``call()`` in ms, after one warm-up call."""
    call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append((time.perf_counter() - start) * 1000.0)
    times.sort()
    return {
        "median_ms": round(statistics.median(times), 1),
        "p95_ms": round(times[min(len(times) - 1, int(0.95 * len(times)))], 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--bundle", type=Path, required=True, help="trained bundle directory")
    parser.add_argument("--dicom-dir", type=Path, help="real DICOM files to send")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--throughput-calls", type=int, default=40)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--load", action="store_true", help="the concurrent-clients benchmark (see above)")
    parser.add_argument("--calls-per-client", type=int, default=20)
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--max-batch-wait-ms", type=float, default=5.0)
    args = parser.parse_args()
    if args.load:
        load_benchmark(args)
        return
    args.out = args.out or RESULTS / "server_benchmark.json"

    predictor = Predictor.from_bundle(args.bundle, device="cpu")
    limits = ServiceLimits(max_inflight=max(8, args.clients))  # admit every client: measure, do not shed
    service = build_server(CXRTriageServicer(predictor, limits), ServerConfig(address="127.0.0.1:0"))
    service.start()
    service.warm_up()
    server, port = service.server, service.port
    inputs = {
        p.name[:24]: p.read_bytes() for p in sorted((args.dicom_dir or Path("/nonexistent")).glob("*.dcm"))
    }
    inputs["synthetic_16bit_3000px.dcm"] = large_dicom()
    options = [
        ("grpc.max_send_message_length", MESSAGE_LIMIT),
        ("grpc.max_receive_message_length", MESSAGE_LIMIT),
    ]
    rows: list[dict[str, Any]] = []
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:
            stub = pb_grpc.CXRTriageStub(channel)
            for name, data in inputs.items():
                row: dict[str, Any] = {"input": name, "bytes": len(data)}
                row["library_predict"] = timed(lambda data=data: predictor.predict([data]), args.repeats)
                row["grpc_classify"] = timed(
                    lambda data=data: stub.Classify(pb.ClassifyRequest(image=data), timeout=300), args.repeats
                )
                row["grpc_explain_with_sc"] = timed(
                    lambda data=data: stub.Explain(
                        pb.ExplainRequest(image=data, secondary_capture=True), timeout=300
                    ),
                    args.repeats,
                )
                row["classify_over_library"] = round(
                    row["grpc_classify"]["median_ms"] / row["library_predict"]["median_ms"], 3
                )
                rows.append(row)
                print(json.dumps(row))
            small = next(iter(inputs.values()))
            start = time.perf_counter()
            with ThreadPoolExecutor(max_workers=args.clients) as pool:
                list(
                    pool.map(
                        lambda _: stub.Classify(pb.ClassifyRequest(image=small), timeout=300),
                        range(args.throughput_calls),
                    )
                )
            elapsed = time.perf_counter() - start
    finally:
        server.stop(None)
    result = {
        "what": "gRPC service on loopback vs the library; trained bundle on CPU",
        "command": "python benchmarks/server_benchmark.py --bundle out/train/final "
        "--dicom-dir ../shared/data/dicom",
        "bundle": {
            "name": predictor.model_name,
            "backbone": predictor.backbone,
            "spatial_size": predictor.spatial_size,
        },
        "machine": {
            "cpu_count": os.cpu_count(),
            "torch_threads": __import__("torch").get_num_threads(),
            "python": platform.python_version(),
            "grpcio": version("grpcio"),
            "torch": version("torch"),
        },
        "repeats": args.repeats,
        "latency": rows,
        "throughput": {
            "clients": args.clients,
            "calls": args.throughput_calls,
            "input": next(iter(inputs)),
            "requests_per_second": round(args.throughput_calls / elapsed, 2),
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


def percentiles(latencies_ms: list[float]) -> dict[str, float]:
    ordered = sorted(latencies_ms)
    return {
        "p50_ms": round(float(np.percentile(ordered, 50)), 1),
        "p99_ms": round(float(np.percentile(ordered, 99)), 1),
    }


def client_level(stub: pb_grpc.CXRTriageStub, data: bytes, clients: int, calls: int) -> dict[str, Any]:
    """``clients`` threads, each making ``calls`` Classify calls in turn: throughput and latency."""

    def client(_: int) -> list[float]:
        times = []
        for _ in range(calls):
            start = time.perf_counter()
            stub.Classify(pb.ClassifyRequest(image=data), timeout=300)
            times.append((time.perf_counter() - start) * 1000.0)
        return times

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=clients) as pool:
        latencies = [t for times in pool.map(client, range(clients)) for t in times]
    elapsed = time.perf_counter() - start
    return {"clients": clients, "calls": len(latencies), "requests_per_second": len(latencies) / elapsed} | (
        percentiles(latencies)
    )


def in_process_onnx(predictor: Predictor, model: OnnxModel, data: bytes, images: int, batch: int) -> float:
    """Images per second of read + pre-process + batched ONNX Runtime in this process, no gRPC."""
    start = time.perf_counter()
    for first in range(0, images, batch):
        count = min(batch, images - first)
        tensors = torch.stack([torch.as_tensor(predictor.preprocess(data)) for _ in range(count)])
        model.logits(tensors)
    return images / (time.perf_counter() - start)


def small_call_latency(
    stub: pb_grpc.CXRTriageStub, small: bytes, beside: bytes | None, calls: int
) -> dict[str, Any]:
    """Latency of ``calls`` small Classify calls, alone or while another client keeps sending ``beside``."""
    stop = threading.Event()
    outcomes: list[str] = []

    def noisy() -> None:
        while not stop.is_set():
            try:
                stub.Classify(pb.ClassifyRequest(image=beside), timeout=300)
                outcomes.append("OK")
            except grpc.RpcError as exc:
                outcomes.append(exc.code().name)

    thread = threading.Thread(target=noisy, daemon=True) if beside is not None else None
    if thread is not None:
        thread.start()
        time.sleep(0.2)
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        stub.Classify(pb.ClassifyRequest(image=small), timeout=300)
        times.append((time.perf_counter() - start) * 1000.0)
    stop.set()
    if thread is not None:
        thread.join(300)
    return percentiles(times) | {"beside_calls": len(outcomes), "beside_outcomes": sorted(set(outcomes))}


def png_9999() -> bytes:
    """An all-black 1-bit 9999 x 9999 PNG: a few kB that decode to 100 megapixels."""
    buffer = io.BytesIO()
    Image.new("1", (9999, 9999)).save(buffer, format="PNG")
    return buffer.getvalue()


def load_benchmark(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    out = args.out or RESULTS / "server_benchmark_load.json"
    predictor = Predictor.from_bundle(args.bundle, device="cpu")
    films = sorted((args.dicom_dir or Path("/nonexistent")).glob("nih_*.dcm"))
    film = films[0].read_bytes() if films else large_dicom(1024)
    onnx_path = out.with_name("server_benchmark_model.onnx")
    export_bundle(args.bundle, "onnx", onnx_path, int8=False)
    model = OnnxModel(onnx_path, threads=1)
    onnx_path.unlink()
    onnx_path.with_suffix(".json").unlink()
    levels = (1, 8, 32)
    limits = ServiceLimits(max_inflight=max(levels) + 2, request_timeout_s=None)
    batching = BatchingConfig(max_batch=args.max_batch, max_wait_ms=args.max_batch_wait_ms)
    servicer = CXRTriageServicer(predictor, limits, batching=batching, onnx_model=model)
    service: Service = build_server(servicer, ServerConfig(address="127.0.0.1:0"))
    service.start()
    service.warm_up()
    options = [("grpc.max_send_message_length", MESSAGE_LIMIT)]
    rows = []
    try:
        with grpc.insecure_channel(f"127.0.0.1:{service.port}", options=options) as channel:
            stub = pb_grpc.CXRTriageStub(channel)
            stub.Classify(pb.ClassifyRequest(image=film), timeout=300)
            for clients in levels:
                row = client_level(stub, film, clients, args.calls_per_client)
                reference = in_process_onnx(predictor, model, film, row["calls"], args.max_batch)
                row["in_process_onnx_images_per_second"] = reference
                row["ratio_to_in_process"] = row["requests_per_second"] / reference
                rows.append(row)
                print(json.dumps(row))
            smallest = sorted(films[0].parent.glob("*.dcm"), key=lambda f: f.stat().st_size) if films else []
            small = smallest[0].read_bytes() if smallest else film
            isolation = {
                "alone": small_call_latency(stub, small, None, args.calls_per_client),
                "beside_9999_png": small_call_latency(stub, small, png_9999(), args.calls_per_client),
                "beside_3000_dicom": small_call_latency(stub, small, large_dicom(), args.calls_per_client),
            }
            print(json.dumps(isolation))
    finally:
        service.stop(grace_s=0.0)
    result = {
        "what": "Classify under 1/8/32 clients, ONNX Runtime backend with micro-batching, vs in-process "
        "batched ONNX Runtime on the same image in the same run",
        "bundle": {
            "name": predictor.model_name,
            "backbone": predictor.backbone,
            "spatial_size": predictor.spatial_size,
        },
        "image": films[0].name[:24] if films else "synthetic 1024 DICOM",
        "batching": {"max_batch": args.max_batch, "max_wait_ms": args.max_batch_wait_ms},
        "threads": {"torch": torch.get_num_threads(), "onnxruntime": 1},
        "batch_sizes_run": dict(sorted(servicer.batcher.batch_sizes.items())),
        "cpu_count": os.cpu_count(),
        "load_average_at_end": os.getloadavg(),
        "levels": rows,
        "small_call_isolation": isolation,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
