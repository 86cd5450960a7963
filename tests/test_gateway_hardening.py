"""Issue 19, item 6: the gateway cannot be locked out by idle peers, checks who may send, refuses at
C-STORE time what cannot give a result, makes what fails later visible, and keeps its queue private and
on disk before it answers success. All on loopback, ports bound as 0."""

from __future__ import annotations

import json
import os
import socket
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pynetdicom import AE
from pynetdicom.association import Association
from typer.testing import CliRunner

import cxr_monai.gateway.queue as queue_module
from cxr_monai.cli import app
from cxr_monai.errors import CXRMonaiError
from cxr_monai.gateway.queue import DiskQueue
from cxr_monai.gateway.scp import DOES_NOT_MATCH_SOP_CLASS, SUCCESS
from cxr_monai.gateway.service import Destination, GatewayConfig
from cxr_monai.predictor import Predictor
from tests.bundle_factory import make_trained_bundle
from tests.dicom_factory import PATIENT_ID, PATIENT_NAME, gradient, jpeg_baseline, make_dataset
from tests.test_gateway import SR_CLASS, Receiver, c_store, start_gateway, wait_for

CR_CLASS = "1.2.840.10008.5.1.4.1.1.1"
EXPLICIT_LE = "1.2.840.10008.1.2.1"


@pytest.fixture(scope="module")
def predictor(tmp_path_factory, one_torch_thread) -> Predictor:
    return Predictor.from_bundle(make_trained_bundle(tmp_path_factory.mktemp("bundle")), device="cpu")


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    peer = Receiver()
    yield peer
    peer.stop()


def film(**tags: object) -> Dataset:
    return make_dataset(gradient(12).astype(np.uint16), bits_stored=12, StudyDate="20200314", **tags)


def idle_association(port: int, called: str = "CXR_MONAI", calling: str = "MODALITY") -> Association:
    """An association that is established and then sends nothing."""
    ae = AE(ae_title=calling)
    ae.add_requested_context(CR_CLASS, EXPLICIT_LE)
    ae.network_timeout = ae.acse_timeout = 60
    return ae.associate("127.0.0.1", port, ae_title=called)


@pytest.fixture
def idle_peers() -> Iterator[list[Association | socket.socket]]:
    peers: list[Association | socket.socket] = []
    yield peers
    for peer in peers:
        if isinstance(peer, socket.socket):
            peer.close()
        elif peer.is_established:
            peer.abort()


def status_of(queue: Path) -> dict:
    return json.loads((queue / "status.json").read_text())


# --- who may send, and for how long a silent peer holds a slot ----------------------------------------


def test_ten_idle_associations_do_not_lock_out_a_sender(predictor, receiver, tmp_path, idle_peers):
    """pynetdicom's default (10 associations, 30 s idle timeout) answered "Local Limit Exceeded"."""
    gateway = start_gateway(predictor, tmp_path / "queue", receiver.port, allowed_calling=("MODALITY",))
    try:
        for _ in range(10):
            assoc = idle_association(gateway.port)
            assert assoc.is_established
            idle_peers.append(assoc)
        for _ in range(3):  # bare connections that never ask to associate hold a slot too
            idle_peers.append(socket.create_connection(("127.0.0.1", gateway.port), timeout=5))
        started = time.monotonic()
        answer = c_store(gateway.port, film())
        assert answer is not None, "refused while 13 idle peers were connected"
        assert answer.Status == SUCCESS
        assert time.monotonic() - started < 5.0
        assert wait_for(lambda: len(receiver.of_class(SR_CLASS)) == 1)
    finally:
        gateway.stop()


