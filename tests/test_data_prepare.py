"""``assemble_dataset`` and the ``cxr-monai prepare`` command on tiny layouts the tests write."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from data_layouts import synthetic_public_data, write_image
from PIL import Image
from typer.testing import CliRunner

from cxr_monai.cli import app
from cxr_monai.constants import CLASS_NAMES
from cxr_monai.data import (
    FIGURE_FILENAME,
    PrepareOptions,
    assemble_dataset,
    load_datalist,
    site_csv,
    write_prepared,
)
from cxr_monai.errors import DatasetError

runner = CliRunner()


@pytest.fixture(scope="module")
def public(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return synthetic_public_data(tmp_path_factory.mktemp("public"), patients_per_class=12)


def write_site_csv(folder: Path, name: str, patients: int, labels: tuple[str, ...]) -> Path:
    """A site CSV of ``patients`` patients per label, two images each, images beside the CSV."""
    path = folder / f"{name}.csv"
    folder.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "label", "patient_id"])
        for label in labels:
            for patient in range(patients):
                for k in range(2):
                    image = f"{label}/{patient}-{k}.png"
                    write_image(folder / image)
                    writer.writerow([image, label, f"{label}{patient}"])
    return path


def test_items_carry_every_field(public: tuple[Path, Path]) -> None:
    covid, kaggle = public
    prepared = assemble_dataset(PrepareOptions(covid_dir=covid, kaggle_dir=kaggle))
    items = prepared.datalist["training"] + prepared.datalist["test"]
    assert {item["source"] for item in items} == {"covid-chestxray-dataset", "kaggle-chest-xray"}
    for item in items:
        assert Path(item["image"]).is_absolute() and Path(item["image"]).is_file()
        assert CLASS_NAMES[item["label"]] == item["label_name"]
        if item["source"] == "covid-chestxray-dataset":
            assert item["patient_id"].startswith("covid:") and item["view"] in ("PA", "AP", "AP Supine")
            assert isinstance(item["offset"], int)
        else:
            assert item["patient_id"].startswith("kaggle:") and "offset" not in item and "view" not in item
    assert all(isinstance(item["fold"], int) for item in prepared.datalist["training"])


def test_summary_records_counts_options_versions_and_warnings(public: tuple[Path, Path]) -> None:
    covid, kaggle = public
    prepared = assemble_dataset(PrepareOptions(covid_dir=covid, kaggle_dir=kaggle, n_normal=10, seed=7))
    summary = prepared.summary
    assert summary["options"]["n_normal"] == 10 and summary["options"]["seed"] == 7
    assert summary["options"]["covid_dir"] == str(covid)
    assert summary["versions"]["cxr-monai"] and summary["versions"]["scikit-learn"]
    assert summary["per_class"]["Normal"] == {"requested": 10, "available": 18, "taken": 10}
    assert summary["per_class"]["COVID-19"]["requested"] is None
    assert summary["counts"]["images"]["Normal"]["total"] == 10
    assert summary["sources"]["covid-chestxray-dataset"] == {
        "eligible": 24,
        "found": 24,
        "missing": 0,
        "listing": "metadata.csv",
        "missing_lines": [],
        "skipped_findings": {},
    }
    assert summary["warnings"] == prepared.warnings
    assert any("Pneumonia: only 18 images" in w for w in prepared.warnings)
    assert any("different sources" in w for w in prepared.warnings)


def test_same_options_give_the_same_datalist(public: tuple[Path, Path]) -> None:
    covid, kaggle = public
    options = PrepareOptions(covid_dir=covid, kaggle_dir=kaggle, n_normal=12, seed=3)
    assert assemble_dataset(options).datalist == assemble_dataset(options).datalist
    other = PrepareOptions(covid_dir=covid, kaggle_dir=kaggle, n_normal=12, seed=4)
    assert assemble_dataset(other).datalist != assemble_dataset(options).datalist


def test_site_csvs_combine_with_public_sources(tmp_path: Path, public: tuple[Path, Path]) -> None:
    covid, kaggle = public
    site = write_site_csv(tmp_path / "site", "hospital", patients=6, labels=CLASS_NAMES)
    prepared = assemble_dataset(PrepareOptions(covid_dir=covid, kaggle_dir=kaggle, site_csvs=(site,)))
    items = prepared.datalist["training"] + prepared.datalist["test"]
    site_items = [item for item in items if item["source"] == "site:hospital"]
    assert len(site_items) == 6 * 2 * 3
    assert all(item["patient_id"].startswith("hospital:") for item in site_items)
    assert not any("different sources" in w for w in prepared.warnings), "every class has a shared source"


def test_site_csv_alone(tmp_path: Path) -> None:
    site = write_site_csv(tmp_path, "clinic", patients=8, labels=("Normal", "Pneumonia"))
    prepared = assemble_dataset(PrepareOptions(site_csvs=(site,), folds=3))
    assert prepared.summary["counts"]["images"]["Total"]["total"] == 32
    assert "no COVID-19 images in the given sources" in prepared.warnings


def test_duplicate_images_are_kept_once(tmp_path: Path, public: tuple[Path, Path]) -> None:
    covid, kaggle = public
    image = next((kaggle / "train" / "NORMAL").iterdir())
    site = tmp_path / "dup.csv"
    site.write_text(f"image,label,patient_id\n{image},Normal,x\n")
    prepared = assemble_dataset(PrepareOptions(covid_dir=covid, kaggle_dir=kaggle, site_csvs=(site,)))
    images = [item["image"] for item in prepared.datalist["training"] + prepared.datalist["test"]]
    assert images.count(str(image)) == 1
    assert "1 image path(s) listed more than once; each kept once" in prepared.warnings


def test_source_errors(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="no data source given"):
        assemble_dataset(PrepareOptions())
    a = write_site_csv(tmp_path / "a", "site", patients=5, labels=("Normal",))
    b = write_site_csv(tmp_path / "b", "site", patients=5, labels=("Normal",))
    with pytest.raises(DatasetError, match="distinct names"):
        assemble_dataset(PrepareOptions(site_csvs=(a, b)))


def test_cli_writes_datalist_and_summary(tmp_path: Path, public: tuple[Path, Path]) -> None:
    covid, kaggle = public
    out = tmp_path / "new" / "prep"
    args = ["prepare", "--covid-dir", str(covid), "--kaggle-dir", str(kaggle), "--out", str(out)]
    result = runner.invoke(
        app, [*args, "--n-normal", "10", "--n-covid", "all", "--folds", "3", "--seed", "2"]
    )
    assert result.exit_code == 0, result.output
    datalist = load_datalist(out / "datalist.json")
    assert datalist["num_folds"] == 3 and datalist["seed"] == 2
    summary = json.loads((out / "prepare_summary.json").read_text())
    assert summary["datalist"] == str((out / "datalist.json").resolve())
    assert summary["counts"]["images"]["Normal"]["total"] == 10
    assert str(out / "datalist.json") in result.stdout
    assert "Images per class and split" in result.output and "warning:" in result.output
    assert sorted(p.name for p in out.iterdir()) == [
        "datalist.json",
        "dataset_summary.png",
        "near_duplicate_cache",
        "prepare_summary.json",
    ]
    assert "Images per source and class" in result.output and "Near-duplicates" in result.output


def test_cli_views_option(tmp_path: Path, public: tuple[Path, Path]) -> None:
    covid, kaggle = public
    args = ["prepare", "--covid-dir", str(covid), "--kaggle-dir", str(kaggle), "--out", str(tmp_path)]
    result = runner.invoke(app, [*args, "--views", "PA, AP", "--test-fraction", "0.25", "--folds", "2"])
    assert result.exit_code == 0, result.output
    datalist = load_datalist(tmp_path / "datalist.json")
    views = {item.get("view") for item in datalist["training"] + datalist["test"]}
    assert views == {"PA", "AP", None}


def test_cli_without_a_source_exits_1_with_one_line(tmp_path: Path) -> None:
    result = runner.invoke(app, ["prepare", "--out", str(tmp_path / "out")])
    assert result.exit_code == 1
    assert result.output.strip().count("\n") == 0
    assert "no data source given" in result.output
    assert not (tmp_path / "out").exists()


def test_cli_bad_layout_names_what_was_expected(tmp_path: Path) -> None:
    result = runner.invoke(app, ["prepare", "--kaggle-dir", str(tmp_path), "--out", str(tmp_path / "out")])
    assert result.exit_code == 1
    assert "{train,val,test}/{NORMAL,PNEUMONIA}/" in result.output
    result = runner.invoke(app, ["prepare", "--covid-dir", str(tmp_path), "--out", str(tmp_path / "out")])
    assert result.exit_code == 1 and "metadata.csv" in result.output


def test_cli_impossible_split_is_exit_1(tmp_path: Path, public: tuple[Path, Path]) -> None:
    covid, kaggle = public
    args = ["prepare", "--covid-dir", str(covid), "--kaggle-dir", str(kaggle), "--out", str(tmp_path / "o")]
    result = runner.invoke(app, [*args, "--folds", "20"])
    assert result.exit_code == 1 and "--folds" in result.output
    # no outputs on error; the fingerprint cache stays, so that the corrected run fingerprints nothing again
    assert [p.name for p in (tmp_path / "o").iterdir()] == ["near_duplicate_cache"]


def test_cli_bad_count_is_a_usage_error(tmp_path: Path) -> None:
    result = runner.invoke(app, ["prepare", "--kaggle-dir", str(tmp_path), "--n-normal", "lots"])
    assert result.exit_code == 2 and "positive integer or 'all'" in result.output


def test_cli_help_has_an_example() -> None:
    result = runner.invoke(app, ["prepare", "--help"])
    assert result.exit_code == 0
    assert "Example" in result.output and "cxr-monai prepare --covid-dir" in result.output


def test_every_item_carries_its_source_and_the_figure_is_written(
    tmp_path: Path, public: tuple[Path, Path]
) -> None:
    covid, kaggle = public
    site = tmp_path / "site" / "labels.csv"
    site.parent.mkdir()
    rows = []
    for k, label in enumerate(["Normal", "Pneumonia"] * 6):
        write_image(site.parent / f"{k}.png")
        rows.append(f"{k}.png,{label},{k},{30 + k},{'MF'[k % 2]}\n")
    site.write_text("image,label,patient_id,age,sex\n" + "".join(rows))
    options = PrepareOptions(covid_dir=covid, kaggle_dir=kaggle, site_csvs=(site_csv(f"nih={site}"),))
    prepared = assemble_dataset(options)
    items = prepared.datalist["training"] + prepared.datalist["test"]
    assert {item["source"] for item in items} == {"covid-chestxray-dataset", "kaggle-chest-xray", "site:nih"}
    nih = [item for item in items if item["source"] == "site:nih"]
    assert len(nih) == 12 and all(item["age"] >= 30 and item["sex"] in ("M", "F") for item in nih)
    assert prepared.summary["counts_by_source"]["site:nih"] == {"COVID-19": 0, "Normal": 6, "Pneumonia": 6}
    assert prepared.summary["options"]["site_csvs"] == [f"nih={site}"]
    write_prepared(prepared, tmp_path / "out")
    figure = tmp_path / "out" / FIGURE_FILENAME
    with Image.open(figure) as image:
        assert image.format == "PNG" and image.size[0] > 1000
    summary = json.loads((tmp_path / "out" / "prepare_summary.json").read_text())
    assert summary["figure"] == str(figure.resolve())
