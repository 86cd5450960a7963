"""Issue 19, items 2, 4 and 7: admission that idle streams cannot exhaust, a bounded wait queue, bounded
decompression and decoded memory, and one ``authorization`` header at most."""

from __future__ import annotations

import io
import resource
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from cxr_monai.server.servicer import ServiceLimits
from dicom_factory import make_dataset
from PIL import Image
from test_server_robustness import (  # the same tiny bundle, model gate and service factory
    SMALL,
    Gate,
    code_of,
    gate,  # noqa: F401 (fixture)
    make_service,  # noqa: F401  (fixture)
    png,
    predictor,  # noqa: F401  (fixture)
)

from cxr_monai.api.v1 import cxr_triage_pb2 as pb
from cxr_monai.api.v1 import cxr_triage_pb2_grpc as pb_grpc

# --- item 7: two authorization headers ------------------------------------------------------------------


@pytest.mark.parametrize(
    "values",
    [
        ("Bearer wrong", "Bearer s3cret"),
        ("Bearer s3cret", "Bearer wrong"),
        ("Bearer s3cret", "Bearer s3cret"),
    ],
)
def test_a_call_with_two_authorization_headers_is_refused(make_service: Any, values: tuple[str, str]) -> None:
    service = make_service(token="s3cret")
    with grpc.insecure_channel(f"127.0.0.1:{service.port}") as ch:
        stub = pb_grpc.CXRTriageStub(ch)
        metadata = tuple(("authorization", v) for v in values)
        code, _ = code_of(stub.Classify, pb.ClassifyRequest(image=SMALL), metadata=metadata, timeout=10)
        assert code == grpc.StatusCode.UNAUTHENTICATED
        ok = stub.Classify(
            pb.ClassifyRequest(image=SMALL), metadata=(("authorization", "Bearer s3cret"),), timeout=10
        )
        assert ok.rows == 64


# --- item 2: admission counts work; idle streams; a bounded wait queue ------------------------------------


class HeldStream:
    """A ClassifyStudy stream whose messages the test releases one by one (``send``) or ends (``end``)."""

    def __init__(self, stub: pb_grpc.CXRTriageStub, timeout: float = 30) -> None:
        self._items: list[bytes | None] = []
        self._ready = threading.Condition()
        self.result: Any = None
        self.error: grpc.RpcError | None = None
        self.thread = threading.Thread(target=self._run, args=(stub, timeout), daemon=True)
        self.thread.start()

    def _messages(self) -> Iterator[pb.ClassifyRequest]:
        while True:
            with self._ready:
                self._ready.wait_for(lambda: bool(self._items), timeout=60)
                item = self._items.pop(0) if self._items else None
            if item is None:
                return
            yield pb.ClassifyRequest(image=item)

    def _run(self, stub: pb_grpc.CXRTriageStub, timeout: float) -> None:
        try:
            self.result = stub.ClassifyStudy(self._messages(), timeout=timeout)
        except grpc.RpcError as exc:
            self.error = exc

    def send(self, data: bytes) -> None:
        with self._ready:
            self._items.append(data)
            self._ready.notify_all()

    def end(self) -> None:
        with self._ready:
            self._items.append(None)
            self._ready.notify_all()


