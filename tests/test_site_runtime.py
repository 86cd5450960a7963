"""Site profiles at run time: the predictor, ``cxr-monai explain`` and the gRPC service apply a site's
calibration, flag every output of a film whose site has none, or refuse it under ``refuse``.

The profile used (:func:`bundle_factory.write_site_profile`) puts a bias of 40 nats on one class, the one
the model does *not* call for the test film: larger than any log-probability gap, so calibrated outputs
must call that class.
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pydicom
import pytest
from bundle_factory import make_trained_bundle, write_site_profile
from cxr_monai.server.app import ServerConfig, Service, build_server
from cxr_monai.server.servicer import CXRTriageServicer, ServiceLimits
from dicom_factory import gradient, make_dataset, save
from google.protobuf import descriptor_pool
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from PIL import Image
from typer.testing import CliRunner

from cxr_monai.api.v1 import cxr_triage_pb2 as pb
from cxr_monai.api.v1 import cxr_triage_pb2_grpc as pb_grpc
from cxr_monai.cli import app
from cxr_monai.constants import CLASS_NAMES
from cxr_monai.errors import BundleError
from cxr_monai.explain import files as files_module
from cxr_monai.explain import record as record_module
from cxr_monai.predictor import Predictor
from cxr_monai.site.profile import SiteNotCalibratedError, model_digest

runner = CliRunner()
INSTITUTION = "St Elsewhere Secret Hospital"


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_trained_bundle(tmp_path_factory.mktemp("bundle"), spatial_size=32)


@pytest.fixture(scope="module")
def film(tmp_path_factory: pytest.TempPathFactory) -> Path:
    ds = make_dataset(gradient(12).astype(np.uint16), bits_stored=12, InstitutionName=INSTITUTION)
    return save(ds, tmp_path_factory.mktemp("film") / "study.dcm")


@pytest.fixture(scope="module")
def flip(bundle: Path, film: Path) -> tuple[int, int]:
    """(the model's own call on the film, the class the site's profile makes it call)."""
    own = Predictor.from_bundle(bundle, device="cpu").predict([film])[0].predicted_index
    return own, (own + 1) % len(CLASS_NAMES)


@pytest.fixture(scope="module")
def profiles(bundle: Path, flip: tuple[int, int], tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("sites")
    write_site_profile(folder, bundle, "north", flip[1])
    return folder


@pytest.fixture(scope="module")
def predictor(bundle: Path, profiles: Path) -> Predictor:
    return Predictor.from_bundle(bundle, device="cpu", site_profiles=profiles)


# --- predictor -------------------------------------------------------------------------------------------


def test_the_predictor_applies_the_sites_calibration_and_flags_other_sites(predictor, bundle, film, flip):
    own, target = flip
    assert predictor.model_digest == model_digest(bundle / "models" / "model.pt")
    calibrated = predictor.predict([film], site="north")[0]
    assert calibrated.predicted_index == target != own
    assert calibrated.site.calibrated and calibrated.site.site == "north"
    expected = calibrated.site.apply(calibrated.model_probabilities)
    np.testing.assert_allclose(calibrated.probabilities, expected)
    assert int(np.argmax(calibrated.model_probabilities)) == own
    tensor = predictor.preprocess(film)[None]
    np.testing.assert_allclose(
        predictor.predict_tensors(tensor)[0], calibrated.model_probabilities, atol=1e-6
    )
    for site in (None, "south"):
        flagged = predictor.predict([film], site=site)[0]
        assert flagged.predicted_index == own and not flagged.site.calibrated
        np.testing.assert_allclose(flagged.probabilities, flagged.model_probabilities, atol=1e-7)
        assert "NOT calibrated" in flagged.site.message() and flagged.site.site == site


def test_the_bundles_own_sites_folder_is_the_default(bundle, flip, tmp_path, film):
    copy = Path(shutil.copytree(bundle, tmp_path / "bundle"))
    write_site_profile(copy / "sites", copy, "east", flip[1])
    predictor = Predictor.from_bundle(copy, device="cpu")
    assert set(predictor.sites.profiles) == {"east"}
    assert predictor.predict([film], site="east")[0].predicted_index == flip[1]


def test_refuse_raises_for_a_site_without_profile_before_reading_anything(bundle, profiles, film, flip):
    strict = Predictor.from_bundle(bundle, device="cpu", site_profiles=profiles, unknown_site="refuse")
    for site in (None, "south"):
        with pytest.raises(SiteNotCalibratedError, match="no calibration profile"):
            strict.predict([b"not even an image"], site=site)
    assert strict.predict([film], site="north")[0].predicted_index == flip[1]


def test_a_profile_of_other_weights_or_a_damaged_one_stops_the_load(bundle, flip, tmp_path):
    other = tmp_path / "other"
    write_site_profile(other, bundle, "north", flip[1], digest="f" * 64)
    with pytest.raises(BundleError, match="fitted for another model"):
        Predictor.from_bundle(bundle, device="cpu", site_profiles=other)
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / "north.json").write_text('{"format": "cxr-monai site profile", "version": 1, "si')
    with pytest.raises(BundleError, match=r"north\.json: cannot be read"):
        Predictor.from_bundle(bundle, device="cpu", site_profiles=damaged)


# --- cxr-monai explain -----------------------------------------------------------------------------------


@pytest.fixture
def burned_in(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[list[str]]]:
    """The text lines drawn into each PNG and each Secondary Capture overlay."""
    seen: dict[str, list[list[str]]] = {"png": [], "sc": []}
    png, sc = files_module.render_captioned, record_module.render_overlay

    def spy_png(pixels: np.ndarray, heat: np.ndarray, lines: list[str]) -> np.ndarray:
        seen["png"].append(list(lines))
        return png(pixels, heat, lines)

    def spy_sc(pixels: np.ndarray, heat: np.ndarray, lines: list[str]) -> np.ndarray:
        seen["sc"].append(list(lines))
        return sc(pixels, heat, lines)

    monkeypatch.setattr(files_module, "render_captioned", spy_png)
    monkeypatch.setattr(record_module, "render_overlay", spy_sc)
    return seen


def explain(*args: str) -> Any:
    return runner.invoke(app, ["explain", *args])


def test_explain_with_a_calibrated_site_calls_and_explains_the_calibrated_class(
    bundle, profiles, film, flip, tmp_path, burned_in
):
    own, target = flip
    out = tmp_path / "out"
    result = explain(
        str(film),
        "--bundle",
        str(bundle),
        "--site-profiles",
        str(profiles),
        "--site",
        "north",
        "--out",
        str(out),
    )
    assert result.exit_code == 0, result.output
    record = json.loads((out / "study.json").read_text())
    assert record["predicted_class"] == record["explained_class"] == CLASS_NAMES[target] != CLASS_NAMES[own]
    assert record["probabilities"][CLASS_NAMES[target]] > 0.99
    site = record["site"]
    assert site["name"] == "north" and site["calibrated"] is True
    assert site["message"].startswith("site north calibrated (bias, 10 films, 2026-12-02")
    assert max(site["model_probabilities"], key=site["model_probabilities"].get) == CLASS_NAMES[own]
    line = "Site: site north calibrated (bias, 10 films, 2026-12-02)"
    assert [line in lines for lines in burned_in["png"] + burned_in["sc"]] == [True, True]
    sc = pydicom.dcmread(out / "study_gradcam.dcm")
    assert "Site calibration: site north calibrated (bias" in sc.ImageComments


def test_explain_without_a_site_flags_every_output(bundle, profiles, film, tmp_path, burned_in):
    png = tmp_path / "film.png"
    Image.fromarray(gradient(8)).save(png)
    out = tmp_path / "out"
    result = explain(
        str(film), str(png), "--bundle", str(bundle), "--site-profiles", str(profiles), "--out", str(out)
    )
    assert result.exit_code == 0, result.output
    for name in ("study", "film"):
        record = json.loads((out / f"{name}.json").read_text())
        assert record["site"]["calibrated"] is False and record["site"]["name"] is None
        assert "NOT calibrated for this hospital" in record["site"]["message"]
        assert record["probabilities"] == pytest.approx(record["site"]["model_probabilities"])
    line = "Site unknown: uncalibrated - probabilities NOT calibrated for this hospital"
    assert len(burned_in["png"]) == 2 and all(line in lines for lines in burned_in["png"] + burned_in["sc"])
    sc_path = out / "study_gradcam.dcm"
    assert "NOT calibrated for this hospital" in pydicom.dcmread(sc_path).ImageComments
    if shutil.which("dciodvfy"):
        report = subprocess.run(["dciodvfy", str(sc_path)], capture_output=True, text=True, timeout=60)
        assert [x for x in (report.stdout + report.stderr).splitlines() if x.startswith("Error")] == []


def test_refuse_fails_each_film_without_a_profile_and_writes_nothing_for_it(
    bundle, profiles, film, flip, tmp_path
):
    """The DICOM's InstitutionName maps to a calibrated site; the PNG has none and no --site is given."""
    png = tmp_path / "film.png"
    Image.fromarray(gradient(8)).save(png)
    site_map = tmp_path / "sites.json"
    site_map.write_text(json.dumps({"institution_names": {INSTITUTION: "north"}}))
    out = tmp_path / "out"
    result = explain(
        str(film), str(png), "--bundle", str(bundle), "--site-profiles", str(profiles),
        "--unknown-site", "refuse", "--site-from-institution", str(site_map), "--out", str(out),
    )  # fmt: skip
    assert result.exit_code == 1, result.output
    failed = [line for line in result.output.splitlines() if line.startswith("failed:")]
    assert len(failed) == 1 and str(png) in failed[0] and "no calibration profile" in failed[0]
    assert sorted(p.name for p in out.iterdir()) == ["study.json", "study_gradcam.dcm", "study_gradcam.png"]
    assert json.loads((out / "study.json").read_text())["predicted_class"] == CLASS_NAMES[flip[1]]
    assert INSTITUTION not in result.output and INSTITUTION not in (out / "study.json").read_text()


