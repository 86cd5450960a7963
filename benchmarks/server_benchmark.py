"""gRPC service cost on CPU: what the transport adds to the library, and throughput under concurrent clients.

Serves a trained bundle on loopback (in this process, like ``cxr-monai serve``) and, for each input,
times (median and 95th percentile of N calls):
- ``library``: :meth:`Predictor.predict` on the file's bytes (read + pre-process + forward), no gRPC;
- ``Classify`` and ``Explain`` (map, overlay PNG; with a Secondary Capture for DICOM) over gRPC;
then ``Classify`` throughput with several concurrent clients. Inputs: the real DICOM files given and a
synthetic 16-bit 3000 x 3000 DICOM (about 18 MB, beyond gRPC's default 4 MiB limit).

Usage::

    python benchmarks/server_benchmark.py --bundle out/train/final --dicom-dir ../shared/data/dicom
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from importlib.metadata import version
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from cxr_monai.server.app import ServerConfig, build_server
from cxr_monai.server.servicer import CXRTriageServicer, ServiceLimits
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian, generate_uid

from cxr_monai.api.v1 import cxr_triage_pb2 as pb
from cxr_monai.api.v1 import cxr_triage_pb2_grpc as pb_grpc
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
    parser.add_argument("--out", type=Path, default=RESULTS / "server_benchmark.json")
    args = parser.parse_args()

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


if __name__ == "__main__":
    main()
