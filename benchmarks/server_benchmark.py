"""gRPC service cost on CPU: what the transport adds to the library, and throughput under concurrent clients.

Default mode: serves a trained bundle on loopback (in this process) and, for each input, times (median
and 95th percentile of N calls):
- ``library``: :meth:`Predictor.predict` on the file's bytes (read + pre-process + forward), no gRPC;
- ``Classify`` and ``Explain`` (map, overlay PNG; with a Secondary Capture for DICOM) over gRPC;
then ``Classify`` throughput with several concurrent clients. Inputs: the real DICOM files given and a
synthetic 16-bit 3000 x 3000 DICOM (about 18 MB, beyond gRPC's default 4 MiB limit).

``--load`` (issue 19, items 2 and 9) runs ``cxr-monai serve`` as a separate process with its **default
flags** (plus ``--serve-args``) and sends Classify of one real 1024 x 1024 DICOM from 1, 8 and 32 client
threads of this process (each its own channel, ``--calls-per-client`` calls in turn), then 32 clients
while 4 ClassifyStudy streams sit idle (re-opened as soon as the server cancels one). Per level: share of
calls served, throughput of served calls, p50 and p99 latency, status counts, the server's CPU time per
served call. Just before and just after each level, on the same cores, the best in-process pipeline runs
on as many copies of the film (at least 64) in three variants: read + pre-process in ``--decode-threads``
threads feeding ONNX Runtime in batches of ``--reference-batch``, with ORT on all cores (idle threads not
spinning) or on one thread; and read, pre-process and ORT all in one thread, batches of 32 (the earlier
reference). The fastest at that moment is taken (on a shared machine all-core ORT can collapse when other
jobs take a core), and the mean of before and after is the reference. On a shared machine read the ratio
served/reference and the CPU time per image, not the absolute rates.
``--server-pythonpath DIR`` serves another checkout (e.g. ``git archive`` of an older commit, with
``cxr_monai/server`` linked to its ``server/``) for before/after figures.

Usage::

    python benchmarks/server_benchmark.py --bundle out/train/final --dicom-dir ../shared/data/dicom
    python benchmarks/server_benchmark.py --load --bundle out/train/final --dicom-dir ../shared/data/dicom
    python benchmarks/server_benchmark.py --load ... --serve-args "--backend onnx" --label onnx
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import re
import resource
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from importlib.metadata import version
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import torch
from _results import command_line
from cxr_monai.server.app import ServerConfig, build_server
from cxr_monai.server.servicer import CXRTriageServicer, ServiceLimits
from grpc_health.v1 import health_pb2, health_pb2_grpc
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
    parser.add_argument("--calls-per-client", type=int, default=4)
    parser.add_argument("--serve-args", default="", help="--load: flags for `cxr-monai serve` (default none)")
    parser.add_argument("--label", default="", help="--load: suffix of the results file name")
    parser.add_argument(
        "--server-pythonpath", default=None, help="--load: put this first on the server's PYTHONPATH"
    )
    parser.add_argument("--decode-threads", type=int, default=2, help="--load: the reference's readers")
    parser.add_argument("--reference-batch", type=int, default=8, help="--load: the reference's batch")
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
    if not latencies_ms:
        return {"p50_ms": float("nan"), "p99_ms": float("nan")}
    ordered = sorted(latencies_ms)
    return {
        "p50_ms": round(float(np.percentile(ordered, 50)), 1),
        "p99_ms": round(float(np.percentile(ordered, 99)), 1),
    }


# --- --load: the service as a separate process, default flags, against the best in-process pipeline -----


class ServeProcess:
    """``cxr-monai serve`` in a subprocess on a free loopback port; ``stop()`` sends SIGTERM."""

    def __init__(self, bundle: Path, extra: list[str], pythonpath: str | None) -> None:
        env = dict(os.environ, COLUMNS="400")
        if pythonpath:
            env["PYTHONPATH"] = os.pathsep.join([pythonpath, env.get("PYTHONPATH", "")])
        command = [sys.executable, "-c", "from cxr_monai.cli import app; app()", "serve"]
        command += ["--bundle", str(bundle), "--address", "127.0.0.1:0", "--device", "cpu", *extra]
        # `python -c` puts the working directory first on sys.path: run from the one whose code is served
        cwd = pythonpath or Path(__file__).resolve().parents[1]
        self.process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=cwd
        )
        assert self.process.stdout is not None
        self.banner = ""
        for line in self.process.stdout:
            found = re.search(r" on 127\.0\.0\.1:(\d+) ", line)
            if found:
                self.port, self.banner = int(found.group(1)), line.strip()
                break
        else:
            raise SystemExit(f"serve did not start (exit {self.process.wait()})")
        # keep reading its log so that a full pipe never blocks it
        self._log: list[str] = []
        threading.Thread(target=lambda: self._log.extend(self.process.stdout or ()), daemon=True).start()
        with grpc.insecure_channel(f"127.0.0.1:{self.port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline:
                try:
                    status = health.Check(health_pb2.HealthCheckRequest(), timeout=5).status
                    if status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.2)
        raise SystemExit("serve never reported SERVING")

    def cpu_seconds(self) -> float:
        """The server process's user + system CPU time so far."""
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()