def test_explain_site_options_fail_cleanly(bundle, profiles, film, tmp_path):
    result = explain(str(film), "--bundle", str(bundle), "--unknown-site", "maybe", "--out", str(tmp_path))
    assert result.exit_code == 2 and "flag or refuse" in result.output
    bad_map = tmp_path / "map.json"
    bad_map.write_text('{"institution_names": {"X": "no/slashes"}}')
    result = explain(str(film), "--bundle", str(bundle), "--site-from-institution", str(bad_map))
    assert result.exit_code == 1 and f"site map {bad_map}" in result.output
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / "north.json").write_text("{")
    result = explain(
        str(film), "--bundle", str(bundle), "--site-profiles", str(damaged), "--out", str(tmp_path / "o")
    )
    assert result.exit_code == 1 and "north.json: cannot be read" in result.output
    assert len([line for line in result.output.splitlines() if line.strip()]) == 1
    result = explain(
        str(film),
        "--bundle",
        str(bundle),
        "--site-profiles",
        str(profiles),
        "--site",
        "south",
        "--out",
        str(tmp_path / "w"),
    )
    assert result.exit_code == 0 and "site south has no calibration profile" in result.output


# --- gRPC ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def serve(bundle: Path, profiles: Path) -> Iterator[Any]:
    started: list[Service] = []

    def make(
        unknown_site: str = "flag", **servicer_options: Any
    ) -> tuple[pb_grpc.CXRTriageStub, grpc.Channel]:
        predictor = Predictor.from_bundle(
            bundle, device="cpu", site_profiles=profiles, unknown_site=unknown_site
        )
        servicer = CXRTriageServicer(predictor, ServiceLimits(max_inflight=4), **servicer_options)
        service = build_server(servicer, ServerConfig(address="127.0.0.1:0"))
        service.start()
        service.warm_up()
        started.append(service)
        channel = grpc.insecure_channel(f"127.0.0.1:{service.port}")
        return pb_grpc.CXRTriageStub(channel), channel

    yield make
    for service in started:
        service.stop(grace_s=0.0)


