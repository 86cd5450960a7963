"""Issue 19, item 5: SIGTERM stops a busy ``cxr-monai serve`` within its grace period plus about 2 s.

The main thread used to wait in ``Event.wait()`` with no timeout: when the kernel delivered the signal
to another thread (a gRPC or worker thread), the Python handler waited for the main thread to wake,
which it never did, and the server stayed SERVING. Each trial runs the real command in a subprocess with
clients sending calls, sends SIGTERM and times the exit. Linux gives a process-directed signal to the
main thread when it can take it, so which thread gets it is left to chance; the trials make the
reported case certain by sending it to one of the server's other threads (``tgkill``), a different one
each time, and the last trial sends it to the process as ``kill`` does.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import io
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from bundle_factory import make_trained_bundle
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from cxr_monai.api.v1 import cxr_triage_pb2 as pb
from cxr_monai.api.v1 import cxr_triage_pb2_grpc as pb_grpc

TESTS = Path(__file__).resolve().parent
GRACE_S = 1.0
#: The documented bound (grace + about 2 s) and slack for 2 shared, busy cores.
EXIT_BOUND_S = GRACE_S + 2.0 + 2.0
TRIALS = 5
CLIENTS = 6


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (256, 256), dtype=np.uint8)).save(
        buffer, format="PNG"
    )
    return buffer.getvalue()


def _start(bundle: Path) -> tuple[subprocess.Popen[str], int]:
    env = dict(
        os.environ, COLUMNS="400", PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])
    )
    process = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "from cxr_monai.cli import app; app()",
            "serve",
            "--bundle",
            str(bundle),
            "--address",
            "127.0.0.1:0",
            "--grace",
            str(GRACE_S),
            "--device",
            "cpu",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    assert process.stdout is not None
    deadline = time.monotonic() + 120
    for line in process.stdout:
        found = re.search(r" on 127\.0\.0\.1:(\d+) ", line)
        if found:
            return process, int(found.group(1))
        if time.monotonic() > deadline:
            break
    process.kill()
    raise AssertionError(f"serve did not start: {process.communicate()[0][-2000:]}")


def _signal_thread(pid: int, trial: int) -> None:
    """SIGTERM to one of ``pid``'s threads other than the main one (``trial`` picks which), or, for the
    last trial, to the process."""
    if trial == TRIALS - 1:
        os.kill(pid, signal.SIGTERM)
        return
    threads = sorted(int(t) for t in os.listdir(f"/proc/{pid}/task") if int(t) != pid)
    tid = threads[(trial * 7) % len(threads)]
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    sys_tgkill = 234 if os.uname().machine == "x86_64" else 131  # x86_64; aarch64
    assert libc.syscall(sys_tgkill, pid, tid, int(signal.SIGTERM)) == 0, ctypes.get_errno()


def _wait_serving(port: int) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.1)
    raise AssertionError("serve never reported SERVING")


def _client(port: int, image: bytes, stop: threading.Event, answered: list[str]) -> None:
    """Classify ``image`` until ``stop``; each call's status name in ``answered``."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.CXRTriageStub(channel)
        while not stop.is_set():
            try:
                stub.Classify(pb.ClassifyRequest(image=image), timeout=10)
                answered.append("OK")
            except grpc.RpcError as exc:
                answered.append(exc.code().name)
                time.sleep(0.01)


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="tgkill and /proc are Linux")
def test_sigterm_stops_a_busy_server_within_grace_plus_2_s(tmp_path: Path) -> None:
    bundle = make_trained_bundle(tmp_path / "bundle")
    image = _png()
    exits: list[float] = []
    for trial in range(TRIALS):
        process, port = _start(bundle)
        try:
            _wait_serving(port)
            stop = threading.Event()
            answered: list[str] = []

            threads = [
                threading.Thread(target=_client, args=(port, image, stop, answered), daemon=True)
                for _ in range(CLIENTS)
            ]
            for thread in threads:
                thread.start()
            deadline = time.monotonic() + 30
            while answered.count("OK") < 10 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert answered.count("OK") >= 10, answered[-10:]
            start = time.monotonic()
            _signal_thread(process.pid, trial)
            try:
                process.wait(timeout=EXIT_BOUND_S + 10)
                exits.append(time.monotonic() - start)
            except subprocess.TimeoutExpired:
                exits.append(float("inf"))
            stop.set()
            for thread in threads:
                thread.join(15)
        finally:
            if process.poll() is None:
                process.kill()
            process.wait(10)
            if process.stdout is not None:
                process.stdout.close()
    assert max(exits) < EXIT_BOUND_S, [round(e, 2) for e in exits]
