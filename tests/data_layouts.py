"""Builders of tiny copies of the dataset layouts for the ``cxr_monai.data`` tests (real PNG/JPEG bytes)."""

from __future__ import annotations

import csv
import zlib
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

#: The published covid-chestxray-dataset header (commit 584034a), so the reader meets the real column set.
COVID_HEADER = (
    "patientid,offset,sex,age,finding,survival,intubated,intubation_present,went_icu,in_icu,"
    "needed_supplemental_O2,extubated,temperature,pO2_saturation,leukocyte_count,neutrophil_count,"
    "lymphocyte_count,view,modality,date,location,folder,filename,doi,url,license,clinical_notes,other_notes,"
)
COVID_COLUMNS = COVID_HEADER.split(",")  # the trailing comma gives an unnamed last column, as published


def distinct_image(seed: int, size: int = 64) -> Image.Image:
    """A smooth random grayscale image (a 6x6 random grid, bicubic-upsampled): different seeds give
    different pictures, as different films are, so prepare's near-duplicate check keeps them apart."""
    grid = np.random.default_rng(seed).integers(0, 256, (6, 6), dtype=np.uint8)
    return Image.fromarray(grid).resize((size, size), Image.Resampling.BICUBIC)


def write_image(path: Path) -> Path:
    """A real 64x64 grayscale image, PNG or JPEG after the suffix, its picture seeded by the file name;
    parents created."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = distinct_image(zlib.crc32(path.name.encode()))
    image.save(path, format="PNG" if path.suffix.lower() == ".png" else "JPEG")
    return path


def covid_row(
    patientid: str | int,
    filename: str,
    *,
    finding: str = "COVID-19",
    view: str = "PA",
    modality: str = "X-ray",
    offset: str = "0",
    folder: str = "images",
    age: str = "",
    sex: str = "",
) -> dict[str, str]:
    """One metadata.csv row (other columns blank)."""
    row = dict.fromkeys(COVID_COLUMNS, "")
    row.update(
        patientid=str(patientid),
        filename=filename,
        finding=finding,
        view=view,
        modality=modality,
        offset=offset,
        folder=folder,
        age=age,
        sex=sex,
    )
    return row


def make_covid(root: Path, rows: Sequence[dict[str, str]], absent: Iterable[str] = ()) -> Path:
    """covid-chestxray-dataset layout: metadata.csv with ``rows``, an image for each row not in ``absent``."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "images").mkdir(exist_ok=True)
    with (root / "metadata.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=COVID_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    skip = set(absent)
    for row in rows:
        if row["filename"] not in skip:
            write_image(root / row["folder"] / row["filename"])
    return root


def make_kaggle(root: Path, layout: dict[str, dict[str, Sequence[str]]]) -> Path:
    """Kaggle layout: ``layout[split][NORMAL|PNEUMONIA]`` lists file names written under root/split/class/."""
    for split, classes in layout.items():
        for class_folder, names in classes.items():
            for name in names:
                write_image(root / split / class_folder / name)
    return root


def synthetic_public_data(root: Path, patients_per_class: int = 12) -> tuple[Path, Path]:
    """A covid dir and a Kaggle dir with ``patients_per_class`` patients of each class, 1-3 images each."""
    rows = [
        covid_row(p, f"covid{p}-{k}.png", offset=str(k * 3), view=("PA", "AP", "AP Supine")[k])
        for p in range(patients_per_class)
        for k in range(1 + p % 3)
    ]
    covid = make_covid(root / "covid-chestxray-dataset", rows)
    normal = [
        f"IM-{p:04d}-0001-{k + 1:04d}.jpeg" for p in range(patients_per_class) for k in range(1 + p % 2)
    ]
    pneumonia = [
        f"person{p}_{kind}_{p * 10 + k}.jpeg"
        for p in range(patients_per_class)
        for k, kind in enumerate(("bacteria", "virus")[: 1 + p % 2])
    ]
    kaggle = make_kaggle(root / "chest_xray", {"train": {"NORMAL": normal, "PNEUMONIA": pneumonia}})
    return covid, kaggle
