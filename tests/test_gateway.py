"""``cxr-monai gateway`` on loopback: dcmtk storescu -> gateway (tiny bundle) -> a pynetdicom SCP.

Covers the round trip (SC + SR validate with dciodvfy and reference the source instance), refusal
statuses for unsuitable instances, destination down -> queued -> delivered, and the queue surviving a
gateway restart. Ports are ephemeral (bound as 0).
"""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, evt

from cxr_monai.gateway.queue import DiskQueue
from cxr_monai.gateway.scp import CANNOT_UNDERSTAND, DOES_NOT_MATCH_SOP_CLASS
from cxr_monai.gateway.service import Destination, Gateway, GatewayConfig
from cxr_monai.predictor import Predictor
from tests.bundle_factory import make_trained_bundle
from tests.dicom_factory import PATIENT_ID, PATIENT_NAME, gradient, jpeg_baseline, make_dataset, save

SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.33"
DEADLINE_S = 60.0


def dcmtk(tool: str) -> str | None:
    """The dcmtk binary ``tool`` (pynetdicom installs Python apps of the same names: skip those)."""
    for folder in ("/usr/bin", "/usr/local/bin", "/bin"):
        candidate = Path(folder) / tool
        if candidate.is_file():
            probe = subprocess.run([str(candidate), "--version"], capture_output=True, text=True)
            if "dcmtk" in (probe.stdout + probe.stderr).lower():
                return str(candidate)
    return None


STORESCU = dcmtk("storescu")
needs_storescu = pytest.mark.skipif(STORESCU is None, reason="dcmtk storescu not installed")


class Receiver:
    """A pynetdicom Storage SCP standing in for the destination PACS; keeps what it receives."""

    def __init__(self, port: int = 0) -> None:
        self.received: list[Dataset] = []
        self.folder: Path | None = None
        ae = AE(ae_title="PACS")
        ae.add_supported_context(SC_CLASS, ExplicitVRLittleEndian)
        ae.add_supported_context(SR_CLASS, ExplicitVRLittleEndian)
        self._ae = ae
        self._lock = threading.Lock()
        self.server = ae.start_server(
            ("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._store)]
        )
        self.port = int(self.server.server_address[1])

    def _store(self, event: evt.Event) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        with self._lock:
            self.received.append(ds)
        return 0x0000

    def of_class(self, sop_class: str) -> list[Dataset]:
        with self._lock:
            return [ds for ds in self.received if ds.SOPClassUID == sop_class]

    def stop(self) -> None:
        self.server.shutdown()


def wait_for(condition: Callable[[], bool], timeout: float = DEADLINE_S) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(0.1)
    return condition()


@pytest.fixture(scope="module")
def predictor(tmp_path_factory, one_torch_thread) -> Predictor:
    return Predictor.from_bundle(make_trained_bundle(tmp_path_factory.mktemp("bundle")), device="cpu")


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    peer = Receiver()
    yield peer
    peer.stop()


def start_gateway(predictor: Predictor, queue: Path, dest_port: int, **options: object) -> Gateway:
    """A gateway on an ephemeral port; any calling AE title unless ``allowed_calling`` is given."""
    options.setdefault("allow_any_calling", not options.get("allowed_calling"))
    config = GatewayConfig(
        destination=Destination("PACS", "127.0.0.1", dest_port),
        queue_dir=queue,
        port=0,
        retry_initial_s=0.2,
        retry_max_s=0.5,
        idle_poll_s=0.2,
        **options,  # type: ignore[arg-type]
    )
    gateway = Gateway(predictor, config)
    gateway.start()
    return gateway


def storescu(port: int, *files: Path, calling: str = "MODALITY") -> subprocess.CompletedProcess[str]:
    assert STORESCU is not None
    # -xy: propose JPEG baseline besides the uncompressed syntaxes (JPEG files go as they are)
    command = [
        STORESCU,
        "-xy",
        "-aet",
        calling,
        "-aec",
        "CXR_MONAI",
        "127.0.0.1",
        str(port),
        *map(str, files),
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=60)


def cr_film(folder: Path, name: str, **tags: object) -> Path:
    ds = make_dataset(gradient(12).astype(np.uint16), bits_stored=12, StudyDate="20200314", **tags)
    return save(ds, folder / name)


def dciodvfy_errors(ds: Dataset, path: Path) -> list[str]:
    ds.save_as(path, enforce_file_format=True)
    result = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("Error")]


