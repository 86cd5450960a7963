"""``cxr-monai predict`` over an archive: the listing, the rows against ``Predictor.predict``, bad films,
resume (killed mid-batch, truncated mid-line, torchrun parts left behind), site columns, ONNX Runtime."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from bundle_factory import make_trained_bundle, write_image, write_site_profile
from dicom_factory import PATIENT_ID, PATIENT_NAME, gradient, make_dataset, save
from typer.testing import CliRunner

from cxr_monai.archive import loader as loader_module
from cxr_monai.archive.films import list_archive, list_folder, printable
from cxr_monai.archive.results import ResultFile, columns
from cxr_monai.archive.shards import Shard, part_path, shard_from_env
from cxr_monai.cli import app
from cxr_monai.constants import CLASS_NAMES
from cxr_monai.errors import CXRMonaiError, DatasetError
from cxr_monai.predictor import Predictor

runner = CliRunner()
TESTS = Path(__file__).resolve().parent
INSTITUTION = "St Elsewhere Secret Hospital"
HEADER = columns(CLASS_NAMES)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_trained_bundle(tmp_path_factory.mktemp("bundle"), spatial_size=32)


def make_archive(root: Path, n: int = 9, seed: int = 0) -> Path:
    """``n`` PNG films of different sizes in two folders and a DICOM with an InstitutionName, plus what a
    walk skips (a hidden file, a hidden folder, notes)."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        folder = root / ("north" if i % 2 else "south")
        folder.mkdir(parents=True, exist_ok=True)
        write_image(folder / f"film_{i:02d}.png", 40 + 4 * i, 48, "L" if i % 3 else "RGB", rng)
    ds = make_dataset(gradient(12).astype(np.uint16), bits_stored=12, InstitutionName=INSTITUTION)
    save(ds, root / "north" / "study.dcm")
    (root / "notes.txt").write_text("not a film")
    (root / ".DS_Store").write_bytes(b"junk")
    (root / ".hidden").mkdir()
    write_image(root / ".hidden" / "skipped.png", 40, 40, "L", rng)
    return root


