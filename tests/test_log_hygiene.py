"""Issue 19, item 3: a bad-input corpus through ``cxr-monai serve`` and ``cxr-monai gateway`` never puts a
header value into anything the processes write.

Every input carries one marker string in PatientName (a single component, which highdicom warns about,
quoting it), PatientID, InstitutionName and StudyDescription, and most carry it also in the header value
that is wrong (PhotometricInterpretation, BodyPartExamined, SpecificCharacterSet, PatientSex, dates,
numbers...). Both commands run as subprocesses with the CLI's logging; everything they write (stdout,
stderr, the gateway's queue status file and ``failed/`` reasons) and every gRPC status message is
searched for the marker: it must appear 0 times. Each process must also stay up, and say what it
refused on one line (no tracebacks).
"""

from __future__ import annotations

import io
import logging
import os
import re
import struct
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pydicom
import pytest
from bundle_factory import make_trained_bundle
from PIL import Image, PngImagePlugin
from pydicom.dataelem import RawDataElement
from pydicom.encaps import encapsulate
from pydicom.tag import Tag
from pydicom.uid import JPEGBaseline8Bit

from cxr_monai import log_hygiene
from cxr_monai.api.v1 import cxr_triage_pb2 as pb
from cxr_monai.api.v1 import cxr_triage_pb2_grpc as pb_grpc
from tests.dicom_factory import gradient, make_dataset
from tests.test_gateway import STORESCU, Receiver, wait_for

TESTS = Path(__file__).resolve().parent
#: Valid in every VR used below (CS: upper case, digits; at most 16 characters).
MARKER = "ZQXMK7731"
START_TIMEOUT_S = 120


def _film(**tags: object) -> pydicom.Dataset:
    ds = make_dataset(gradient(12).astype(np.uint16), bits_stored=12, StudyDate="20200314")
    ds.PatientName = MARKER  # one component: highdicom warns, quoting it
    ds.PatientID = MARKER
    ds.InstitutionName = MARKER
    ds.StudyDescription = f"{MARKER} chest"
    ds.ReferringPhysicianName = MARKER
    for keyword, value in tags.items():
        if value is None:
            delattr(ds, keyword)
        else:
            _raw(ds, keyword, str(value))
    return ds


def _raw(ds: pydicom.Dataset, keyword: str, value: str) -> None:
    """Set ``keyword`` to ``value`` as written, unchecked (pydicom refuses to hold a DS like ``ABC``)."""
    data = value.encode("latin-1")
    data += b" " if len(data) % 2 else b""
    tag = Tag(pydicom.datadict.tag_for_keyword(keyword))
    vr = pydicom.datadict.dictionary_VR(tag)
    ds[tag] = RawDataElement(tag, vr, len(data), data, 0, False, True)


