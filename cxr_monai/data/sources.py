"""Reading the three dataset sources into :class:`DataItem` lists, from file names and CSVs only (no pixels).

Sources:

* covid-chestxray-dataset (Cohen et al.): ``metadata.csv`` + ``images/`` as published;
* Kaggle chest-xray-pneumonia (Kermany et al.): ``{train,val,test}/{NORMAL,PNEUMONIA}/`` under one folder;
* a site's own CSV with ``image,label[,patient_id,age,sex]`` columns.

Every scan returns a :class:`SourceScan`: the items whose file exists, the rows skipped because the file is
missing (as CSV line numbers, never paths: a site's paths may carry patient identifiers), and warnings.
"""

from __future__ import annotations

import csv
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cxr_monai.constants import CLASS_NAMES, DEFAULT_COVID_VIEWS
from cxr_monai.data.findings import DEFAULT_FINDING_MAP, classify_finding
from cxr_monai.errors import DatasetError

COVID_SOURCE = "covid-chestxray-dataset"
KAGGLE_SOURCE = "kaggle-chest-xray"
SITE_SOURCE_PREFIX = "site:"
#: ``source`` of a datalist entry that names none (datalists written by hand or by other tools).
UNKNOWN_SOURCE = "(no source)"


KAGGLE_SPLITS: tuple[str, ...] = ("train", "val", "test")
#: Kaggle folder name -> class name in :data:`CLASS_NAMES`.
KAGGLE_CLASS_FOLDERS: dict[str, str] = {"NORMAL": "Normal", "PNEUMONIA": "Pneumonia"}
IMAGE_SUFFIXES: frozenset[str] = frozenset({".jpeg", ".jpg", ".png"})

_COVID_REQUIRED_COLUMNS = ("patientid", "offset", "finding", "view", "modality", "filename")
_SITE_REQUIRED_COLUMNS = ("image", "label")
# Kaggle names carry the patient: person1234_bacteria_3133 / person1_virus_6 (PNEUMONIA) and
# IM-0505-0001-0002 / NORMAL2-IM-0383-0001 (NORMAL; the NORMAL2- series numbers its patients apart).
_KAGGLE_PERSON = re.compile(r"^(person\d+)_(?:bacteria|virus)_\d+$")
_KAGGLE_IM = re.compile(r"^((?:NORMAL2-)?IM-\d+)-\d+(?:-\d+)?$")
_MISSING_EXAMPLES = 5
_SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
#: Accepted ``sex`` cells (any case) -> the covid-chestxray-dataset coding.
_SEX_CODES: dict[str, str] = {"m": "M", "male": "M", "f": "F", "female": "F"}
_MAX_AGE_YEARS = 130


@dataclass(frozen=True)
class DataItem:
    """One image of the dataset: ``image`` is an absolute path, ``label`` an index into :data:`CLASS_NAMES`.

    ``view`` and ``offset`` (days since symptom onset, or None) are set for covid-chestxray-dataset items;
    ``age`` (years) and ``sex`` ("M"/"F") where the source gives them, else None.
    """

    image: str
    label: int
    patient_id: str
    source: str
    view: str | None = None
    offset: float | int | None = None
    age: float | int | None = None
    sex: str | None = None

    @property
    def label_name(self) -> str:
        return CLASS_NAMES[self.label]

    @classmethod
    def from_json(cls, entry: Mapping[str, Any]) -> DataItem:
        """The item of a datalist entry as :func:`cxr_monai.data.load_datalist` returns it (image, label,
        patient_id checked there); other keys (``fold``, ``synthetic`` ...) are dropped, and a missing
        ``source`` becomes :data:`UNKNOWN_SOURCE`."""
        return cls(
            image=str(entry["image"]),
            label=int(entry["label"]),
            patient_id=str(entry["patient_id"]),
            source=str(entry.get("source") or UNKNOWN_SOURCE),
            view=entry.get("view"),
            offset=entry.get("offset"),
            age=entry.get("age"),
            sex=entry.get("sex"),
        )

    def to_json(self) -> dict[str, Any]:
        """Datalist entry (no ``fold``): image, label, label_name, patient_id, source[, offset, view][, age]
        [, sex] (age and sex only when known)."""
        entry: dict[str, Any] = {
            "image": self.image,
            "label": self.label,
            "label_name": self.label_name,
            "patient_id": self.patient_id,
            "source": self.source,
        }
        if self.source == COVID_SOURCE:
            entry["offset"] = self.offset
            entry["view"] = self.view
        if self.age is not None:
            entry["age"] = self.age
        if self.sex is not None:
            entry["sex"] = self.sex
        return entry


