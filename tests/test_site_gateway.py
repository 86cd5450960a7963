"""Site profiles in ``cxr-monai gateway``: the site map (calling AE title, InstitutionName), the calling AE
title kept with each queued instance, the calibration applied and stated in the SC and SR (dciodvfy-clean,
flagged or calibrated), and ``--unknown-site refuse`` sending a film to ``failed/``."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset
from typer.testing import CliRunner

from cxr_monai.cli import app
from cxr_monai.constants import CLASS_NAMES
from cxr_monai.errors import CXRMonaiError
from cxr_monai.explain.structured_report import CLASS_CODES
from cxr_monai.gateway.queue import DiskQueue
from cxr_monai.predictor import Predictor
from cxr_monai.site.sitemap import SiteMap
from tests.bundle_factory import make_trained_bundle, write_site_profile
from tests.dicom_factory import gradient, make_dataset, save
from tests.test_dicom_out import sr_items
from tests.test_gateway import SC_CLASS, SR_CLASS, Receiver, c_store, dciodvfy_errors, start_gateway, wait_for

INSTITUTION = "General Hospital Secret"
SITE_MAP = {"MODALITY": "north", "institution_names": {INSTITUTION: "north"}}


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_trained_bundle(tmp_path_factory.mktemp("bundle"))


@pytest.fixture(scope="module")
def target(bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> int:
    """A class the model does not call for :func:`film` (the profile's bias makes it call it)."""
    path = save(film(), tmp_path_factory.mktemp("probe") / "probe.dcm")
    return (Predictor.from_bundle(bundle, device="cpu").predict([path])[0].predicted_index + 1) % 3


@pytest.fixture(scope="module")
def profiles(bundle: Path, target: int, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("sites")
    write_site_profile(folder, bundle, "north", target)
    return folder


def predictor(bundle: Path, profiles: Path, unknown_site: str = "flag") -> Predictor:
    return Predictor.from_bundle(bundle, device="cpu", site_profiles=profiles, unknown_site=unknown_site)


def film(**tags: object) -> Dataset:
    return make_dataset(gradient(12).astype(np.uint16), bits_stored=12, StudyDate="20200314", **tags)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    peer = Receiver()
    yield peer
    peer.stop()


def predicted_code(sr: Dataset) -> str:
    """The SR's predicted class code: named by its class group and by the summary group."""
    codes = Counter(
        item.ConceptCodeSequence[0].CodeValue
        for item in sr_items(sr)
        if item.ValueType == "CODE" and item.ConceptNameCodeSequence[0].CodeMeaning == "Finding"
    )
    return codes.most_common(1)[0][0]


def site_parameters(sr: Dataset) -> set[str]:
    """The Algorithm Parameters texts of the SR (one per measurement group)."""
    return {
        item.TextValue
        for item in sr_items(sr)
        if item.ValueType == "TEXT" and item.ConceptNameCodeSequence[0].CodeValue == "111002"
    }


def test_the_site_map_is_read_and_checked(tmp_path):
    path = tmp_path / "sites.json"
    path.write_text(json.dumps({" MODALITY ": "north", "institution_names": {f" {INSTITUTION}": "south"}}))
    sites = SiteMap.read(path)
    assert sites.site_for("MODALITY", None) == "north"
    assert sites.site_for("MODALITY", INSTITUTION + "  ") == "south"  # the film's institution first
    assert sites.site_for("OTHER", "Elsewhere") is None and sites.site_for(None, None) is None
    bad = {
        "not json": "{",
        "a list": "[]",
        "a long AE": json.dumps({"A" * 17: "north"}),
        "a path as site": json.dumps({"MODALITY": "../north"}),
        "a number as site": json.dumps({"MODALITY": 3}),
        "institutions not an object": json.dumps({"institution_names": ["x"]}),
    }
    for case, text in bad.items():
        path.write_text(text)
        with pytest.raises(CXRMonaiError, match=f"^site map {path}: ") as info:
            SiteMap.read(path)
        assert "\n" not in str(info.value), case
    with pytest.raises(CXRMonaiError, match="cannot be read"):
        SiteMap.read(tmp_path / "missing.json")


def test_the_gateway_command_refuses_a_bad_site_map_in_one_line(bundle, tmp_path):
    bad = tmp_path / "sites.json"
    bad.write_text(json.dumps({"MODALITY": "no such/site"}))
    options = ["--allow", "MODALITY", "--dest-ae", "PACS", "--dest-host", "127.0.0.1", "--dest-port", "104"]
    options += ["--site-map", str(bad)]
    result = CliRunner().invoke(app, ["gateway", "--bundle", str(bundle), *options])
    assert result.exit_code == 1
    assert [line for line in result.output.splitlines() if line.strip()] == [
        line for line in result.output.splitlines() if line.startswith("error: site map")
    ]


def test_the_calling_ae_title_travels_with_a_queued_instance(tmp_path):
    queue = DiskQueue(tmp_path / "queue")
    name = queue.put(b"DICM...", "MODALITY")
    path = queue.inbox_dir / f"{name}.dcm"
    assert DiskQueue(queue.root).arrival(path) == {"calling_ae_title": "MODALITY"}  # a restarted gateway
    queue.to_failed(path, "reason")
    assert queue.arrival(queue.failed_dir / f"{name}.dcm") == {"calling_ae_title": "MODALITY"}
    assert list(queue.inbox_dir.iterdir()) == []
    other = queue.put(b"DICM...", "PACS")
    queue.to_outbox(queue.inbox_dir / f"{other}.dcm", b"sc", b"sr")
    assert list(queue.inbox_dir.iterdir()) == []  # the record goes with the instance
    (queue.inbox_dir / "legacy.dcm").write_bytes(b"DICM")  # queued before arrival records
    assert queue.arrival(queue.inbox_dir / "legacy.dcm") == {}


def test_results_state_the_calling_ae_titles_site_or_the_flag(bundle, profiles, target, receiver, tmp_path):
    site_map = SiteMap.from_dict(SITE_MAP)
    sent = {"calibrated": film(), "flagged": film()}
    gateway = start_gateway(predictor(bundle, profiles), tmp_path / "queue", receiver.port, site_map=site_map)
    try:
        for calling, ds in (("MODALITY", sent["calibrated"]), ("OTHER", sent["flagged"])):
            answer = c_store(gateway.port, ds, calling=calling)
            assert answer is not None and answer.Status == 0
        assert wait_for(
            lambda: len(receiver.of_class(SR_CLASS)) == 2 and len(receiver.of_class(SC_CLASS)) == 2
        )
    finally:
        gateway.stop()
    uids = {str(ds.SOPInstanceUID): case for case, ds in sent.items()}
    for sr in receiver.of_class(SR_CLASS):
        case = uids[
            str(
                sr.CurrentRequestedProcedureEvidenceSequence[0]
                .ReferencedSeriesSequence[0]
                .ReferencedSOPSequence[0]
                .ReferencedSOPInstanceUID
            )
        ]
        (parameter,) = site_parameters(sr)
        if case == "calibrated":
            assert parameter.startswith("Site calibration: site north calibrated (bias, 10 films, 2026-12-02")
            assert predicted_code(sr) == CLASS_CODES[CLASS_NAMES[target]].value
        else:
            assert parameter.startswith("Site calibration: site unknown: probabilities NOT calibrated")
            assert predicted_code(sr) != CLASS_CODES[CLASS_NAMES[target]].value
        if shutil.which("dciodvfy"):
            assert dciodvfy_errors(sr, tmp_path / f"sr_{case}.dcm") == []
    for sc in receiver.of_class(SC_CLASS):
        case = uids[str(sc.SourceImageSequence[0].ReferencedSOPInstanceUID)]
        assert ("site north calibrated" in sc.ImageComments) == (case == "calibrated")
        assert ("NOT calibrated" in sc.ImageComments) == (case == "flagged")
        if shutil.which("dciodvfy"):
            assert dciodvfy_errors(sc, tmp_path / f"sc_{case}.dcm") == []


def test_refuse_sends_a_film_without_profile_to_failed_and_the_others_go_on(
    bundle, profiles, receiver, tmp_path
):
    strict = predictor(bundle, profiles, unknown_site="refuse")
    gateway = start_gateway(strict, tmp_path / "queue", receiver.port, site_map=SiteMap.from_dict(SITE_MAP))
    try:
        assert c_store(gateway.port, film(), calling="OTHER").Status == 0  # accepted, then refused
        assert c_store(gateway.port, film(), calling="MODALITY").Status == 0
        assert wait_for(lambda: len(receiver.of_class(SR_CLASS)) == 1 and not gateway.queue.inbox())
    finally:
        gateway.stop()
    (reason,) = gateway.queue.failed_dir.glob("*.txt")
    assert "no calibration profile" in reason.read_text()
    assert gateway.queue.arrival(reason.with_suffix(".dcm")) == {"calling_ae_title": "OTHER"}
    assert len(receiver.of_class(SC_CLASS)) == 1


def test_a_restarted_gateway_finds_the_site_of_queued_films(
    bundle, profiles, target, receiver, tmp_path, caplog
):
    """Queued before the start: one from a mapped AE title, one mapped by its InstitutionName only."""
    queue = DiskQueue(tmp_path / "queue")
    for ds, calling in ((film(), "MODALITY"), (film(InstitutionName=INSTITUTION), "STRANGER")):
        queue.put(save(ds, tmp_path / "film.dcm").read_bytes(), calling)
    strict = predictor(bundle, profiles, unknown_site="refuse")
    with caplog.at_level("DEBUG"):
        gateway = start_gateway(strict, queue.root, receiver.port, site_map=SiteMap.from_dict(SITE_MAP))
        try:
            assert wait_for(lambda: len(receiver.of_class(SR_CLASS)) == 2)
        finally:
            gateway.stop()
    assert not list(queue.failed_dir.iterdir())
    for sr in receiver.of_class(SR_CLASS):
        assert predicted_code(sr) == CLASS_CODES[CLASS_NAMES[target]].value
    assert INSTITUTION not in caplog.text and "site north, calibrated" in caplog.text
