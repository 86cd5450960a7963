"""``cxr-monai explain`` end to end on a tiny trained bundle: DICOM + PNG inputs, failures, options."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from typer.testing import CliRunner

from cxr_monai.cli import app
from cxr_monai.explain.gradcam import Explainer
from cxr_monai.io import read_cxr
from cxr_monai.predictor import Predictor
from tests.bundle_factory import make_trained_bundle
from tests.dicom_factory import PATIENT_ID, PATIENT_NAME, gradient, make_dataset, save

runner = CliRunner()


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return make_trained_bundle(tmp_path_factory.mktemp("bundle"), spatial_size=32)


@pytest.fixture
def inputs(tmp_path) -> Path:
    """A folder with a non-square DICOM (48 x 64, pixel spacing), a non-square PNG and a broken file."""
    folder = tmp_path / "in"
    folder.mkdir()
    ds = make_dataset(gradient(12).astype(np.uint16), bits_stored=12, PixelSpacing=[0.2, 0.2])
    save(ds, folder / "study.dcm")
    Image.fromarray(gradient(8)[:, :40]).save(folder / "film.png")
    (folder / "broken.dcm").write_bytes(b"DICM this is not an image" * 10)
    return folder


def run(*args: str, env: dict[str, str] | None = None):
    return runner.invoke(app, list(args), env=env)


def test_explain_writes_png_json_dcm_and_reports_the_broken_file(bundle, inputs, tmp_path):
    out = tmp_path / "out"
    result = run("explain", str(inputs), "--bundle", str(bundle), "--out", str(out))
    assert result.exit_code == 1, result.output
    assert "broken.dcm" in result.output
    assert PATIENT_NAME not in result.output and PATIENT_ID not in result.output
    names = sorted(p.name for p in out.iterdir())
    assert names == ["film.json", "film_gradcam.png", "study.json", "study_gradcam.dcm", "study_gradcam.png"]

    umask = os.umask(0)
    os.umask(umask)
    assert all((p.stat().st_mode & 0o777) == 0o666 & ~umask for p in out.iterdir())  # not mkstemp's 0600

    report = json.loads((out / "study.json").read_text())
    assert set(report["probabilities"]) == {"COVID-19", "Normal", "Pneumonia"}
    assert sum(report["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
    assert report["predicted_class"] == max(report["probabilities"], key=report["probabilities"].get)
    assert report["model"] == {
        "name": "Tiny test classifier",
        "version": "0.0.1",
        "backbone": "tiny_cnn",
        "spatial_size": 32,
    }
    # Peak and area of the map on the original 48 x 64 pixels (not the 32 x 32 network grid): Grad-CAM of
    # the same file and bundle, normalised to its maximum, measured here.
    predictor = Predictor.from_bundle(bundle, device="cpu")
    [explained] = Explainer(predictor.model, predictor.preprocess).explain([read_cxr(inputs / "study.dcm")])
    assert explained.raw_map.max() > 0
    heat = explained.raw_map / explained.raw_map.max()
    assert heat.shape == (48, 64)
    assert report["heatmap"]["peak_row_col"] == list(np.unravel_index(int(np.argmax(heat)), heat.shape))
    assert report["heatmap"]["fraction_above_0.5"] == pytest.approx(float(np.mean(heat > 0.5)))
    assert "NOT FOR CLINICAL USE" in report["intended_use"]
    assert report["secondary_capture"]["written"] is True
    assert report["secondary_capture"]["patient_orientation_basis"] == "view_position"  # PA, no orientation

    png = np.asarray(Image.open(out / "study_gradcam.png"))
    assert png.shape[0] > 48 and png.shape[1:] == (64, 3)  # a small film: the text in a strip below it
    film_png = np.asarray(Image.open(out / "film_gradcam.png"))
    assert film_png.shape[0] > 48 and film_png.shape[1:] == (40, 3)
    film = json.loads((out / "film.json").read_text())
    assert film["secondary_capture"]["written"] is False
    assert "no source study" in film["secondary_capture"]["reason"]

    source = pydicom.dcmread(inputs / "study.dcm")
    sc = pydicom.dcmread(out / "study_gradcam.dcm")
    assert sc.StudyInstanceUID == source.StudyInstanceUID
    assert sc.SeriesInstanceUID != source.SeriesInstanceUID
    assert (sc.Rows, sc.Columns) == (48, 64)  # the source's grid, text burned in
    if shutil.which("dciodvfy"):
        check = subprocess.run(["dciodvfy", str(out / "study_gradcam.dcm")], capture_output=True, text=True)
        assert not [line for line in (check.stdout + check.stderr).splitlines() if line.startswith("Error")]


def test_a_file_whose_dicom_output_cannot_be_built_leaves_no_partial_outputs(bundle, inputs, tmp_path):
    ds = make_dataset(gradient(12).astype(np.uint16), bits_stored=12)
    del ds.StudyInstanceUID
    save(ds, inputs / "nostudy.dcm")
    out = tmp_path / "out"
    result = run("explain", str(inputs), "--bundle", str(bundle), "--out", str(out))
    assert result.exit_code == 1
    assert "nostudy.dcm" in result.output and "StudyInstanceUID" in result.output
    names = sorted(p.name for p in out.iterdir())
    assert not [n for n in names if n.startswith("nostudy")]  # neither PNG nor JSON nor DICOM
    assert "study.json" in names and "study_gradcam.png" in names  # the others still go through
    without_dicom = run("explain", str(inputs / "nostudy.dcm"), "--bundle", str(bundle), "--out", str(out),
                        "--format", "png,json")  # fmt: skip
    assert without_dicom.exit_code == 0, without_dicom.output
    assert {"nostudy.json", "nostudy_gradcam.png"} <= {p.name for p in out.iterdir()}


def test_a_failed_write_removes_the_outputs_already_written(bundle, inputs, tmp_path, monkeypatch):
    import cxr_monai.explain.files as files

    real = files.atomic_path
    calls = {"n": 0}

    def failing_second(path):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(28, "No space left on device")
        return real(path)

    monkeypatch.setattr(files, "atomic_path", failing_second)
    out = tmp_path / "out"
    result = run("explain", str(inputs / "study.dcm"), "--bundle", str(bundle), "--out", str(out))
    assert result.exit_code == 1 and "No space left" in result.output
    assert not out.exists() or list(out.iterdir()) == []


def test_all_good_inputs_exit_zero_with_named_class_and_formats(bundle, inputs, tmp_path):
    out = tmp_path / "out"
    files = [str(inputs / "study.dcm"), str(inputs / "film.png")]
    result = run("explain", *files, "--bundle", str(bundle), "--out", str(out), "--class", "pneumonia",
                 "--format", "json,png")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == [
        "film.json",
        "film_gradcam.png",
        "study.json",
        "study_gradcam.png",
    ]
    assert json.loads((out / "study.json").read_text())["explained_class"] == "Pneumonia"


def test_bundle_from_environment_and_missing_bundle_is_a_one_line_error(bundle, inputs, tmp_path):
    png = str(inputs / "film.png")
    missing = run("explain", png, "--out", str(tmp_path / "a"), env={"CXR_MONAI_BUNDLE": ""})
    assert missing.exit_code == 1
    assert "--bundle" in missing.output and len(missing.output.strip().splitlines()) == 1
    from_env = run("explain", png, "--out", str(tmp_path / "b"), env={"CXR_MONAI_BUNDLE": str(bundle)})
    assert from_env.exit_code == 0, from_env.output
    assert (tmp_path / "b" / "film_gradcam.png").is_file()


def test_bad_options_fail_cleanly(bundle, inputs, tmp_path):
    png = str(inputs / "film.png")
    out = tmp_path / "out"
    bad_format = run("explain", png, "--bundle", str(bundle), "--out", str(out), "--format", "gif")
    assert bad_format.exit_code == 2 and "--format" in bad_format.output
    bad_class = run("explain", png, "--bundle", str(bundle), "--out", str(out), "--class", "flu")
    assert bad_class.exit_code == 1 and "COVID-19" in bad_class.output
    no_bundle = run("explain", png, "--bundle", str(tmp_path / "nowhere"), "--out", str(out))
    assert no_bundle.exit_code == 1 and "nowhere" in no_bundle.output
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.integration
def test_real_dicom_files_give_dciodvfy_clean_secondary_captures(bundle, shared_data, tmp_path):
    """The four real films (CR MONOCHROME1 raw data set, CR JPEG baseline, DX) end to end."""
    out = tmp_path / "out"
    result = run("explain", str(shared_data / "dicom"), "--bundle", str(bundle), "--out", str(out))
    assert result.exit_code == 0, result.output
    sources = sorted((shared_data / "dicom").glob("*.dcm"))
    assert len(sources) == 4
    for source_path in sources:
        source = pydicom.dcmread(source_path, force=True, stop_before_pixels=True)
        sc_path = out / f"{source_path.stem}_gradcam.dcm"
        sc = pydicom.dcmread(sc_path)
        assert sc.StudyInstanceUID == source.StudyInstanceUID
        assert (sc.Rows, sc.Columns) == (source.Rows, source.Columns)
        assert json.loads((out / f"{source_path.stem}.json").read_text())["secondary_capture"]["written"]
        if shutil.which("dciodvfy"):
            check = subprocess.run(["dciodvfy", str(sc_path)], capture_output=True, text=True)
            errors = [line for line in (check.stdout + check.stderr).splitlines() if line.startswith("Error")]
            assert errors == [], f"{source_path.name}: {errors}"


def test_output_names_never_collide() -> None:
    from cxr_monai.explain.files import unique_names

    paths = [Path("x/a.png"), Path("y/a.png"), Path("z/a_2.png"), Path("w/a.dcm")]
    names = unique_names(paths)
    assert len(set(names)) == len(names)
    assert names[0] == "a" and names[2].startswith("a_2")


def test_inputs_are_checked_before_the_bundle_is_loaded(inputs, tmp_path):
    """A mistyped path or an empty folder is named at once; the (missing) bundle is never opened."""
    nowhere = str(tmp_path / "no-bundle")
    missing = run("explain", str(inputs / "film.png"), "scans/typo.dcm", "--bundle", nowhere)
    assert missing.exit_code == 1
    assert "scans/typo.dcm" in missing.output and "no-bundle" not in missing.output
    empty = tmp_path / "empty"
    (empty / ".hidden").mkdir(parents=True)
    (empty / "notes.txt").write_text("not an image")
    none_found = run("explain", str(empty), "--bundle", nowhere)
    assert none_found.exit_code == 1
    assert f"no input files found in {empty}" in none_found.output and "no-bundle" not in none_found.output


def test_failures_name_each_input_by_the_path_given(bundle, inputs, tmp_path, monkeypatch):
    monkeypatch.chdir(inputs.parent)
    result = run("explain", "in", "--bundle", str(bundle), "--out", str(tmp_path / "out"))
    assert result.exit_code == 1
    failed = [line for line in result.output.splitlines() if line.startswith("failed:")]
    assert len(failed) == 1 and failed[0].startswith(f"failed: {Path('in') / 'broken.dcm'}: not ")


def test_warnings_that_matter_for_the_result_are_printed_one_line_per_file(bundle, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    save(make_dataset(gradient(12).astype(np.uint16), bits_stored=12, ViewPosition="LL"), folder / "lat.dcm")
    save(make_dataset(gradient(12).astype(np.uint16), bits_stored=12, Modality="CT", BodyPartExamined="HEAD"),
         folder / "ct.dcm")  # fmt: skip
    save(make_dataset(gradient(12).astype(np.uint16), bits_stored=12), folder / "fine.dcm")
    result = run("explain", str(folder), "--bundle", str(bundle), "--out", str(tmp_path / "out"))
    assert result.exit_code == 0, result.output
    warned = [line for line in result.output.splitlines() if line.startswith("warning:")]
    assert len(warned) == 2
    lateral = next(line for line in warned if "lat.dcm" in line)
    ct = next(line for line in warned if "ct.dcm" in line)
    assert "lateral" in lateral
    assert "Modality is CT" in ct and "BodyPartExamined is HEAD" in ct
    assert not any("fine.dcm" in line for line in warned)


def _ink_runs(mask: np.ndarray) -> list[int]:
    """Heights (pixels) of the runs of consecutive rows of ``mask`` (rows, cols) holding any ink."""
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return []
    breaks = np.flatnonzero(np.diff(rows) > 1)
    starts, ends = np.r_[rows[0], rows[breaks + 1]], np.r_[rows[breaks], rows[-1]]
    return list(ends - starts + 1)


LINES = [
    "Predicted: COVID-19   (COVID-19 0.81  Normal 0.07  Pneumonia 0.12)",
    "Warning: ViewPosition is LL (lateral); this model expects a frontal (PA or AP) view",
    "Research use only - NOT FOR CLINICAL USE",
]


def _dark_film(side: int) -> tuple[np.ndarray, np.ndarray]:
    """A dark film (white appears only where text is drawn) with a hot spot near its centre."""
    yy, xx = np.mgrid[0:side, 0:side] / side
    film = 30.0 + 10.0 * xx  # not flat: min-max scaling would make a flat film black
    heat = np.exp(-((yy - 0.6) ** 2 + (xx - 0.5) ** 2) / 0.01).astype(np.float32)
    return film, heat


def test_a_small_film_keeps_its_pixels_and_gets_legible_text_in_a_strip_below() -> None:
    from cxr_monai.explain.overlay import MIN_TEXT_PX, blend, render_captioned

    film, heat = _dark_film(440)
    picture = render_captioned(film, heat, LINES)
    assert picture.shape[1:] == (440, 3) and picture.shape[0] > 440
    # the film area is the film with the map, untouched by text (the colour bar sits at the right edge)
    np.testing.assert_array_equal(picture[:440, :300], blend(film, heat)[:, :300])
    strip_ink = _ink_runs((picture[440:] > 200).all(axis=2))
    assert len(strip_ink) >= len(LINES)  # wrapped lines, all in the strip
    assert max(strip_ink) >= 0.7 * MIN_TEXT_PX  # capitals about 10 px: words do not run together


def test_a_large_film_gets_large_text_on_it_and_no_strip() -> None:
    from cxr_monai.explain.overlay import blend, render_captioned, render_overlay

    film, heat = _dark_film(3000)
    picture = render_captioned(film, heat, LINES)
    np.testing.assert_array_equal(picture, render_overlay(film, heat, LINES))  # same as the SC's picture
    assert picture.shape == (3000, 3000, 3)
    runs = _ink_runs((picture[:600, :2000] > 200).all(axis=2))
    assert len(runs) == len(LINES) and min(runs) >= 40  # about 66 px type on a 3000 px film
    drawn = (picture[:, -200:] != blend(film, heat)[:, -200:]).any(axis=2).any(axis=0)
    assert drawn.sum() >= 3000 // 40  # the colour bar (and its labels) grow with the film