def probabilities(values: Any) -> np.ndarray:
    return np.array([p.probability for p in values])


def test_grpc_classify_applies_the_sites_profile_and_old_clients_are_flagged(serve, film, flip):
    own, target = flip
    stub, _ = serve()
    data = film.read_bytes()
    reply = stub.Classify(pb.ClassifyRequest(image=data, site="north"), timeout=30)
    assert reply.predicted_class == CLASS_NAMES[target] and reply.site == "north" and reply.site_calibrated
    assert reply.site_status.startswith("site north calibrated (bias, 10 films")
    assert int(np.argmax(probabilities(reply.model_probabilities))) == own
    assert probabilities(reply.probabilities)[target] > 0.99
    old = stub.Classify(pb.ClassifyRequest(image=data), timeout=30)  # a client that knows no site field
    assert old.predicted_class == CLASS_NAMES[own] and not old.site_calibrated and old.site == ""
    assert "NOT calibrated for this hospital" in old.site_status
    np.testing.assert_allclose(probabilities(old.probabilities), probabilities(old.model_probabilities))
    study = stub.ClassifyStudy(
        iter([pb.ClassifyRequest(image=data, site="north"), pb.ClassifyRequest(image=data)]), timeout=30
    )
    assert [r.predicted_class for r in study.results] == [CLASS_NAMES[target]] * 2
    assert all(r.site_calibrated for r in study.results)
    info = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
    assert list(info.calibrated_sites) == ["north"] and info.unknown_site == "flag"
    with pytest.raises(grpc.RpcError) as bad:
        stub.Classify(pb.ClassifyRequest(image=data, site="../north"), timeout=10)
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "site" in (bad.value.details() or "")