def test_peers_that_send_nothing_are_closed_after_the_first_message_timeout(
    predictor, receiver, tmp_path, idle_peers
):
    gateway = start_gateway(
        predictor,
        tmp_path / "queue",
        receiver.port,
        allowed_calling=("MODALITY",),
        first_message_timeout_s=1.0,
    )
    try:
        associations = [idle_association(gateway.port) for _ in range(4)]
        idle_peers.extend(associations)
        bare = socket.create_connection(("127.0.0.1", gateway.port), timeout=10)
        idle_peers.append(bare)
        assert all(a.is_established for a in associations)
        started = time.monotonic()
        assert wait_for(lambda: not any(a.is_established for a in associations), timeout=10)
        assert bare.recv(1) == b""  # closed by the gateway, not by the 10 s socket timeout
        assert time.monotonic() - started < 6.0
        # an association that sends goes on past that timeout (its first P-DATA restores 30 s)
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(CR_CLASS, EXPLICIT_LE)
        ae.add_requested_context("1.2.840.10008.1.1")
        assoc = ae.associate("127.0.0.1", gateway.port, ae_title="CXR_MONAI")
        try:
            assert assoc.send_c_echo().Status == SUCCESS
            time.sleep(2.0)
            assert assoc.is_established
            assert assoc.send_c_store(film()).Status == SUCCESS
        finally:
            assoc.release()
    finally:
        gateway.stop()


def test_an_association_addressed_to_another_ae_title_is_rejected(predictor, receiver, tmp_path):
    gateway = start_gateway(predictor, tmp_path / "queue", receiver.port, allowed_calling=("MODALITY",))
    try:
        wrong = idle_association(gateway.port, called="SOMEONE_ELSE")
        assert not wrong.is_established and wrong.is_rejected
        right = idle_association(gateway.port)
        assert right.is_established
        right.release()
        stranger = idle_association(gateway.port, calling="STRANGER")
        assert not stranger.is_established
    finally:
        gateway.stop()


def test_no_allow_list_is_an_explicit_choice(tmp_path):
    destination = Destination("PACS", "127.0.0.1", 104)
    with pytest.raises(CXRMonaiError, match="--allow-any"):
        GatewayConfig(destination, tmp_path).check()
    with pytest.raises(CXRMonaiError, match="exclude each other"):
        GatewayConfig(destination, tmp_path, allowed_calling=("A",), allow_any_calling=True).check()
    GatewayConfig(destination, tmp_path, allow_any_calling=True).check()
    runner = CliRunner()
    base = ["gateway", "--dest-ae", "PACS", "--dest-host", "127.0.0.1", "--dest-port", "104"]
    for extra in ([], ["--allow", "MODALITY", "--allow-any"]):
        result = runner.invoke(app, [*base, *extra], env={"CXR_MONAI_BUNDLE": ""})
        assert result.exit_code == 2, result.output
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error:") and "--allow" in lines[0], lines
    # with --allow-any it gets past the check (and stops at the missing bundle)
    result = runner.invoke(app, [*base, "--allow-any"], env={"CXR_MONAI_BUNDLE": ""})
    assert result.exit_code == 1 and "no trained bundle" in result.output


# --- refused at C-STORE: what cannot give a result ------------------------------------------------------


def _short_pixels() -> Dataset:
    ds = film()
    ds.PixelData = ds.PixelData[:1000]
    return ds


def _without(keyword: str) -> Dataset:
    ds = film()
    delattr(ds, keyword)
    return ds


@pytest.mark.parametrize(
    ("make", "words"),
    [
        (_short_pixels, "PixelData"),
        (lambda: _without("StudyInstanceUID"), "StudyInstanceUID"),
        (lambda: film(WindowCenter=100, WindowWidth=0), "WindowWidth"),
        (lambda: film(WindowCenter=100, WindowWidth=-5), "WindowWidth"),
        (lambda: film(RescaleSlope="NaN", RescaleIntercept=0), "RescaleSlope"),
        (lambda: film(RescaleSlope="inf", RescaleIntercept=0), "RescaleSlope"),
        (lambda: film(RescaleSlope=0, RescaleIntercept=0), "RescaleSlope"),
    ],
    ids=[
        "short-pixels",
        "no-study-uid",
        "window-width-0",
        "window-width-negative",
        "slope-nan",
        "slope-inf",
        "slope-0",
    ],
)
@pytest.mark.filterwarnings("ignore:Invalid value for VR DS")
def test_what_cannot_give_a_result_is_refused_at_c_store(predictor, receiver, tmp_path, caplog, make, words):
    gateway = start_gateway(predictor, tmp_path / "queue", receiver.port)
    try:
        answer = c_store(gateway.port, make())
        assert answer is not None
        assert answer.Status == DOES_NOT_MATCH_SOP_CLASS, answer
        assert words in answer.ErrorComment
        assert wait_for(lambda: status_of(gateway.queue.root)["since_start"]["refused"] == 1, timeout=5)
    finally:
        gateway.stop()
    assert gateway.queue.inbox() == [] and not any(gateway.queue.failed_dir.iterdir())
    refusals = [r.getMessage() for r in caplog.records if "refused an instance" in r.getMessage()]
    assert len(refusals) == 1 and words in refusals[0] and "\n" not in refusals[0]
    assert PATIENT_NAME not in caplog.text and PATIENT_ID not in caplog.text