def client_level(port: int, data: bytes, clients: int, calls: int) -> dict[str, Any]:
    """``clients`` threads, each with its own channel, making ``calls`` Classify calls in turn."""
    outcomes: Counter[str] = Counter()
    served: list[float] = []
    lock = threading.Lock()
    options = [("grpc.max_send_message_length", MESSAGE_LIMIT)]

    def client(_: int) -> None:
        with grpc.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:
            stub = pb_grpc.CXRTriageStub(channel)
            for _ in range(calls):
                start = time.perf_counter()
                try:
                    stub.Classify(pb.ClassifyRequest(image=data), timeout=120)
                    code = "OK"
                except grpc.RpcError as exc:
                    code = exc.code().name
                elapsed = (time.perf_counter() - start) * 1000.0
                with lock:
                    outcomes[code] += 1
                    if code == "OK":
                        served.append(elapsed)

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=clients) as pool:
        list(pool.map(client, range(clients)))
    elapsed = time.perf_counter() - start
    total = sum(outcomes.values())
    return {
        "clients": clients,
        "calls": total,
        "served": outcomes["OK"],
        "served_share": round(outcomes["OK"] / total, 3),
        "served_per_second": round(outcomes["OK"] / elapsed, 2),
        "outcomes": dict(outcomes),
        "seconds": round(elapsed, 1),
    } | percentiles(served)