def test_grpc_explain_calls_explains_and_flags_like_the_cli(serve, film, flip, tmp_path):
    own, target = flip
    stub, _ = serve()
    data = film.read_bytes()
    reply = stub.Explain(pb.ExplainRequest(image=data, site="north", secondary_capture=True), timeout=60)
    assert reply.classification.predicted_class == reply.explained_class == CLASS_NAMES[target]
    assert reply.classification.site_calibrated
    sc = pydicom.dcmread(io.BytesIO(reply.secondary_capture_dicom))
    assert "site north calibrated" in sc.ImageComments
    flagged = stub.Explain(pb.ExplainRequest(image=data, secondary_capture=True), timeout=60)
    assert flagged.explained_class == flagged.classification.predicted_class == CLASS_NAMES[own]
    assert not flagged.classification.site_calibrated
    assert "NOT calibrated" in pydicom.dcmread(io.BytesIO(flagged.secondary_capture_dicom)).ImageComments
    if shutil.which("dciodvfy"):
        path = tmp_path / "sc.dcm"
        path.write_bytes(flagged.secondary_capture_dicom)
        report = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
        assert [x for x in (report.stdout + report.stderr).splitlines() if x.startswith("Error")] == []


def test_grpc_refuse_is_a_failed_precondition_and_the_server_answers_the_next_call(serve, film, flip):
    stub, _ = serve(unknown_site="refuse")
    data = film.read_bytes()
    calls = [
        lambda: stub.Classify(pb.ClassifyRequest(image=data, site="south"), timeout=10),
        lambda: stub.Classify(pb.ClassifyRequest(image=data), timeout=10),
        lambda: stub.Explain(pb.ExplainRequest(image=data), timeout=10),
        lambda: stub.ClassifyStudy(iter([pb.ClassifyRequest(image=data)]), timeout=10),
    ]
    for call in calls:
        with pytest.raises(grpc.RpcError) as refused:
            call()
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        details = refused.value.details() or ""
        assert "no calibration profile" in details and "\n" not in details
        assert (
            stub.Classify(pb.ClassifyRequest(image=data, site="north"), timeout=10).predicted_class
            == CLASS_NAMES[flip[1]]
        )


def test_the_onnx_backend_applies_the_same_calibration(serve, bundle, film, flip, tmp_path):
    from cxr_monai.export import OnnxModel, export_bundle

    export_bundle(bundle, "onnx", tmp_path / "model.onnx", int8=False)
    onnx, _ = serve(onnx_model=OnnxModel(tmp_path / "model.onnx", threads=1))
    eager, _ = serve()
    request = pb.ClassifyRequest(image=film.read_bytes(), site="north")
    a, b = onnx.Classify(request, timeout=30), eager.Classify(request, timeout=30)
    assert onnx.GetModelInfo(pb.GetModelInfoRequest(), timeout=10).classify_backend == "onnx"
    assert a.predicted_class == CLASS_NAMES[flip[1]] and a.site_calibrated
    np.testing.assert_allclose(probabilities(a.probabilities), probabilities(b.probabilities), atol=1e-5)
    np.testing.assert_allclose(
        probabilities(a.model_probabilities), probabilities(b.model_probabilities), atol=1e-5
    )


def test_reflection_describes_the_site_fields(serve):
    _, channel = serve()
    pool = descriptor_pool.DescriptorPool(ProtoReflectionDescriptorDatabase(channel))
    request = pool.FindMessageTypeByName("cxr_monai.v1.ClassifyRequest")
    response = pool.FindMessageTypeByName("cxr_monai.v1.ClassifyResponse")
    assert request.fields_by_name["site"].number == 2
    assert {
        name: response.fields_by_name[name].number
        for name in ("site", "site_calibrated", "site_status", "model_probabilities")
    } == {"site": 7, "site_calibrated": 8, "site_status": 9, "model_probabilities": 10}
    assert pool.FindMessageTypeByName("cxr_monai.v1.ExplainRequest").fields_by_name["site"].number == 5