def _bytes(ds: pydicom.Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _truncated_pixels() -> pydicom.Dataset:
    ds = _film()
    ds.PixelData = ds.PixelData[:1000]
    return ds


def _corrupt_jpeg() -> pydicom.Dataset:
    ds = make_dataset(np.zeros((48, 64), np.uint8))
    ds.PatientName, ds.PatientID, ds.InstitutionName = MARKER, MARKER, MARKER
    ds.PixelData = encapsulate([b"\xff\xd8\xff\xe0" + MARKER.encode() * 50])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    return ds


def dicom_corpus() -> dict[str, bytes]:
    """Bad (and a few merely odd) DICOM inputs, each carrying the marker."""
    cases: dict[str, pydicom.Dataset | bytes] = {
        "single_component_names": _film(),
        "patient_sex_marker": _film(PatientSex=MARKER),
        "patient_sex_u": _film(PatientSex="U"),
        "charset_marker": _film(SpecificCharacterSet=MARKER),
        "charset_spaces": _film(SpecificCharacterSet="ISO IR 100"),
        "photometric_marker": _film(PhotometricInterpretation=MARKER),
        "body_part_marker": _film(BodyPartExamined=MARKER),
        "modality_marker": _film(Modality=MARKER),
        "view_marker": _film(ViewPosition=MARKER),
        "birth_date_marker": _film(PatientBirthDate=MARKER),
        "study_date_marker": _film(StudyDate=MARKER),
        "study_time_marker": _film(StudyTime=MARKER),
        "window_centre_marker": _film(WindowCenter=MARKER, WindowWidth="100"),
        "window_width_zero": _film(WindowCenter="100", WindowWidth="0"),
        "rescale_slope_nan": _film(RescaleSlope="NaN", RescaleIntercept="0"),
        "rescale_slope_marker": _film(RescaleSlope=MARKER, RescaleIntercept="0"),
        "no_study_uid": _film(StudyInstanceUID=None),
        "truncated_pixels": _truncated_pixels(),
        "corrupt_jpeg": _corrupt_jpeg(),
    }
    corpus = {name: value if isinstance(value, bytes) else _bytes(value) for name, value in cases.items()}
    good = corpus["single_component_names"]
    corpus["truncated_header"] = good[: good.index(MARKER.encode()) + 40]  # cut inside the patient module
    return corpus


def png_corpus() -> dict[str, bytes]:
    """PNG inputs (``serve`` only) carrying the marker in text chunks."""
    info = PngImagePlugin.PngInfo()
    info.add_text("PatientName", MARKER)
    info.add_text("Comment", f"{MARKER} '{MARKER}'")
    buffer = io.BytesIO()
    Image.fromarray(gradient(8)).save(buffer, "PNG", pnginfo=info)
    png = buffer.getvalue()
    huge = bytearray(png)
    huge[16:24] = struct.pack(">II", 99_999, 99_999)  # IHDR width/height (CRC now wrong too)
    return {"png_text_marker": png, "png_truncated": png[: len(png) // 2], "png_huge_header": bytes(huge)}


def _env() -> dict[str, str]:
    path = os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])
    return dict(os.environ, COLUMNS="400", PYTHONPATH=path, PYTHONWARNINGS="default")


def _start(args: list[str], pattern: str, output: Path) -> tuple[subprocess.Popen[bytes], int]:
    """Run ``cxr-monai ARGS`` with stdout and stderr to ``output``; the port its start line names."""
    handle = open(output, "wb")  # noqa: SIM115  (closed when the process is stopped)
    process = subprocess.Popen(
        [sys.executable, "-c", "from cxr_monai.cli import app; app()", *args],
        stdout=handle,
        stderr=subprocess.STDOUT,
        env=_env(),
    )
    handle.close()
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline and process.poll() is None:
        found = re.search(pattern, output.read_text(errors="replace"))
        if found:
            return process, int(found.group(1))
        time.sleep(0.2)
    process.kill()
    process.wait(10)
    raise AssertionError(f"did not start: {output.read_text(errors='replace')[-3000:]}")


def _stop(process: subprocess.Popen[bytes]) -> int:
    process.terminate()
    try:
        return process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.wait(10)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_trained_bundle(tmp_path_factory.mktemp("bundle"))


def _everything_written(folder: Path) -> Iterator[tuple[str, str]]:
    """(name, text) of every non-DICOM file under ``folder`` (logs, status, failed reasons)."""
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.suffix != ".dcm":
            yield str(path.relative_to(folder)), path.read_text(errors="replace")


def _assert_clean(texts: dict[str, str]) -> None:
    found = {name: text.count(MARKER) for name, text in texts.items() if MARKER in text}
    assert found == {}, {name: _around(texts[name]) for name in found}
    for name, text in texts.items():
        assert "Traceback" not in text, (name, text[-3000:])


def _around(text: str) -> list[str]:
    return [line for line in text.splitlines() if MARKER in line][:5]


# --- the mechanism, in process ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Invalid value for VR PN: 'Doe^John'.", "Invalid value for VR PN: '<value>'."),
        ('The string "Doe" is unlikely', 'The string "<value>" is unlikely'),
        ("""Invalid value: "O'Brien" here""", 'Invalid value: "<value>" here'),
        ("The string 'O'Brien' is unlikely", "The string '<value>' is unlikely"),
        ("Unknown encoding 'X' - assuming 'Y'", "Unknown encoding '<value>'"),
        ("bytes b'\\x00abc' seen", "bytes b'<value>' seen"),
        ("no quotes at all", "no quotes at all"),
    ],
)
def test_quoted_values_are_scrubbed(text: str, expected: str) -> None:
    assert log_hygiene.scrub_quoted(text) == expected