def add_bad_films(root: Path) -> dict[str, str]:
    """A truncated PNG, a non-image, a DICOM without PixelData: {key: a word its reason holds}."""
    good = (root / "south" / "film_00.png").read_bytes()
    (root / "bad").mkdir()
    (root / "bad" / "truncated.png").write_bytes(good[: len(good) // 2])
    (root / "bad" / "report.docx").write_bytes(b"PK\x03\x04 not an image at all" * 20)
    ds = make_dataset(gradient(8), InstitutionName=INSTITUTION)
    del ds.PixelData
    save(ds, root / "bad" / "no_pixels.dcm")
    return {
        "bad/truncated.png": "truncated",
        "bad/report.docx": "not a DICOM, PNG, JPEG or NIfTI image",
        "bad/no_pixels.dcm": "PixelData",
    }


def predict(*args: str | Path):
    return runner.invoke(app, ["predict", *(str(a) for a in args)])


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def probabilities(row: dict[str, str], prefix: str = "probability_") -> list[float]:
    return [float(row[f"{prefix}{name}"]) for name in CLASS_NAMES]


# --- the listing -------------------------------------------------------------------------------------------


def test_the_walk_is_sorted_and_skips_hidden_files_and_documents(tmp_path):
    root = make_archive(tmp_path / "archive", n=4)
    keys = [film.key for film in list_folder(root)]
    assert keys == [
        "north/film_01.png",
        "north/film_03.png",
        "north/study.dcm",
        "south/film_00.png",
        "south/film_02.png",
    ]
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "README.md").write_text("x")
    with pytest.raises(DatasetError, match="no films found"):
        list_folder(tmp_path / "empty")


def test_a_datalist_lists_its_images_once_in_order_relative_to_its_folder(tmp_path):
    (tmp_path / "images").mkdir()
    document = {
        "class_names": list(CLASS_NAMES),
        "training": [{"image": "images/b.png", "label": 0}, {"image": str(tmp_path / "images/a.png")}],
        "test": [{"image": "images/b.png", "label": 1}, {"image": "/elsewhere/c.png"}],
    }
    (tmp_path / "datalist.json").write_text(json.dumps(document))
    root, films = list_archive(tmp_path / "datalist.json")
    assert root == tmp_path
    assert [f.key for f in films] == ["images/b.png", "images/a.png", "/elsewhere/c.png"]
    assert films[0].path == str(tmp_path / "images" / "b.png")
    (tmp_path / "bad.json").write_text(json.dumps({"test": [{"label": 1}]}))
    with pytest.raises(DatasetError, match="test item 0 has no 'image'"):
        list_archive(tmp_path / "bad.json")


def test_keys_stay_on_one_line():
    assert printable("a\nb.png") == "a\\x0ab.png"
    assert printable(os.fsdecode(b"x\xff.png")) == "x\\xff.png"
    assert printable("Bl\u00e5.png") == "Bl\u00e5.png"


def test_ranks_take_whole_batches_in_turn():
    films = list(range(11))
    shares = [Shard(rank, 3).take(films, 2) for rank in range(3)]
    assert shares == [[0, 1, 6, 7], [2, 3, 8, 9], [4, 5, 10]]
    assert sorted(x for share in shares for x in share) == films
    assert shard_from_env({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}) == Shard(1, 2, 1)
    assert shard_from_env({}) == Shard(0, 1, 0)
    with pytest.raises(CXRMonaiError, match="RANK 2 of WORLD_SIZE 2"):
        shard_from_env({"RANK": "2", "WORLD_SIZE": "2"})


# --- rows ---------------------------------------------------------------------------------------------------


def test_rows_equal_the_predictors_for_every_film_with_reader_workers(bundle, tmp_path):
    root = make_archive(tmp_path / "archive")
    out = tmp_path / "out" / "scores.csv"
    result = predict(root, "--bundle", bundle, "--out", out, "--batch-size", "4", "--workers", "2")
    assert result.exit_code == 0, result.output
    rows = read_rows(out)
    assert list(rows[0]) == HEADER
    keys = [film.key for film in list_folder(root)]
    assert [row["path"] for row in rows] == keys
    expected = Predictor.from_bundle(bundle, device="cpu").predict([root / k for k in keys], batch_size=4)
    for row, prediction in zip(rows, expected, strict=True):
        assert probabilities(row) == [float(p) for p in prediction.probabilities]  # bit for bit
        assert probabilities(row, "model_probability_") == [float(p) for p in prediction.model_probabilities]
        assert row["predicted_class"] == prediction.predicted_class
        assert (row["site"], row["site_calibrated"], row["error"]) == ("", "false", "")
    assert f"{len(keys)} of {len(keys)} films of {root} scored, 0 failed" in result.output
    record = json.loads(out.with_name("scores.csv.run.json").read_text())
    assert record["status"] == "complete" and record["counts"] == {"films": 10, "rows": 10, "failed": 0}
    assert record["identity"]["model"]["digest"] == Predictor.from_bundle(bundle).model_digest

    again = predict(root, "--bundle", bundle, "--out", out, "--batch-size", "4")
    assert again.exit_code == 0 and "scoring 0 of 10 films (10 already in" in again.output
    assert read_rows(out) == rows


def test_bad_films_are_listed_with_their_reason_and_the_run_goes_on(bundle, tmp_path, monkeypatch):
    root = make_archive(tmp_path / "archive", n=4)
    reasons = add_bad_films(root)
    (root / "locked").mkdir()
    write_image(root / "locked" / "film.png", 40, 40, "L", np.random.default_rng(1))
    real_scandir = os.scandir

    def scandir(path):  # chmod 000 does not stop root: the walk is refused as it would be
        if Path(path) == root / "locked":
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    out = tmp_path / "scores.csv"
    result = predict(root, "--bundle", bundle, "--out", out, "--batch-size", "3", "--workers", "0")
    assert result.exit_code == 0, result.output
    rows = {row["path"]: row for row in read_rows(out)}
    reasons["locked/"] = "folder cannot be read (Permission denied)"
    for key, word in reasons.items():
        assert word in rows[key]["error"], rows[key]
        assert rows[key]["predicted_class"] == "" and rows[key]["probability_Normal"] == ""
        assert f"failed: {key}: " in result.output
    assert sum(1 for row in rows.values() if not row["error"]) == 5
    assert "5 of 9 films" in result.output and "4 failed" in result.output
    text = out.read_text() + result.output
    assert PATIENT_NAME not in text and PATIENT_ID not in text and INSTITUTION not in text


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root reads a chmod 000 folder")
def test_a_folder_without_permission_is_listed(bundle, tmp_path):
    root = make_archive(tmp_path / "archive", n=2)
    (root / "locked").mkdir()
    write_image(root / "locked" / "film.png", 40, 40, "L", np.random.default_rng(1))
    (root / "locked").chmod(0)
    try:
        result = predict(root, "--bundle", bundle, "--out", tmp_path / "s.csv", "--workers", "0")
    finally:
        (root / "locked").chmod(0o755)
    assert result.exit_code == 0, result.output
    rows = {row["path"]: row for row in read_rows(tmp_path / "s.csv")}
    assert "folder cannot be read" in rows["locked/"]["error"]


# --- resume -------------------------------------------------------------------------------------------------

_KILLER = """
import os, signal, sys
from cxr_monai.archive import results

batches = int(os.environ["KILL_AFTER_BATCHES"])
real_append = results.ResultFile.append


def append(self, rows):
    global batches
    if batches == 0:  # killed mid-write: half a line of this batch on disk, then SIGKILL
        line = ",".join(rows[0])
        self._handle.write(line[: len(line) // 2])
        self._handle.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    batches -= 1
    real_append(self, rows)


results.ResultFile.append = append
from cxr_monai.cli import app

app(sys.argv[1:])
"""


def _cli_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}