@dataclass
class SourceScan:
    """What one source gave: items found, lines of the CSV ``listing`` whose file is missing, warnings."""

    source: str
    items: list[DataItem] = field(default_factory=list)
    eligible: int = 0
    listing: str = ""
    missing_lines: list[int] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    skipped_findings: dict[str, int] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """Counts for prepare_summary.json; ``skipped_findings`` only for covid-chestxray-dataset."""
        record: dict[str, Any] = {
            "eligible": self.eligible,
            "found": len(self.items),
            "missing": len(self.missing_lines),
            "listing": self.listing,
            "missing_lines": list(self.missing_lines),
        }
        if self.source == COVID_SOURCE:
            record["skipped_findings"] = dict(sorted(self.skipped_findings.items()))
        return record

    def note_missing(self) -> None:
        """Add the warning that reports rows skipped because their file is absent (count + first rows)."""
        if self.missing_lines:
            shown = ", ".join(str(line) for line in self.missing_lines[:_MISSING_EXAMPLES])
            more = ", ..." if len(self.missing_lines) > _MISSING_EXAMPLES else ""
            self.warnings.append(
                f"{self.source}: {len(self.missing_lines)} of {self.eligible} eligible rows skipped because "
                f"the image file is missing ({self.listing} lines {shown}{more})"
            )


def _read_csv(path: Path, required: Sequence[str], what: str) -> tuple[list[str], list[dict[str, str]]]:
    """Header and rows of a CSV (UTF-8, optional BOM); DatasetError when a required column is absent."""
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            header = [name.strip() for name in reader.fieldnames or []]
            reader.fieldnames = header
            rows = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DatasetError(f"cannot read {what} {path}: {exc}") from exc
    absent = [name for name in required if name not in header]
    if absent:
        raise DatasetError(
            f"{what} {path} lacks column(s) {', '.join(absent)}; expected columns {', '.join(required)}"
        )
    return header, rows


def _parse_number(text: str) -> float | int | None:
    """A number cell -> int, float or None (blank or not a number)."""
    text = text.strip()
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        return None
    return int(value) if value.is_integer() else value


def scan_covid_dir(
    covid_dir: Path,
    views: Iterable[str] = DEFAULT_COVID_VIEWS,
    finding_map: Mapping[str, str | None] = DEFAULT_FINDING_MAP,
) -> SourceScan:
    """X-rays of a covid-chestxray-dataset checkout, labelled from their ``finding``.

    Keeps rows with ``modality`` "X-ray" and ``view`` in ``views``; the class comes from
    :func:`cxr_monai.data.findings.classify_finding` with ``finding_map``; rows it skips are counted per
    finding in ``skipped_findings`` (with a warning). The image is ``<covid_dir>/<folder>/<filename>``
    (``folder`` defaults to ``images``). Patient id: ``covid:<patientid>``; ``age``/``sex`` from their
    columns.
    """
    covid_dir = Path(covid_dir)
    metadata = covid_dir / "metadata.csv"
    if not metadata.is_file() or not (covid_dir / "images").is_dir():
        raise DatasetError(
            f"--covid-dir {covid_dir} is not a covid-chestxray-dataset checkout: "
            "expected metadata.csv and an images/ folder in it"
        )
    wanted_views = {view.strip() for view in views}
    _, rows = _read_csv(metadata, _COVID_REQUIRED_COLUMNS, "covid-chestxray-dataset metadata")
    scan = SourceScan(COVID_SOURCE, listing=metadata.name)
    for line, row in enumerate(rows, start=2):  # line 1 is the header
        view = (row.get("view") or "").strip()
        if (row.get("modality") or "").strip() != "X-ray" or view not in wanted_views:
            continue
        finding = (row.get("finding") or "").strip()
        class_name = classify_finding(finding, finding_map)
        if class_name is None:
            scan.skipped_findings[finding] = scan.skipped_findings.get(finding, 0) + 1
            continue
        scan.eligible += 1
        folder = (row.get("folder") or "").strip() or "images"
        image = os.path.abspath(covid_dir / folder / row["filename"].strip())
        if not os.path.isfile(image):
            scan.missing_lines.append(line)
            continue
        sex = (row.get("sex") or "").strip().upper()
        scan.items.append(
            DataItem(
                image=image,
                label=CLASS_NAMES.index(class_name),
                patient_id=f"covid:{row['patientid'].strip()}",
                source=COVID_SOURCE,
                view=view,
                offset=_parse_number(row.get("offset") or ""),
                age=_parse_number(row.get("age") or ""),
                sex=sex if sex in ("M", "F") else None,
            )
        )
    if scan.skipped_findings:
        listing = ", ".join(f"{name or '(blank)'} {n}" for name, n in sorted(scan.skipped_findings.items()))
        scan.warnings.append(
            f"{COVID_SOURCE}: {sum(scan.skipped_findings.values())} X-ray rows of the kept views skipped "
            f"because their finding is not mapped to a class ({listing}); see --finding-map"
        )
    scan.note_missing()
    return scan


