"""``cxr-monai site calibrate`` / ``site list`` end to end on a tiny bundle: the profile and report it writes,
and bad input refused with one line and nothing written."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from cxr_monai.cli import app
from cxr_monai.constants import CLASS_NAMES
from cxr_monai.predictor import Predictor
from cxr_monai.site.profile import model_digest, read_profile
from tests.bundle_factory import blob_image, make_trained_bundle
from tests.dicom_factory import PATIENT_ID, gradient, make_dataset, save

runner = CliRunner()


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return make_trained_bundle(tmp_path_factory.mktemp("bundle"), spatial_size=32)


@pytest.fixture
def site_films(tmp_path) -> Path:
    """Nine films, three per class, two films per patient where possible; returns the labels CSV."""
    folder = tmp_path / "films"
    folder.mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for i in range(9):
        name = f"film_{i}.png"
        Image.fromarray(blob_image(48, 40, rng)).save(folder / name)
        rows.append({"image": name, "label": CLASS_NAMES[i % 3], "patient_id": f"p{i // 2}"})
    return write_csv(folder / "labels.csv", rows)


def write_csv(path: Path, rows: list[dict[str, str]]) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def read_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def calibrate(bundle: Path, labels: Path, *extra: str, site: str = "st-elsewhere", profiles: Path):
    return runner.invoke(
        app,
        [
            "site",
            "calibrate",
            "--bundle",
            str(bundle),
            "--site",
            site,
            "--labels",
            str(labels),
            "--site-profiles",
            str(profiles),
            "--bootstrap",
            "200",
            *extra,
        ],
    )


def test_calibrate_writes_a_profile_bound_to_the_bundle_and_a_report(bundle, site_films, tmp_path):
    profiles, report = tmp_path / "profiles", tmp_path / "report"
    result = calibrate(
        bundle,
        site_films,
        "--out",
        str(report),
        "--accept",
        "Normal:recall>=0.99,ece<=0.9",
        profiles=profiles,
    )
    assert result.exit_code == 0, result.output
    profile = read_profile(profiles / "st-elsewhere.json", model_digest(bundle / "models" / "model.pt"))
    assert profile.calibration.method == "temperature"
    films = profile.report["films"]
    assert films["total"] == 9 and films["patients"] == 5
    assert films["per_class"] == {"COVID-19": 3, "Normal": 3, "Pneumonia": 3}
    assert len(films["digest"]) == 64
    evaluation = profile.report["evaluation"]
    assert evaluation["scheme"] == "leave-one-patient-out"
    assert evaluation["before"]["bootstrap"]["unit"] == "patient"
    for key in ("before", "after"):
        assert evaluation[key]["n_images"] == 9
    acceptance = profile.report["acceptance"]
    assert acceptance["verdict"] in ("pass", "fail", "undecided")
    assert [c["criterion"] for c in acceptance["criteria"]] == ["Normal:recall>=0.99", "ece<=0.9"]
    assert any("Few films" in note for note in profile.report["uncertainty"])
    assert (report / "site_calibration.png").is_file()
    assert json.loads((report / "site_report.json").read_text())["site"] == "st-elsewhere"
    assert "acceptance" in result.output and "NOT FOR CLINICAL USE" in result.output

    listed = runner.invoke(app, ["site", "list", "--bundle", str(bundle), "--site-profiles", str(profiles)])
    assert listed.exit_code == 0, listed.output
    assert listed.output.startswith("st-elsewhere\ttemperature\t9 films")


def test_the_digest_depends_on_films_and_labels_not_on_paths_or_order(bundle, site_films, tmp_path):
    rows = read_rows(site_films)
    moved = tmp_path / "moved"
    shutil.copytree(site_films.parent, moved)
    for row in rows:
        (moved / row["image"]).rename(moved / f"renamed_{row['image']}")
        row["image"] = f"renamed_{row['image']}"
    reordered = write_csv(moved / "labels.csv", list(reversed(rows)))
    relabelled = [dict(row) for row in rows]
    relabelled[0]["label"] = "Normal" if rows[0]["label"] != "Normal" else "COVID-19"
    digests = []
    for i, labels in enumerate((site_films, reordered, write_csv(moved / "relabelled.csv", relabelled))):
        result = calibrate(
            bundle, labels, "--bootstrap", "0", "--out", str(tmp_path / f"r{i}"), profiles=tmp_path / f"p{i}"
        )
        assert result.exit_code == 0, result.output
        digests.append(read_profile(tmp_path / f"p{i}" / "st-elsewhere.json").report["films"]["digest"])
    assert digests[0] == digests[1] != digests[2]


def test_a_second_calibration_needs_replace_and_reuses_the_cached_model_outputs(
    bundle, site_films, tmp_path, monkeypatch
):
    profiles, cache = tmp_path / "profiles", tmp_path / "cache"
    first = calibrate(
        bundle, site_films, "--cache-dir", str(cache), "--out", str(tmp_path / "r"), profiles=profiles
    )
    assert first.exit_code == 0, first.output
    assert len(list(cache.rglob("*.npy"))) == 9
    again = calibrate(bundle, site_films, "--out", str(tmp_path / "r"), profiles=profiles)
    assert again.exit_code == 1 and "--replace" in again.output

    def no_model(self, batch):
        raise AssertionError("the model ran although every film's output was cached")

    monkeypatch.setattr(Predictor, "predict_tensors", no_model)
    replaced = calibrate(
        bundle,
        site_films,
        "--cache-dir",
        str(cache),
        "--method",
        "bias",
        "--replace",
        "--out",
        str(tmp_path / "r"),
        profiles=profiles,
    )
    assert replaced.exit_code == 0, replaced.output
    assert read_profile(profiles / "st-elsewhere.json").calibration.method == "bias"


def test_an_operating_point_is_met_on_the_fitting_films(bundle, site_films, tmp_path):
    result = calibrate(
        bundle,
        site_films,
        "--operating-point",
        "COVID-19:recall>=1",
        "--out",
        str(tmp_path / "r"),
        profiles=tmp_path,
    )
    assert result.exit_code == 0, result.output
    profile = read_profile(tmp_path / "st-elsewhere.json")
    assert profile.calibration.method == "temperature+operating-point"
    assert profile.report["method"]["operating_point"] == {"class": "COVID-19", "recall": 1.0}


def _bad_inputs(folder: Path) -> dict[str, tuple[list[dict[str, str]], str]]:
    rows = read_rows(folder / "labels.csv")
    unknown = [dict(r) for r in rows]
    unknown[4]["label"] = "Flu"
    missing = [dict(r) for r in rows]
    missing[2]["image"] = "gone.png"
    one_class = [dict(r, label="Normal") for r in rows]
    single = [r for r in rows if r["label"] != "Pneumonia"] + [
        next(r for r in rows if r["label"] == "Pneumonia")
    ]
    shutil.copyfile(folder / rows[0]["image"], folder / "copy.png")
    duplicate = [*rows, dict(rows[0], image="copy.png")]
    same_path = [*rows, dict(rows[1])]
    return {
        "unknown class": (unknown, "line 6: label 'Flu' is not one of"),
        "missing file": (missing, "1 film(s) missing (CSV lines 4)"),
        "one class": (one_class, "calibration needs films of at least two classes"),
        "one film of a class": (single, "Pneumonia 1 film(s); each class present needs at least 2"),
        "duplicate content": (duplicate, "lines 2 and 11 are the same film"),
        "duplicate path": (same_path, "lines 3 and 11 are the same film"),
    }


@pytest.mark.parametrize(
    "case",
    [
        "unknown class",
        "missing file",
        "one class",
        "one film of a class",
        "duplicate content",
        "duplicate path",
    ],
)
def test_bad_labels_are_one_clear_error_and_write_nothing(bundle, site_films, tmp_path, case):
    rows, message = _bad_inputs(site_films.parent)[case]
    labels = write_csv(site_films.parent / "bad.csv", rows)
    report = tmp_path / "report"
    result = calibrate(bundle, labels, "--out", str(report), profiles=tmp_path / "profiles")
    assert result.exit_code == 1
    assert message in result.output.replace("\n", " ")
    assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "profiles").exists() and not report.exists()


@pytest.mark.parametrize("site", ["../evil", "a/b", ".hidden"])
def test_a_site_name_with_path_characters_is_refused(bundle, site_films, tmp_path, site):
    result = calibrate(bundle, site_films, "--out", str(tmp_path / "r"), site=site, profiles=tmp_path / "p")
    assert result.exit_code == 1 and "not allowed" in result.output
    assert not (tmp_path / "p").exists() and not (tmp_path / "r").exists()
    assert not (tmp_path / "evil.json").exists()


def test_bad_options_are_refused_before_the_model_runs(bundle, site_films, tmp_path):
    for extra, message in (
        (("--accept", "Normal:recal>=0.8"), "unknown per-class figure"),
        (("--operating-point", "Normal:precision>=0.8"), "expected one CLASS:recall>=R"),
        (("--method", "platt"), "--method"),
        (("--method", "em-prior", "--operating-point", "Normal:recall>=0.8"), "needs labels"),
    ):
        result = calibrate(bundle, site_films, *extra, "--out", str(tmp_path / "r"), profiles=tmp_path / "p")
        assert result.exit_code in (1, 2) and message in result.output, (extra, result.output)
    assert not (tmp_path / "p").exists() and not (tmp_path / "r").exists()


def test_em_prior_uses_the_given_training_shares_and_no_labels(bundle, site_films, tmp_path):
    result = calibrate(
        bundle,
        site_films,
        "--method",
        "em-prior",
        "--training-priors",
        "1,1,1",
        "--out",
        str(tmp_path / "r"),
        profiles=tmp_path,
    )
    assert result.exit_code == 0, result.output
    profile = read_profile(tmp_path / "st-elsewhere.json")
    assert profile.calibration.method == "em-prior"
    assert profile.report["evaluation"]["scheme"].startswith("label-free")


def test_site_list_names_a_damaged_profile(bundle, site_films, tmp_path):
    assert calibrate(bundle, site_films, "--out", str(tmp_path / "r"), profiles=tmp_path / "p").exit_code == 0
    path = tmp_path / "p" / "st-elsewhere.json"
    path.write_text(path.read_text()[:100])
    listed = runner.invoke(
        app, ["site", "list", "--bundle", str(bundle), "--site-profiles", str(tmp_path / "p")]
    )
    assert (
        listed.exit_code == 1 and "st-elsewhere.json" in listed.output and "cannot be read" in listed.output
    )


def test_a_folder_of_dicom_films_with_a_labels_csv(bundle, tmp_path):
    export = tmp_path / "pacs_export"
    export.mkdir()
    rows = []
    for i in range(4):
        pixels = (gradient(12).astype(np.float64) * (0.5 + 0.1 * i)).astype(np.uint16)
        save(make_dataset(pixels, bits_stored=12), export / f"IM{i:04d}")
        rows.append({"image": f"IM{i:04d}", "label": ("Normal", "COVID-19")[i % 2]})
    labels = write_csv(tmp_path / "labels.csv", rows)
    result = calibrate(
        bundle, labels, "--films", str(export), "--out", str(tmp_path / "r"), profiles=tmp_path / "p"
    )
    assert result.exit_code == 0, result.output
    profile = read_profile(tmp_path / "p" / "st-elsewhere.json")
    assert profile.report["films"]["per_class"] == {"COVID-19": 2, "Normal": 2, "Pneumonia": 0}
    assert PATIENT_ID not in (tmp_path / "p" / "st-elsewhere.json").read_text()
    assert PATIENT_ID not in result.output


def test_a_damaged_profile_is_replaced_by_recalibrating(bundle, site_films, tmp_path):
    profiles = tmp_path / "p"
    assert calibrate(bundle, site_films, "--out", str(tmp_path / "r"), profiles=profiles).exit_code == 0
    (profiles / "st-elsewhere.json").write_text("{not json")
    again = calibrate(bundle, site_films, "--replace", "--out", str(tmp_path / "r"), profiles=profiles)
    assert again.exit_code == 0, again.output
    assert read_profile(profiles / "st-elsewhere.json").calibration.method == "temperature"