def test_a_run_killed_mid_batch_resumes_without_duplicates_or_gaps(bundle, tmp_path):
    root = make_archive(tmp_path / "archive", n=13)
    add_bad_films(root)
    options = ["--bundle", str(bundle), "--batch-size", "3", "--workers", "0"]
    reference = tmp_path / "reference.csv"
    assert predict(root, *options, "--out", reference).exit_code == 0

    out = tmp_path / "scores.csv"
    script = tmp_path / "killer.py"
    script.write_text(_KILLER)
    command = [sys.executable, str(script), "predict", str(root), *options, "--out", str(out)]
    killed = subprocess.run(
        command, env={**_cli_env(), "KILL_AFTER_BATCHES": "2"}, capture_output=True, text=True, timeout=300
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    data = out.read_bytes()
    assert not data.endswith(b"\n") and data.count(b"\n") == 1 + 2 * 3  # header, two batches, half a line

    result = predict(root, *options, "--out", out)
    assert result.exit_code == 0, result.output
    assert "scoring 11 of 17 films (6 already in" in result.output
    assert out.read_text() == reference.read_text()  # every film once, in order, the same numbers


def test_a_truncated_last_line_is_dropped_and_its_film_scored_again(bundle, tmp_path):
    root = make_archive(tmp_path / "archive", n=6)
    out = tmp_path / "scores.csv"
    options = ["--bundle", str(bundle), "--out", str(out), "--batch-size", "2", "--workers", "0"]
    assert predict(root, *options).exit_code == 0
    complete = out.read_text()
    lines = complete.splitlines(keepends=True)
    out.write_text("".join(lines[:4]) + lines[4][:10])
    result = predict(root, *options)
    assert result.exit_code == 0 and "scoring 4 of 7 films (3 already in" in result.output
    assert out.read_text() == complete


def test_parts_left_by_a_killed_torchrun_run_are_merged_once(bundle, tmp_path):
    root = make_archive(tmp_path / "archive", n=8)
    out = tmp_path / "scores.csv"
    options = ["--bundle", str(bundle), "--out", str(out), "--batch-size", "2", "--workers", "0"]
    assert predict(root, *options).exit_code == 0
    complete = out.read_text()
    record = out.with_name("scores.csv.run.json").read_text()
    header, *rows = complete.splitlines(keepends=True)
    # rank 0 had written batches 0 and 2 (the second one half), rank 1 batch 1 and the first of batch 3
    part_path(out, 0).write_text(header + "".join(rows[0:2]) + rows[4] + rows[5][:7])
    part_path(out, 1).write_text(header + "".join(rows[2:4]) + rows[6])
    out.write_text(header + "".join(rows[2:4]))  # merged before, but the parts were not removed
    out.with_name("scores.csv.run.json").write_text(record)
    result = predict(root, *options)
    assert result.exit_code == 0, result.output
    assert "scoring 3 of 9 films (6 already in" in result.output
    assert out.read_text() == complete
    assert not list(tmp_path.glob(".scores.csv.rank*"))


def test_an_output_of_another_model_is_not_resumed(bundle, tmp_path):
    root = make_archive(tmp_path / "archive", n=3)
    out = tmp_path / "scores.csv"
    assert predict(root, "--bundle", bundle, "--out", out, "--workers", "0").exit_code == 0
    other = make_trained_bundle(tmp_path / "other", spatial_size=32, seed=1)
    result = predict(root, "--bundle", other, "--out", out, "--workers", "0")
    assert result.exit_code == 1 and "holds rows made with other settings (model differ)" in result.output
    ResultFile(out, HEADER).read()  # untouched
    (tmp_path / "foreign.csv").write_text("a,b\n1,2\n")
    result = predict(root, "--bundle", bundle, "--out", tmp_path / "foreign.csv")
    assert result.exit_code == 1 and "exists with other columns" in result.output
    out.with_name("scores.csv.run.json").unlink()
    result = predict(root, "--bundle", bundle, "--out", out, "--workers", "0")
    assert result.exit_code == 1 and "no run record (scores.csv.run.json)" in result.output


def test_a_resume_needs_the_same_profile_of_the_films_site_only(bundle, tmp_path):
    root = make_archive(tmp_path / "archive", n=3)
    profiles, out = tmp_path / "sites", tmp_path / "scores.csv"
    write_site_profile(profiles, bundle, "north", 1)
    options = ["--bundle", str(bundle), "--site-profiles", str(profiles), "--site", "north"]
    options += ["--out", str(out), "--workers", "0"]
    assert predict(root, *options).exit_code == 0
    write_site_profile(profiles, bundle, "south", 2)  # another site's new profile
    assert predict(root, *options).exit_code == 0
    write_site_profile(profiles, bundle, "north", 2)  # recalibrated: rows would mix two calibrations
    result = predict(root, *options)
    assert result.exit_code == 1 and "(site_profiles_sha256 differ)" in result.output


def test_retry_failed_scores_a_repaired_film_in_its_place(bundle, tmp_path):
    root = make_archive(tmp_path / "archive", n=4)
    add_bad_films(root)
    out = tmp_path / "scores.csv"
    options = ["--bundle", str(bundle), "--out", str(out), "--workers", "0"]
    assert predict(root, *options).exit_code == 0
    shutil.copy(root / "south" / "film_00.png", root / "bad" / "truncated.png")
    assert predict(root, *options).exit_code == 0
    assert read_rows(out)[2]["error"]  # still failed: a rerun skips films that have a row
    result = predict(root, *options, "--retry-failed")
    assert result.exit_code == 0 and "scoring 3 of 8 films (5 already in" in result.output
    rows = read_rows(out)
    assert [row["path"] for row in rows] == [film.key for film in list_folder(root)]
    assert rows[2]["path"] == "bad/truncated.png" and rows[2]["error"] == ""
    assert rows[2]["model_probability_Normal"] == rows[-2]["model_probability_Normal"]


def test_unit_repair_cuts_only_a_partial_line(tmp_path):
    target = ResultFile(tmp_path / "x.csv", ["path", "error"])
    target.append([["a", ""], ["b, with comma", "why"]])
    target.close()
    whole = target.path.read_bytes()
    assert target.repair() == 0 and target.path.read_bytes() == whole
    target.path.write_bytes(whole + b'"c,')
    assert target.repair() == 3 and target.read() == [["a", ""], ["b, with comma", "why"]]
    target.path.write_bytes(b"pa")
    assert target.repair() == 2 and target.read() == []


# --- sites --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def profiles(bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("sites")
    write_site_profile(folder, bundle, "north", 1)  # calibrated films are called Normal
    return folder


def test_site_columns_calibrated_flagged_by_institution_and_refused(bundle, profiles, tmp_path):
    root = make_archive(tmp_path / "archive", n=4)
    keys = [film.key for film in list_folder(root)]
    predictor = Predictor.from_bundle(bundle, device="cpu", site_profiles=profiles)
    options = [
        "--bundle",
        str(bundle),
        "--site-profiles",
        str(profiles),
        "--workers",
        "0",
        "--batch-size",
        "8",
    ]

    result = predict(root, *options, "--site", "north", "--out", tmp_path / "north.csv")
    assert result.exit_code == 0, result.output
    rows = read_rows(tmp_path / "north.csv")
    expected = predictor.predict([root / k for k in keys], batch_size=8, site="north")
    for row, prediction in zip(rows, expected, strict=True):
        assert (row["site"], row["site_calibrated"], row["predicted_class"]) == ("north", "true", "Normal")
        assert probabilities(row) == [float(p) for p in prediction.probabilities]
        assert probabilities(row, "model_probability_") == [float(p) for p in prediction.model_probabilities]

    result = predict(root, *options, "--site", "south", "--out", tmp_path / "south.csv")
    assert result.exit_code == 0 and "site south has no calibration profile" in result.output
    rows = read_rows(tmp_path / "south.csv")
    assert {(r["site"], r["site_calibrated"]) for r in rows} == {("south", "false")}
    assert all(probabilities(r) == probabilities(r, "model_probability_") for r in rows)
    assert "5 not calibrated for their site" in result.output

    site_map = tmp_path / "sites.json"
    site_map.write_text(json.dumps({"institution_names": {INSTITUTION: "north"}}))
    result = predict(
        root, *options, "--site-from-institution", site_map, "--out", tmp_path / "map.csv"
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    rows = {row["path"]: row for row in read_rows(tmp_path / "map.csv")}
    assert (rows["north/study.dcm"]["site"], rows["north/study.dcm"]["site_calibrated"]) == ("north", "true")
    assert {(r["site"], r["site_calibrated"]) for k, r in rows.items() if k != "north/study.dcm"} == {
        ("", "false")
    }
    map_out = tmp_path / "refused.csv"
    result = predict(
        root, *options, "--site-from-institution", site_map, "--unknown-site", "refuse", "--out", map_out
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    rows = {row["path"]: row for row in read_rows(map_out)}
    assert rows["north/study.dcm"]["error"] == "" and rows["north/study.dcm"]["predicted_class"] == "Normal"
    refused = [r for k, r in rows.items() if k != "north/study.dcm"]
    assert len(refused) == 4 and all("no calibration profile" in r["error"] for r in refused)
    assert INSTITUTION not in map_out.read_text() + result.output

    result = predict(root, *options, "--unknown-site", "refuse", "--out", tmp_path / "none.csv")
    assert result.exit_code == 1 and "no calibration profile" in result.output
    assert not (tmp_path / "none.csv").exists()
    result = predict(root, *options, "--unknown-site", "maybe", "--out", tmp_path / "x.csv")
    assert result.exit_code == 2 and "flag or refuse" in result.output


# --- ONNX Runtime ----------------------------------------------------------------------------------------


def test_the_onnx_backend_agrees_with_eager(bundle, tmp_path):
    pytest.importorskip("onnxruntime")
    root = make_archive(tmp_path / "archive", n=5)
    eager, onnx = tmp_path / "eager.csv", tmp_path / "onnx.csv"
    assert predict(root, "--bundle", bundle, "--out", eager, "--workers", "0").exit_code == 0
    result = predict(root, "--bundle", bundle, "--out", onnx, "--backend", "onnx", "--workers", "0")
    assert result.exit_code == 0, result.output
    for a, b in zip(read_rows(eager), read_rows(onnx), strict=True):
        assert a["path"] == b["path"] and a["predicted_class"] == b["predicted_class"]
        assert probabilities(a) == pytest.approx(probabilities(b), abs=1e-5)
    result = predict(root, "--bundle", bundle, "--out", onnx, "--workers", "0")
    assert result.exit_code == 1 and "(backend differ)" in result.output
    result = predict(root, "--bundle", bundle, "--out", eager, "--onnx", eager)
    assert result.exit_code == 2 and "--onnx needs --backend onnx" in result.output


@pytest.mark.slow  # a dead reader is noticed when its batch is 5 s late
def test_a_film_that_kills_its_reader_process_is_listed_and_the_others_scored(bundle, tmp_path, monkeypatch):
    """A decoder that crashes (segfaults) kills the DataLoader worker, not just raises: the films it may
    have held are read again one by one, each in its own process, and the one that kills it is failed."""
    root = make_archive(tmp_path / "archive", n=12)
    shutil.copy(root / "south" / "film_00.png", root / "north" / "film_05b.png")
    real_read = loader_module.read_cxr

    def crashing_read(path, *args, **kwargs):
        if str(path).endswith("film_05b.png"):
            os.kill(os.getpid(), signal.SIGKILL)
        return real_read(path, *args, **kwargs)

    monkeypatch.setattr(loader_module, "read_cxr", crashing_read)
    out = tmp_path / "scores.csv"
    options = ["--bundle", str(bundle), "--batch-size", "2", "--workers", "2"]
    result = predict(root, *options, "--out", out)
    assert result.exit_code == 0, result.output
    rows = read_rows(out)
    monkeypatch.setattr(loader_module, "read_cxr", real_read)
    assert predict(root, *options, "--out", tmp_path / "reference.csv").exit_code == 0
    reference = read_rows(tmp_path / "reference.csv")
    assert [row["path"] for row in rows] == [row["path"] for row in reference]
    for row, expected in zip(rows, reference, strict=True):
        if row["path"] == "north/film_05b.png":
            assert row["error"] == "the image reader crashed on this film (its process died)"
            continue
        assert row["error"] == "" and row["predicted_class"] == expected["predicted_class"]
        assert probabilities(row) == pytest.approx(probabilities(expected), rel=1e-5)