def referenced_uids(ds: Dataset) -> set[str]:
    """Every ReferencedSOPInstanceUID anywhere in ``ds`` (sequences included)."""
    found: set[str] = set()

    def visit(dataset: Dataset) -> None:
        for element in dataset:
            if element.keyword == "ReferencedSOPInstanceUID":
                found.add(str(element.value))
            elif element.VR == "SQ":
                for item in element.value:
                    visit(item)

    visit(ds)
    return found


@needs_storescu
def test_round_trip_delivers_sc_and_sr_that_reference_the_source(predictor, receiver, tmp_path, caplog):
    films = tmp_path / "films"
    films.mkdir()
    plain = cr_film(films, "plain.dcm", ViewPosition="AP")
    lossy = save(jpeg_baseline(gradient(8)), films / "lossy.dcm")
    gateway = start_gateway(predictor, tmp_path / "queue", receiver.port)
    try:
        sent = storescu(gateway.port, plain, lossy)
        assert sent.returncode == 0, sent.stderr
        assert wait_for(
            lambda: len(receiver.of_class(SR_CLASS)) == 2 and len(receiver.of_class(SC_CLASS)) == 2
        )
        assert wait_for(lambda: not gateway.queue.outbox())
    finally:
        gateway.stop()
    assert not gateway.queue.inbox() and not any(gateway.queue.failed_dir.iterdir())
    sources = {pydicom.dcmread(p).SOPInstanceUID: pydicom.dcmread(p) for p in (plain, lossy)}
    for sc in receiver.of_class(SC_CLASS):
        (uid,) = [str(item.ReferencedSOPInstanceUID) for item in sc.SourceImageSequence]
        source = sources[uid]
        assert sc.SourceImageSequence[0].ReferencedSOPClassUID == source.SOPClassUID
        assert sc.StudyInstanceUID == source.StudyInstanceUID
        assert sc.Modality == "CR" and "DerivationDescription" in sc
        assert list(sc.PatientOrientation) == ["L", "F"]  # frontal ViewPosition, no PatientOrientation
        assert (sc.get("LossyImageCompression") == "01") == (source.get("LossyImageCompression") == "01")
        if shutil.which("dciodvfy"):
            assert dciodvfy_errors(sc, tmp_path / "sc.dcm") == []
    for sr in receiver.of_class(SR_CLASS):
        assert len(referenced_uids(sr) & set(sources)) == 1
        assert sr.ContentQualification == "RESEARCH" and "NOT FOR CLINICAL USE" in sr.SeriesDescription
        if shutil.which("dciodvfy"):
            assert dciodvfy_errors(sr, tmp_path / "sr.dcm") == []
    assert PATIENT_NAME not in caplog.text and PATIENT_ID not in caplog.text
    assert not any(uid in caplog.text for uid in sources)


def c_store(port: int, ds: Dataset, calling: str = "MODALITY") -> Dataset | None:
    """Send one data set with pynetdicom (to read the exact status); None when not associated."""
    ae = AE(ae_title=calling)
    ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title="CXR_MONAI")
    if not assoc.is_established:
        return None
    try:
        return assoc.send_c_store(ds)
    finally:
        assoc.release()


def test_unsuitable_instances_get_a_failure_status_and_are_not_queued(predictor, receiver, tmp_path, caplog):
    gateway = start_gateway(predictor, tmp_path / "queue", receiver.port, allowed_calling=("MODALITY",))
    no_pixels = make_dataset(gradient(8))
    del no_pixels.PixelData
    frames = make_dataset(np.stack([gradient(8)] * 2))
    frames.NumberOfFrames = 2
    cases = [
        (no_pixels, DOES_NOT_MATCH_SOP_CLASS, "PixelData"),
        (frames, DOES_NOT_MATCH_SOP_CLASS, "multi-frame"),
        (make_dataset(gradient(8), ViewPosition="LL"), CANNOT_UNDERSTAND, "lateral"),
        (make_dataset(gradient(8), BodyPartExamined="SKULL"), CANNOT_UNDERSTAND, "CHEST"),
        (make_dataset(gradient(8), Manufacturer="cxr-monai"), CANNOT_UNDERSTAND, "cxr-monai"),
    ]
    try:
        for ds, status, words in cases:
            answer = c_store(gateway.port, ds)
            assert answer is not None
            assert answer.Status == status, words
            assert words in answer.ErrorComment
        assert c_store(gateway.port, make_dataset(gradient(8)), calling="STRANGER") is None  # not allowed
    finally:
        gateway.stop()
    assert gateway.queue.inbox() == [] and gateway.queue.outbox() == []
    assert receiver.received == []
    assert PATIENT_NAME not in caplog.text and PATIENT_ID not in caplog.text