def kaggle_patient_id(filename: str) -> str | None:
    """Patient id of a Kaggle chest-xray-pneumonia file name, or None if the name has neither known form.

    ``person1234_bacteria_3133.jpeg`` -> ``kaggle:person1234``; ``IM-0505-0001-0002.jpeg`` ->
    ``kaggle:IM-0505``; ``NORMAL2-IM-0383-0001.jpeg`` -> ``kaggle:NORMAL2-IM-0383``.
    """
    stem = Path(filename).stem
    match = _KAGGLE_PERSON.match(stem) or _KAGGLE_IM.match(stem)
    return f"kaggle:{match.group(1)}" if match else None


def _image_files(folder: Path) -> list[Path]:
    """Image files directly in ``folder`` (.jpeg/.jpg/.png, any case); dotfiles (``._x.jpeg``) skipped."""
    return sorted(
        path
        for path in folder.iterdir()
        if not path.name.startswith(".") and path.suffix.lower() in IMAGE_SUFFIXES and path.is_file()
    )


def scan_kaggle_dir(kaggle_dir: Path) -> SourceScan:
    """Normal and Pneumonia images of a Kaggle chest-xray-pneumonia folder, all present splits pooled.

    Reads exactly ``<kaggle_dir>/{train,val,test}/{NORMAL,PNEUMONIA}/`` (whichever exist), so the published
    zip's nested ``chest_xray/chest_xray`` copy and ``__MACOSX/`` are never counted. A file name of neither
    known form becomes its own patient, with a warning.
    """
    kaggle_dir = Path(kaggle_dir)
    folders = [
        (kaggle_dir / split / name, class_name)
        for split in KAGGLE_SPLITS
        for name, class_name in KAGGLE_CLASS_FOLDERS.items()
        if (kaggle_dir / split / name).is_dir()
    ]
    if not folders:
        hint = ""
        if (kaggle_dir / "chest_xray" / "train").is_dir():
            hint = f" (did you mean {kaggle_dir / 'chest_xray'}?)"
        raise DatasetError(
            f"--kaggle-dir {kaggle_dir} has none of the folders {{train,val,test}}/{{NORMAL,PNEUMONIA}}/ "
            f"of the Kaggle chest-xray-pneumonia dataset{hint}"
        )
    scan = SourceScan(KAGGLE_SOURCE)
    unparsed = 0
    for folder, class_name in folders:
        for path in _image_files(folder):
            patient = kaggle_patient_id(path.name)
            if patient is None:
                unparsed += 1
                patient = f"kaggle:{path.parent.parent.name}/{path.parent.name}/{path.stem}"
            scan.items.append(
                DataItem(
                    image=os.path.abspath(path),
                    label=CLASS_NAMES.index(class_name),
                    patient_id=patient,
                    source=KAGGLE_SOURCE,
                )
            )
    scan.eligible = len(scan.items)
    if unparsed:
        scan.warnings.append(
            f"{KAGGLE_SOURCE}: {unparsed} file name(s) of neither form personN_... nor [NORMAL2-]IM-NNNN-..."
            "; "
            "each is treated as its own patient"
        )
    return scan


def parse_label(text: str) -> int | None:
    """A site CSV label -> class index: a name of :data:`CLASS_NAMES` (any case) or its index; else None."""
    text = text.strip()
    if text.isdigit() and int(text) < len(CLASS_NAMES):
        return int(text)
    lowered = [name.lower() for name in CLASS_NAMES]
    return lowered.index(text.lower()) if text.lower() in lowered else None


