"""covid-chestxray-dataset ``finding`` -> class: the default map and a user's ``--finding-map`` file.

A finding is a term (``Klebsiella``), a path of terms from general to specific
(``Pneumonia/Bacterial/Klebsiella``, the collection's later releases) or several findings separated by
commas (``COVID-19, ARDS``). Rules, in order:

1. a finding containing ``COVID-19`` is COVID-19 (whatever else it lists);
2. the whole finding, if the map has it;
3. for each comma-separated part, its most specific term the map has (``Pneumonia/Fungal/Aspergillosis``
   falls back to ``Fungal``); a term mapped to None (``todo``, ``ARDS``, ``Lipoid``) skips the row;
   parts mapping to different classes, or a part with no mapped term, skip the row too.

The override file replaces the entries it names (a null/empty class skips that term) and keeps the rest:
JSON ``{"Klebsiella": "Pneumonia", "todo": null}`` or CSV with columns ``finding,label``.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping
from pathlib import Path

from cxr_monai.constants import CLASS_NAMES
from cxr_monai.errors import DatasetError

#: The rule-1 term: any finding containing it is COVID-19.
COVID_TERM = "COVID-19"

_PNEUMONIA_TERMS = (
    # the general terms of the collection's finding paths
    "Pneumonia",
    "Bacterial",
    "Viral",
    "Fungal",
    # the causes present in metadata.csv (commit 584034a) and the collection's later releases
    "SARS",
    "MERS",
    "MERS-CoV",
    "Streptococcus",
    "Klebsiella",
    "Pneumocystis",
    "Legionella",
    "E.Coli",
    "Mycoplasma",
    "Mycoplasma Bacterial Pneumonia",
    "Chlamydophila",
    "Staphylococcus",
    "Nocardia",
    "Varicella",
    "Influenza",
    "Herpes",
    "Aspergillosis",
)

#: Default map: finding term -> class name, or None = skip rows with this term (not one of the 3 classes).
DEFAULT_FINDING_MAP: dict[str, str | None] = {
    COVID_TERM: "COVID-19",
    **dict.fromkeys(_PNEUMONIA_TERMS, "Pneumonia"),
    "No Finding": "Normal",
    # not an infectious pneumonia / not labelled: skipped
    "todo": None,
    "Unknown": None,
    "ARDS": None,
    "Lipoid": None,
    "Aspiration": None,
    "Tuberculosis": None,
}


def _class_name(text: str | None, where: str) -> str | None:
    """A map value -> a class name of :data:`CLASS_NAMES` (any case) or None (null/empty = skip)."""
    if text is None or not str(text).strip():
        return None
    lowered = {name.lower(): name for name in CLASS_NAMES}
    name = lowered.get(str(text).strip().lower())
    if name is None:
        raise DatasetError(
            f"{where}: class {text!r} is not one of {', '.join(CLASS_NAMES)} (or empty = skip)"
        )
    return name


def load_finding_map(path: Path) -> dict[str, str | None]:
    """The default map updated with the entries of a JSON object or a ``finding,label`` CSV file.

    DatasetError when the file is missing, unreadable, not an object / lacks the columns, a finding is
    empty or repeated, or a class is not in :data:`CLASS_NAMES`.
    """
    path = Path(path)
    where = f"--finding-map {path}"
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{where} cannot be read: {exc}") from exc
    entries: list[tuple[str, str | None, str]] = []
    if path.suffix.lower() == ".json":
        try:
            content = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{where} is not valid JSON: {exc}") from exc
        if not isinstance(content, dict):
            raise DatasetError(f'{where} must hold a JSON object {{"finding": "class or null", ...}}')
        for key, value in content.items():
            if value is not None and not isinstance(value, str):
                raise DatasetError(
                    f"{where}: finding {key!r} maps to {value!r}; expected a class name or null"
                )
            entries.append((key, value, f"{where} entry {key!r}"))
    elif path.suffix.lower() == ".csv":
        reader = csv.DictReader(text.splitlines())
        header = [name.strip() for name in reader.fieldnames or []]
        if "finding" not in header or "label" not in header:
            raise DatasetError(f"{where} lacks the columns finding,label")
        reader.fieldnames = header
        for line, row in enumerate(reader, start=2):
            entries.append((row.get("finding") or "", row.get("label"), f"{where} line {line}"))
    else:
        raise DatasetError(f"{where}: expected a .json or .csv file")
    mapping = dict(DEFAULT_FINDING_MAP)
    seen: set[str] = set()
    for finding, label, entry_where in entries:
        finding = finding.strip()
        if not finding:
            raise DatasetError(f"{entry_where}: empty finding")
        if finding in seen:
            raise DatasetError(f"{entry_where}: finding {finding!r} given more than once")
        seen.add(finding)
        mapping[finding] = _class_name(label, entry_where)
    return mapping


def classify_finding(finding: str, mapping: Mapping[str, str | None]) -> str | None:
    """Class name of a covid-chestxray-dataset ``finding`` under ``mapping`` (rules in the module doc), or
    None when the row is skipped."""
    finding = finding.strip()
    if COVID_TERM in finding:
        return mapping.get(COVID_TERM, "COVID-19")
    if finding in mapping:
        return mapping[finding]
    classes: set[str | None] = set()
    for part in finding.split(","):
        terms = [term.strip() for term in part.split("/") if term.strip()]
        known = [term for term in reversed(terms) if term in mapping]
        classes.add(mapping[known[0]] if known else None)
    return classes.pop() if len(classes) == 1 else None