@needs_storescu
def test_destination_down_then_up_and_a_restart_lose_nothing(predictor, tmp_path):
    films = tmp_path / "films"
    films.mkdir()
    files = [cr_film(films, f"film{i}.dcm") for i in range(2)]
    probe = Receiver()  # find a free port, then leave it closed: the destination is down
    port = probe.port
    probe.stop()
    queue = tmp_path / "queue"
    first = start_gateway(predictor, queue, port)
    try:
        assert storescu(first.port, *files).returncode == 0  # accepted although the PACS is down
        assert wait_for(lambda: len(first.queue.outbox()) == 2)  # processed, waiting for delivery
        time.sleep(1.0)  # several failed retries
        assert len(first.queue.outbox()) == 2
    finally:
        first.stop()
    # a crash right after receipt leaves an instance in the inbox: write one as the SCP would
    DiskQueue(queue).put(files[0].read_bytes())
    receiver = Receiver(port)  # the destination comes back
    second = start_gateway(predictor, queue, port)  # and the gateway restarts on the same queue
    try:
        assert wait_for(lambda: len(receiver.of_class(SR_CLASS)) == 3)
        assert wait_for(lambda: not second.queue.outbox() and not second.queue.inbox())
    finally:
        second.stop()
        receiver.stop()
    assert len(receiver.of_class(SC_CLASS)) == 3
    sent = {pydicom.dcmread(p).SOPInstanceUID for p in files}
    assert {
        str(sc.SourceImageSequence[0].ReferencedSOPInstanceUID) for sc in receiver.of_class(SC_CLASS)
    } == sent


def test_an_undecodable_accepted_instance_goes_to_failed_with_its_reason(predictor, receiver, tmp_path):
    queue = DiskQueue(tmp_path / "queue")
    ds = jpeg_baseline(gradient(8))
    ds.PixelData = encapsulate([b"\xff\xd8\xff\xe0" + bytes(100)])  # header fine, JPEG corrupt: only
    ds["PixelData"].VR = "OB"  # decoding finds out
    buffer = tmp_path / "bad.dcm"
    save(ds, buffer)
    name = queue.put(buffer.read_bytes())
    gateway = start_gateway(predictor, queue.root, receiver.port)
    try:
        assert wait_for(lambda: (queue.failed_dir / f"{name}.txt").is_file())
    finally:
        gateway.stop()
    assert "cannot be decoded" in (queue.failed_dir / f"{name}.txt").read_text()
    assert queue.inbox() == [] and receiver.received == []


@pytest.mark.integration
@needs_storescu
def test_real_films_round_trip(predictor, receiver, shared_data, tmp_path):
    films = sorted((shared_data / "dicom").glob("*.dcm"))
    gateway = start_gateway(predictor, tmp_path / "queue", receiver.port)
    try:
        sent = storescu(gateway.port, *films)
        assert sent.returncode == 0, sent.stderr
        assert wait_for(lambda: len(receiver.of_class(SR_CLASS)) == len(films), timeout=180)
        assert wait_for(lambda: len(receiver.of_class(SC_CLASS)) == len(films))
    finally:
        gateway.stop()
    sources = {str(pydicom.dcmread(p, force=True, stop_before_pixels=True).SOPInstanceUID) for p in films}
    for sc in receiver.of_class(SC_CLASS):
        assert str(sc.SourceImageSequence[0].ReferencedSOPInstanceUID) in sources
        if shutil.which("dciodvfy"):
            assert dciodvfy_errors(sc, tmp_path / "sc.dcm") == []
    for sr in receiver.of_class(SR_CLASS):
        assert len(referenced_uids(sr) & sources) == 1
        if shutil.which("dciodvfy"):
            assert dciodvfy_errors(sr, tmp_path / "sr.dcm") == []