def wait_for(predicate: Any, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return bool(predicate())


def test_four_idle_streams_do_not_lock_out_classify_calls(make_service: Any) -> None:
    service = make_service(ServiceLimits(max_inflight=4))
    with grpc.insecure_channel(f"127.0.0.1:{service.port}") as ch:
        stub = pb_grpc.CXRTriageStub(ch)
        streams = [HeldStream(stub) for _ in range(4)]
        streams[0].send(SMALL)  # one stream has sent an image and waits for more
        assert wait_for(lambda: service.servicer.wait_idle(0) == 4)
        time.sleep(0.3)
        start = time.perf_counter()
        for _ in range(3):
            assert stub.Classify(pb.ClassifyRequest(image=SMALL), timeout=10).rows == 64
        assert time.perf_counter() - start < 5.0
        for stream in streams:
            stream.send(SMALL)
            stream.end()
        for stream in streams:
            stream.thread.join(20)
            assert stream.error is None, stream.error
            assert len(stream.result.results) == (2 if stream is streams[0] else 1)


def test_an_idle_stream_is_cancelled_after_the_idle_timeout(make_service: Any) -> None:
    service = make_service(ServiceLimits(stream_idle_timeout_s=1.0))
    with grpc.insecure_channel(f"127.0.0.1:{service.port}") as ch:
        stub = pb_grpc.CXRTriageStub(ch)
        silent, one_then_silent = HeldStream(stub), HeldStream(stub)
        one_then_silent.send(SMALL)
        start = time.perf_counter()
        for stream in (silent, one_then_silent):
            stream.thread.join(10)
            assert stream.error is not None and stream.error.code() == grpc.StatusCode.CANCELLED
        assert time.perf_counter() - start < 4.0
        assert wait_for(lambda: service.servicer.wait_idle(0) == 0)
        lively = HeldStream(stub)
        for _ in range(3):  # messages closer together than the idle timeout keep a stream open
            time.sleep(0.3)
            lively.send(SMALL)
        lively.end()
        lively.thread.join(10)
        assert lively.error is None and len(lively.result.results) == 3


def test_a_burst_beyond_max_inflight_waits_in_the_queue_and_is_served(make_service: Any, gate: Gate) -> None:
    service = make_service(ServiceLimits(max_inflight=2))
    burst = 12
    with grpc.insecure_channel(f"127.0.0.1:{service.port}") as ch:
        stub = pb_grpc.CXRTriageStub(ch)
        gate.close()
        futures = [stub.Classify.future(pb.ClassifyRequest(image=SMALL), timeout=30) for _ in range(burst)]
        assert gate.entered.wait(10)
        assert wait_for(lambda: service.servicer.wait_idle(0) == burst)  # all in: 2 working, 10 waiting
        gate.open.set()
        assert [f.result(timeout=30).rows for f in futures] == [64] * burst


def test_the_queue_is_bounded_in_length_and_in_time(make_service: Any, gate: Gate) -> None:
    service = make_service(ServiceLimits(max_inflight=1, max_queue=2, queue_timeout_s=0.5))
    with grpc.insecure_channel(f"127.0.0.1:{service.port}") as ch:
        stub = pb_grpc.CXRTriageStub(ch)
        gate.close()
        first = stub.Classify.future(pb.ClassifyRequest(image=SMALL), timeout=30)
        assert gate.entered.wait(10)
        start = time.perf_counter()
        waiting = stub.Classify.future(pb.ClassifyRequest(image=SMALL), timeout=30)
        short = stub.Classify.future(pb.ClassifyRequest(image=SMALL), timeout=0.2)
        assert wait_for(lambda: service.servicer.wait_idle(0) == 3 or short.done())
        code, details = code_of(stub.Classify, pb.ClassifyRequest(image=SMALL), timeout=10)
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "queue" in details  # 1 working, 2 waiting
        assert short.exception(timeout=10).code() == grpc.StatusCode.DEADLINE_EXCEEDED
        error = waiting.exception(timeout=10)
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "waited" in error.details()
        assert 0.4 < time.perf_counter() - start < 3.0
        calls = gate.calls
        gate.open.set()
        assert first.result(timeout=10).rows == 64
        assert gate.calls == calls  # the refused calls never reached the model


# --- item 4: decompression on the wire, decoded memory per call and of calls admitted together ------------


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def test_a_gzip_bomb_of_zeros_is_refused_with_bounded_cpu(make_service: Any) -> None:
    service = make_service()
    zeros = b"\0" * (63 * 2**20)  # ~64 kB on the wire, gzip-compressed
    options = [("grpc.max_send_message_length", 2**27)]
    with grpc.insecure_channel(f"127.0.0.1:{service.port}", options=options) as ch:
        stub = pb_grpc.CXRTriageStub(ch)
        before = cpu_seconds()
        request = pb.ClassifyRequest(image=zeros)
        code, _ = code_of(stub.Classify, request, timeout=60, compression=grpc.Compression.Gzip)
        used = cpu_seconds() - before  # client (compressing) and server together
        assert code in (grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.RESOURCE_EXHAUSTED), code
        assert used < 3.0, f"{used:.1f} s of CPU"
        assert stub.Classify(pb.ClassifyRequest(image=SMALL), timeout=10).rows == 64


def test_compressed_requests_are_accepted_when_configured(make_service: Any) -> None:
    service = make_service(accept_compressed=True)
    with grpc.insecure_channel(f"127.0.0.1:{service.port}") as ch:
        stub = pb_grpc.CXRTriageStub(ch)
        reply = stub.Classify(pb.ClassifyRequest(image=SMALL), timeout=10, compression=grpc.Compression.Gzip)
        assert reply.rows == 64


def peak_rss_reset() -> bool:
    """Reset this process's peak RSS (VmHWM); False where the kernel does not allow it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def rss_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise AssertionError(field)


def one_bit_png(side: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("1", (side, side)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_an_image_over_the_memory_budget_is_refused_from_its_header(make_service: Any) -> None:
    service = make_service(ServiceLimits(max_memory_mb=256))
    big = one_bit_png(7071)  # 6 kB; 50 megapixels decoded, inside the pixel budget
    assert len(big) < 10_000
    with grpc.insecure_channel(f"127.0.0.1:{service.port}") as ch:
        stub = pb_grpc.CXRTriageStub(ch)
        measured = peak_rss_reset()
        before = rss_mib("VmRSS")
        start = time.perf_counter()
        for method, request in (
            (stub.Classify, pb.ClassifyRequest(image=big)),
            (stub.Explain, pb.ExplainRequest(image=big, omit_overlay_png=True)),
        ):
            code, details = code_of(method, request, timeout=30)
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "memory" in details, details
        assert time.perf_counter() - start < 3.0
        if measured:
            assert rss_mib("VmHWM") - before < 150  # decoding it took 330 MiB (Explain: 3.4 GiB)
        assert stub.Classify(pb.ClassifyRequest(image=SMALL), timeout=10).rows == 64
        # a DICOM is metered from its header the same way: 2,500^2 pixels fit Classify's 16 bytes each
        # (95 MiB) but not Explain's 72 (429 MiB)
        buffer = io.BytesIO()
        make_dataset(np.zeros((2500, 2500), np.uint16), bits_stored=12).save_as(
            buffer, enforce_file_format=True
        )
        film = buffer.getvalue()
        code, details = code_of(
            stub.Explain, pb.ExplainRequest(image=film, omit_overlay_png=True), timeout=30
        )
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "2500 x 2500 image" in details, details
        assert stub.Classify(pb.ClassifyRequest(image=film), timeout=30).rows == 2500


def test_calls_admitted_together_share_the_memory_budget(make_service: Any, gate: Gate) -> None:
    film = png(np.random.default_rng(1).integers(0, 255, (2000, 2000), dtype=np.uint8))
    service = make_service(ServiceLimits(max_inflight=4, max_memory_mb=100, queue_timeout_s=1.0))
    with grpc.insecure_channel(f"127.0.0.1:{service.port}") as ch:
        stub = pb_grpc.CXRTriageStub(ch)
        gate.close()
        first = stub.Classify.future(pb.ClassifyRequest(image=film), timeout=30)
        assert gate.entered.wait(10)  # holds its film's memory (about 61 MiB) inside the model
        code, details = code_of(stub.Classify, pb.ClassifyRequest(image=film), timeout=10)
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "memory" in details, details
        small = stub.Classify.future(pb.ClassifyRequest(image=SMALL), timeout=30)  # fits beside it
        second = stub.Classify.future(pb.ClassifyRequest(image=film), timeout=30)
        assert wait_for(lambda: service.servicer.admission.snapshot()["free_slots"] == 1)
        time.sleep(0.2)
        gate.open.set()  # the first call ends and frees its memory: the waiting one goes on
        assert first.result(timeout=10).rows == 2000
        assert small.result(timeout=10).rows == 64
        assert second.result(timeout=10).rows == 2000
        assert wait_for(lambda: service.servicer.admission.snapshot()["memory_free"] == 100 * 2**20)