@pytest.fixture
def root_log() -> Iterator[io.StringIO]:
    """A handler on the root logger (INFO) whose output the test reads; log hygiene installed on it;
    the warnings machinery is restored afterwards."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        log_hygiene.install()
        yield stream
    root.removeHandler(handler)
    root.setLevel(level)


def test_warnings_reach_the_log_scrubbed_from_any_thread(root_log: io.StringIO) -> None:
    def warn(i: int) -> None:
        for _ in range(20):
            warnings.warn(
                f"The string '{MARKER}{i}' is unlikely to be a person name", UserWarning, stacklevel=1
            )

    threads = [threading.Thread(target=warn, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    text = root_log.getvalue()
    assert MARKER not in text
    lines = text.splitlines()
    assert len(lines) == 160 and all(
        "UserWarning: The string '<value>' is unlikely" in line for line in lines
    )


def test_library_records_are_scrubbed_and_lose_their_tracebacks(root_log: io.StringIO) -> None:
    try:
        raise ValueError(f"Invalid value for VR PN: '{MARKER}'")
    except ValueError:
        logging.getLogger("pydicom").warning("Invalid value for VR PN: %r", MARKER, exc_info=True)
        logging.getLogger("highdicom.sc.sop").error("bad '%s'", MARKER, exc_info=True)
        logging.getLogger("pydicom.pixels.decoders.base").error("decoder failed", exc_info=True)
    logging.getLogger("cxr_monai.anything").info("ours: 'kept as written'")
    text = root_log.getvalue()
    assert MARKER not in text and "Traceback" not in text and "decoder failed" not in text
    assert text.splitlines() == [
        "Invalid value for VR PN: '<value>'",
        "bad '<value>'",
        "ours: 'kept as written'",
    ]
    logging.getLogger().setLevel(logging.DEBUG)  # the decoders' own errors show when debugging
    logging.getLogger("pydicom.pixels.decoders.base").error("decoder failed")
    assert "decoder failed" in root_log.getvalue()


# --- the corpus through the real commands ---------------------------------------------------------------


@pytest.mark.slow
def test_serve_never_writes_or_answers_a_header_value(bundle: Path, tmp_path: Path) -> None:
    log = tmp_path / "serve.log"
    process, port = _start(
        ["serve", "--bundle", str(bundle), "--address", "127.0.0.1:0", "--device", "cpu"],
        r" on 127\.0\.0\.1:(\d+) ",
        log,
    )
    details: list[str] = []
    codes: dict[str, list[str]] = {}
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.CXRTriageStub(channel)
            grpc.channel_ready_future(channel).result(timeout=60)
            corpus = {**dicom_corpus(), **png_corpus()}
            for name, data in corpus.items():
                calls = (
                    (stub.Classify, pb.ClassifyRequest(image=data)),
                    (stub.Explain, pb.ExplainRequest(image=data, secondary_capture=True)),
                )
                for method, request in calls:
                    try:
                        method(request, timeout=60)
                        codes.setdefault(name, []).append("OK")
                    except grpc.RpcError as exc:
                        codes.setdefault(name, []).append(exc.code().name)
                        details.append(exc.details() or "")
            # concurrent Explain + Secondary Capture calls: a per-call catch_warnings let 1 in 60 through
            good = corpus["single_component_names"]
            with ThreadPoolExecutor(4) as pool:
                replies = list(
                    pool.map(
                        lambda _: stub.Explain(
                            pb.ExplainRequest(image=good, secondary_capture=True), timeout=60
                        ),
                        range(24),
                    )
                )
            assert all(reply.secondary_capture_dicom for reply in replies)
        assert process.poll() is None, "serve died"
    finally:
        _stop(process)
    assert codes["single_component_names"] == ["OK", "OK"], codes
    assert "INVALID_ARGUMENT" in codes["photometric_marker"], codes
    _assert_clean(
        {"serve stdout+stderr": log.read_text(errors="replace"), "status details": "\n".join(details)}
    )


@pytest.mark.slow
@pytest.mark.skipif(STORESCU is None, reason="dcmtk storescu not installed")
def test_gateway_never_writes_a_header_value(bundle: Path, tmp_path: Path) -> None:
    films = tmp_path / "films"
    films.mkdir()
    corpus = dicom_corpus()
    for name, data in corpus.items():
        (films / f"{name}.dcm").write_bytes(data)
    queue = tmp_path / "queue"
    log = tmp_path / "gateway.log"
    receiver = Receiver()
    process, port = _start(
        [
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
            str(receiver.port),
            "--queue",
            str(queue),
            "--device",
            "cpu",
        ],
        r" on 127\.0\.0\.1:(\d+) ",
        log,
    )
    answers: list[str] = []
    try:
        for path in sorted(films.iterdir()):  # one association each: a refusal does not stop the rest
            assert STORESCU is not None
            sent = subprocess.run(
                [STORESCU, "-xy", "-aet", "MODALITY", "-aec", "CXR_MONAI", "127.0.0.1", str(port), str(path)],
                capture_output=True,
                text=True,
                timeout=60,
            )
            answers.append(sent.stdout + sent.stderr)
        assert wait_for(lambda: not list((queue / "inbox").glob("*.dcm")), timeout=120)
        assert wait_for(lambda: not any((queue / "outbox").iterdir()), timeout=60)
        assert process.poll() is None, "gateway died"
    finally:
        _stop(process)
        receiver.stop()
    assert len(receiver.received) >= 2  # the merely odd films produced results
    texts = {"gateway stdout+stderr": log.read_text(errors="replace")}
    texts.update(_everything_written(queue))
    _assert_clean(texts)
