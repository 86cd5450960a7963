"""Issue 19, item 5 (gateway): SIGTERM stops a busy ``cxr-monai gateway`` promptly, whichever thread the
kernel delivers it to.

The main thread used to wait in ``Event.wait()`` without a timeout. Python runs a signal handler only in
the main thread, once that thread runs again; when the signal landed on another thread (an
association's, the worker's), nothing woke the main thread and the gateway stayed up. Each trial runs
the real command in a subprocess while a client keeps sending films, then sends SIGTERM to one of the
gateway's other threads (``tgkill``, a different one each trial), and, in the last trial, to the process
as ``kill`` does.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from bundle_factory import make_trained_bundle
from pynetdicom import AE

from tests.dicom_factory import gradient, make_dataset
from tests.test_gateway import Receiver

TESTS = Path(__file__).resolve().parent
TRIALS = 3
#: The main thread wakes every 0.5 s; stopping finishes the current step of each thread, then the process
#: exits at once. Slack for 2 shared, busy cores (the old code never exited: each trial waits up to WAIT_S).
EXIT_BOUND_S = 5.0
WAIT_S = 30.0


def _start(bundle: Path, queue: Path, dest_port: int, log: Path) -> tuple[subprocess.Popen[bytes], int]:
    env = dict(
        os.environ, COLUMNS="400", PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])
    )
    with open(log, "wb") as handle:
        process = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "from cxr_monai.cli import app; app()",
                "gateway",
                "--bundle",
                str(bundle),
                "--port",
                "0",
                "--allow",
                "MODALITY",
                "--dest-ae",
                "PACS",
                "--dest-host",
                "127.0.0.1",
                "--dest-port",
                str(dest_port),
                "--queue",
                str(queue),
                "--device",
                "cpu",
                "--batch-size",
                "1",
            ],
            stdout=handle,
            stderr=subprocess.STDOUT,
            env=env,
        )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        found = re.search(r" on 127\.0\.0\.1:(\d+) ", log.read_text(errors="replace"))
        if found:
            return process, int(found.group(1))
        time.sleep(0.2)
    process.kill()
    process.wait(10)
    raise AssertionError(f"gateway did not start: {log.read_text(errors='replace')[-2000:]}")


def _signal(pid: int, trial: int) -> None:
    """SIGTERM to one of ``pid``'s threads other than the main one, or (last trial) to the process."""
    if trial == TRIALS - 1:
        os.kill(pid, signal.SIGTERM)
        return
    threads = sorted(int(t) for t in os.listdir(f"/proc/{pid}/task") if int(t) != pid)
    tid = threads[(trial * 5 + 1) % len(threads)]
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    sys_tgkill = 234 if os.uname().machine == "x86_64" else 131  # x86_64; aarch64
    assert libc.syscall(sys_tgkill, pid, tid, int(signal.SIGTERM)) == 0, ctypes.get_errno()


def _send_films(port: int, stop: threading.Event, answers: list[int]) -> None:
    """Keep one association sending films until ``stop`` (or the gateway goes away)."""
    ae = AE(ae_title="MODALITY")
    ds = make_dataset(gradient(12).astype(np.uint16), bits_stored=12, StudyDate="20200314")
    ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    while not stop.is_set():
        assoc = ae.associate("127.0.0.1", port, ae_title="CXR_MONAI")
        if not assoc.is_established:
            return
        try:
            for _ in range(5):
                status = assoc.send_c_store(ds)
                if not status:
                    return
                answers.append(int(status.Status))
        finally:
            if assoc.is_established:
                assoc.release()


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="tgkill and /proc are Linux")
def test_sigterm_stops_a_busy_gateway_whichever_thread_gets_it(tmp_path: Path) -> None:
    bundle = make_trained_bundle(tmp_path / "bundle")
    receiver = Receiver()
    exits: list[float] = []
    try:
        for trial in range(TRIALS):
            log = tmp_path / f"gateway{trial}.log"
            process, port = _start(bundle, tmp_path / "queue", receiver.port, log)
            stop = threading.Event()
            answers: list[int] = []
            sender = threading.Thread(target=_send_films, args=(port, stop, answers), daemon=True)
            try:
                sender.start()
                deadline = time.monotonic() + 60
                while answers.count(0) < 5 and time.monotonic() < deadline:
                    time.sleep(0.05)
                assert answers.count(0) >= 5, (answers, log.read_text(errors="replace")[-2000:])
                start = time.monotonic()
                _signal(process.pid, trial)
                try:
                    process.wait(timeout=WAIT_S)
                    exits.append(time.monotonic() - start)
                except subprocess.TimeoutExpired:
                    exits.append(float("inf"))
            finally:
                stop.set()
                if process.poll() is None:
                    process.kill()
                process.wait(10)
                sender.join(15)
            assert "Traceback" not in log.read_text(errors="replace")
    finally:
        receiver.stop()
    print("exit times after SIGTERM (s):", [round(e, 2) for e in exits])
    assert max(exits) < EXIT_BOUND_S, [round(e, 2) for e in exits]