class IdleStreams:
    """``count`` ClassifyStudy streams that never send a message; each is re-opened as soon as the server
    ends it (an idle client that keeps coming back)."""

    def __init__(self, port: int, count: int) -> None:
        self._stop = threading.Event()
        self.ended: Counter[str] = Counter()
        self._channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        self._stub = pb_grpc.CXRTriageStub(self._channel)
        self._threads = [threading.Thread(target=self._hold, daemon=True) for _ in range(count)]
        for thread in self._threads:
            thread.start()

    def _silence(self) -> Iterator[pb.ClassifyRequest]:
        self._stop.wait()
        return
        yield  # a generator that sends nothing until stopped

    def _hold(self) -> None:
        while not self._stop.is_set():
            future = self._stub.ClassifyStudy.future(self._silence(), timeout=600)
            while not self._stop.is_set() and not future.done():
                time.sleep(0.05)
            if not future.done():
                future.cancel()
                return
            error = future.exception()
            self.ended["OK" if error is None else error.code().name] += 1

    def close(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(10)
        self._channel.close()


def _cpu() -> float:
    """This process's user + system CPU time, seconds."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def reference_parallel(
    predictor: Predictor, model: OnnxModel, data: bytes, images: int, batch: int, threads: int
) -> tuple[float, float]:
    """(images per second, CPU seconds per image) of an in-process pipeline: read + pre-process in
    ``threads`` threads (in order, running ahead of the model) feeding ``model`` in batches of ``batch``."""

    def prepare(_: int) -> torch.Tensor:
        return torch.as_tensor(predictor.preprocess(data))

    start, cpu = time.perf_counter(), _cpu()
    with ThreadPoolExecutor(max_workers=threads) as pool:
        pending: list[torch.Tensor] = []
        for tensor in pool.map(prepare, range(images)):
            pending.append(tensor)
            if len(pending) == batch:
                model.logits(torch.stack(pending))
                pending = []
        if pending:
            model.logits(torch.stack(pending))
    return images / (time.perf_counter() - start), (_cpu() - cpu) / images


def reference_single(predictor: Predictor, model: OnnxModel, data: bytes, images: int) -> float:
    """Images per second of read + pre-process + ORT (one thread) in batches of 32 in one thread."""
    start = time.perf_counter()
    for first in range(0, images, 32):
        count = min(32, images - first)
        model.logits(torch.stack([torch.as_tensor(predictor.preprocess(data)) for _ in range(count)]))
    return images / (time.perf_counter() - start)


def best_reference(
    predictor: Predictor, models: dict[str, OnnxModel], data: bytes, images: int, args: argparse.Namespace
) -> dict[str, Any]:
    """The fastest in-process pipeline right now: ``--decode-threads`` readers feeding ORT on all cores
    (idle threads not spinning) or on one thread, in batches of ``--reference-batch``; or read,
    pre-process and ORT in one thread, batches of 32 (on a loaded machine fewer threads can win)."""
    runs = {
        f"{args.decode_threads}_readers_{name}": reference_parallel(
            predictor, model, data, images, args.reference_batch, args.decode_threads
        )
        for name, model in models.items()
    }
    cpu = _cpu()
    single = reference_single(predictor, models["ort_one_thread"], data, images)
    runs["one_thread"] = (single, (_cpu() - cpu) / images)
    name = max(runs, key=lambda n: runs[n][0])
    return {"variant": name, "images_per_second": runs[name][0], "cpu_s_per_image": runs[name][1]} | {
        f"{n}_images_per_second": round(r[0], 2) for n, r in runs.items()
    }


def load_benchmark(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)  # the pre-processing threads of the reference: one intra-op thread each
    out = args.out or RESULTS / f"server_benchmark_load{'_' + args.label if args.label else ''}.json"
    predictor = Predictor.from_bundle(args.bundle, device="cpu")
    films = sorted((args.dicom_dir or Path("/nonexistent")).glob("nih_*.dcm"))
    film = films[0].read_bytes() if films else large_dicom(1024)
    with tempfile.TemporaryDirectory(prefix="cxr-bench-") as folder:
        onnx_path = Path(folder) / "model.onnx"
        export_bundle(args.bundle, "onnx", onnx_path, int8=False)
        models = {
            "ort_all_cores": OnnxModel(onnx_path, threads=0, spinning=False),
            "ort_one_thread": OnnxModel(onnx_path, threads=1),
        }
    extra = shlex.split(args.serve_args)
    server = ServeProcess(args.bundle, extra, args.server_pythonpath)
    rows: list[dict[str, Any]] = []
    try:
        client_level(server.port, film, 1, 2)  # warm the path
        scenarios: list[tuple[str, int, int]] = [("plain", c, args.calls_per_client) for c in (1, 8, 32)]
        scenarios.append(("4 idle streams", 32, args.calls_per_client))
        for scenario, clients, calls in scenarios:
            before = best_reference(predictor, models, film, max(64, clients * calls), args)
            idle = IdleStreams(server.port, 4) if scenario != "plain" else None
            if idle is not None:
                time.sleep(1.0)  # the streams are open before the clients start
            cpu = server.cpu_seconds()
            row = {"scenario": scenario} | client_level(server.port, film, clients, calls)
            row["server_cpu_s"] = round(server.cpu_seconds() - cpu, 1)
            if idle is not None:
                row["idle_streams_ended_by_the_server"] = dict(idle.ended)  # before they are closed here
                idle.close()
            images = max(64, row["calls"])
            row["reference_before"] = before
            row["reference_after"] = after = best_reference(predictor, models, film, images, args)
            best = (before["images_per_second"] + after["images_per_second"]) / 2
            row["reference_images_per_second"] = round(best, 2)
            row["served_over_reference"] = round(row["served_per_second"] / best, 3)
            single = (before["one_thread_images_per_second"] + after["one_thread_images_per_second"]) / 2
            row["single_thread_reference_images_per_second"] = round(single, 2)
            row["served_over_single_thread_reference"] = round(row["served_per_second"] / single, 3)
            row["server_cpu_s_per_served_call"] = round(row["server_cpu_s"] / max(1, row["served"]), 3)
            row["reference_cpu_s_per_image"] = round(
                (before["cpu_s_per_image"] + after["cpu_s_per_image"]) / 2, 3
            )
            row["load_average_1min"] = round(os.getloadavg()[0], 2)
            rows.append(row)
            print(json.dumps(row), flush=True)
    finally:
        server.stop()
    result = {
        "what": "Classify of a real 1024 x 1024 DICOM from 1/8/32 clients and 32 clients beside 4 idle "
        "ClassifyStudy streams; `cxr-monai serve` in its own process with the flags below; against the "
        "best in-process pipeline measured back to back after each level",
        "command": command_line(),
        "label": args.label,
        "serve_flags": extra or "defaults",
        "serve_banner": server.banner,
        "bundle": {
            "name": predictor.model_name,
            "backbone": predictor.backbone,
            "spatial_size": predictor.spatial_size,
        },
        "image": films[0].name[:24] if films else "synthetic 1024 DICOM",
        "calls_per_client": args.calls_per_client,
        "reference": {
            "decode_threads": args.decode_threads,
            "variants": "readers + ORT on all cores (no spinning) or on 1 thread, or all in one thread "
            "(batches of 32): the fastest, measured before and after each level",
            "batch": args.reference_batch,
        },
        "cpu_count": os.cpu_count(),
        "levels": rows,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