# --- what fails later is visible: a count, a log line, failed/ with the reason -----------------------------


def test_a_film_that_fails_later_is_counted_logged_and_kept_with_its_reason(
    predictor, receiver, tmp_path, caplog
):
    caplog.set_level("INFO")
    corrupt = jpeg_baseline(gradient(8))
    corrupt.PixelData = encapsulate([b"\xff\xd8\xff\xe0" + bytes(100)])  # only decoding finds out
    corrupt["PixelData"].VR = "OB"
    gateway = start_gateway(predictor, tmp_path / "queue", receiver.port)
    queue = gateway.queue.root
    try:
        assert c_store(gateway.port, corrupt).Status == SUCCESS  # accepted: the header is fine
        assert c_store(gateway.port, film()).Status == SUCCESS
        assert wait_for(lambda: len(receiver.of_class(SR_CLASS)) == 1)
        assert wait_for(lambda: status_of(queue)["since_start"]["failed"] == 1, timeout=10)
    finally:
        gateway.stop()
    status = status_of(queue)
    assert status["since_start"]["received"] == 2 and status["since_start"]["delivered"] == 1
    assert status["queue"] == {"inbox": 0, "outbox": 0, "failed": 1}
    (reason_file,) = gateway.queue.failed_dir.glob("*.txt")
    reason = reason_file.read_text().strip()
    assert "cannot be decoded" in reason and "\n" not in reason
    assert status["last_failure"]["entry"] == reason_file.stem and status["last_failure"]["reason"] == reason
    lines = [r for r in caplog.records if "moved to failed/" in r.getMessage()]
    assert len(lines) == 1 and reason_file.stem in lines[0].getMessage() and lines[0].exc_info is None
    assert "gateway status: since start received 2" in caplog.text  # the final status line
    assert PATIENT_NAME not in caplog.text and PATIENT_ID not in caplog.text


# --- the queue: private, and on disk before success ---------------------------------------------------


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_the_queue_is_private_and_synced_before_success(tmp_path, monkeypatch):
    synced: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(queue_module.os, "fsync", recording_fsync)
    old = tmp_path / "queue"
    (old / "inbox").mkdir(parents=True)
    os.chmod(old, 0o755)
    os.chmod(old / "inbox", 0o755)  # a queue made by an older gateway
    umask = os.umask(0)  # the most permissive umask: the modes must not depend on it
    try:
        queue = DiskQueue(old)
        name = queue.put(b"DICM...", "MODALITY")
        inbox_file = queue.inbox_dir / f"{name}.dcm"
        assert any(entry.endswith(".tmp") and f".{name}.dcm." in entry for entry in synced)  # the data
        assert synced[-1] == str(queue.inbox_dir)  # then its folder, before put() returns
        other = queue.put(b"DICM...", "MODALITY")
        synced.clear()
        entry = queue.to_outbox(inbox_file, b"sc", b"sr")
        assert str(queue.outbox_dir) in synced  # the results are durable before the inbox file goes
        queue.to_failed(queue.inbox_dir / f"{other}.dcm", "reason")
        queue.write_status({"x": 1})
    finally:
        os.umask(umask)
    for folder in (queue.root, queue.inbox_dir, queue.outbox_dir, queue.failed_dir, entry):
        assert _mode(folder) == 0o700, folder
    files = [p for p in queue.root.rglob("*") if p.is_file()]
    assert len(files) == 6  # outbox sc + sr, failed dcm + txt + json, status.json
    for path in files:
        assert _mode(path) == 0o600, path