@dataclass(frozen=True)
class SiteCSV:
    """A site CSV and the name of its source (``site:<name>``; also the prefix of its patient ids)."""

    path: Path
    name: str


def site_csv(spec: str | Path) -> SiteCSV:
    """``--site-csv [NAME=]PATH`` -> :class:`SiteCSV`; NAME defaults to the CSV's file stem.

    DatasetError when NAME is not letters, digits, ``.``, ``_`` or ``-`` (starting with a letter or digit).
    """
    text = str(spec)
    name, sep, rest = text.partition("=")
    if not sep or Path(text).is_file():
        return SiteCSV(Path(text), Path(text).stem)
    if not _SITE_NAME.match(name):
        raise DatasetError(
            f"--site-csv {text}: site name {name!r} must be letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return SiteCSV(Path(rest), name)


def _site_age_sex(row: dict[str, str], where: str) -> tuple[float | int | None, str | None]:
    """Optional ``age`` (years, 0-130) and ``sex`` (M/F/male/female) cells; blank -> None.

    The message names the line and column, never the cell (it is patient data)."""
    age_text = (row.get("age") or "").strip()
    age = _parse_number(age_text)
    if age_text and (age is None or not 0 <= age <= _MAX_AGE_YEARS):
        raise DatasetError(f"{where}: age is not a number of years between 0 and {_MAX_AGE_YEARS}")
    sex_text = (row.get("sex") or "").strip().lower()
    if sex_text and sex_text not in _SEX_CODES:
        raise DatasetError(f"{where}: sex is not one of M, F, male, female (or blank)")
    return age, _SEX_CODES.get(sex_text)


def scan_site_csv(site: SiteCSV | Path, base_dir: Path | None = None) -> SourceScan:
    """A site's own images from a CSV with columns ``image,label[,patient_id,age,sex]``.

    ``image`` is a path, relative ones resolved against ``base_dir`` (default: the CSV's folder);
    ``label`` a class name or index;
    ``age`` in years, ``sex`` M/F (blank = unknown). A bare path is named after its file stem.
    Patient id ``<name>:<patient_id>``; without a patient_id (column or cell) each image is its own
    patient, with a warning. Source: ``site:<name>``.
    """
    if not isinstance(site, SiteCSV):
        site = site_csv(site)
    csv_path, name = site.path, site.name
    if not csv_path.is_file():
        raise DatasetError(f"--site-csv {csv_path} is not a file; expected a CSV with columns image,label")
    header, rows = _read_csv(csv_path, _SITE_REQUIRED_COLUMNS, "site CSV")
    scan = SourceScan(SITE_SOURCE_PREFIX + name, listing=csv_path.name)
    has_patient_column = "patient_id" in header
    own_patient = 0
    for line, row in enumerate(rows, start=2):
        image_text = (row.get("image") or "").strip()
        label_text = row.get("label") or ""
        if not image_text:
            raise DatasetError(f"site CSV {csv_path} line {line}: empty image path")
        label = parse_label(label_text)
        if label is None:
            raise DatasetError(
                f"site CSV {csv_path} line {line}: label {label_text.strip()!r} is not one of "
                f"{', '.join(CLASS_NAMES)} or an index 0-{len(CLASS_NAMES) - 1}"
            )
        age, sex = _site_age_sex(row, f"site CSV {csv_path} line {line}")
        scan.eligible += 1
        image = os.path.abspath((base_dir or csv_path.parent) / image_text)
        if not os.path.isfile(image):
            scan.missing_lines.append(line)
            continue
        patient = (row.get("patient_id") or "").strip() if has_patient_column else ""
        if not patient:
            own_patient += 1
            patient = f"image:{image_text}"
        scan.items.append(
            DataItem(
                image=image, label=label, patient_id=f"{name}:{patient}", source=scan.source, age=age, sex=sex
            )
        )
    if own_patient:
        reason = "has no patient_id column" if not has_patient_column else "has empty patient_id cells"
        scan.warnings.append(
            f"{scan.source}: {csv_path.name} {reason}; {own_patient} image(s) each treated as its own "
            "patient, so images of one patient may land in different splits"
        )
    scan.note_missing()
    return scan
