"""A source film's header made fit to copy into the DICOM objects we write (Secondary Capture, SR).

highdicom copies patient and study attributes from the source and refuses values the standard does not
allow, with a ValueError that quotes the value. Modalities do send such values: PatientSex ``U``, ``Male``
or ``m``; SpecificCharacterSet ``ISO IR 100``; a StudyDate ``2020``. One such film must not stop a gateway,
so the copy is repaired where the standard allows (hand-written: neither pydicom nor highdicom repairs):

* PatientSex: M / F / O in any case or spelled out become M / F / O; anything else becomes empty
  (Type 2: unknown).
* SpecificCharacterSet: a defined term with a space or hyphen for the underscore (``ISO IR 100``) becomes
  that term; a value that still names no character set becomes ``ISO_IR 192`` (UTF-8, which can encode
  whatever pydicom decoded).
* Any other value invalid for its VR (a date that is not a date, an age without its unit) becomes empty
  (:func:`blank_invalid_values`).

The repaired attributes are named by keyword, never by value (values may be patient data).
"""

from __future__ import annotations

import copy
import logging
import re

from pydicom import config as pydicom_config
from pydicom.charset import python_encoding
from pydicom.dataset import Dataset
from pydicom.valuerep import validate_value

logger = logging.getLogger(__name__)

_SEX = {"M": "M", "MALE": "M", "F": "F", "FEMALE": "F", "O": "O", "OTHER": "O"}
_SEPARATOR = re.compile(r"^(ISO)[ _-]?(2022)?[ _-]?(IR)[ _-]?(\d+)$", re.IGNORECASE)
UTF8_CHARSET = "ISO_IR 192"
_PIXEL_DATA = 0x7FE00010


def _charset_term(value: str) -> str | None:
    """The defined term ``value`` means (``ISO IR 100`` -> ``ISO_IR 100``), or None when it names none."""
    text = value.strip()
    if text in python_encoding or text == "":
        return text
    match = _SEPARATOR.match(text)
    if match is None:
        return None
    term = f"ISO 2022 IR {match[4]}" if match[2] else f"ISO_IR {match[4]}"
    return term if term in python_encoding else None


def repair_patient_sex(ds: Dataset) -> bool:
    """Normalise PatientSex in place; True when the value changed."""
    if "PatientSex" not in ds or not ds.PatientSex:
        return False
    value = str(ds.PatientSex)
    repaired = _SEX.get(value.strip().upper(), "")
    ds.PatientSex = repaired
    return repaired != value


def repair_character_set(ds: Dataset) -> bool:
    """Normalise SpecificCharacterSet in place; True when the value changed."""
    if "SpecificCharacterSet" not in ds or not ds.SpecificCharacterSet:
        return False
    raw = ds.SpecificCharacterSet
    values = [str(v) for v in raw] if not isinstance(raw, str) else [raw]
    terms = [_charset_term(v) for v in values]
    if any(term is None for term in terms):
        repaired: list[str] = [UTF8_CHARSET]
    else:
        repaired = [t for t in terms if t is not None]
    if repaired == values:
        return False
    ds.SpecificCharacterSet = repaired[0] if len(repaired) == 1 else repaired
    return True


_REPAIRS = (("SpecificCharacterSet", repair_character_set), ("PatientSex", repair_patient_sex))


def repaired_source(source: Dataset) -> tuple[Dataset, list[str]]:
    """A copy of ``source`` (its header: PixelData is left out) whose values highdicom accepts, and the
    keywords of the attributes repaired or emptied."""
    ds = copy.deepcopy(Dataset({e.tag: e for e in source if e.tag != _PIXEL_DATA}))
    if hasattr(source, "file_meta"):
        ds.file_meta = copy.deepcopy(source.file_meta)
    repaired = [
        kw
        for kw, fix in (("SpecificCharacterSet", repair_character_set), ("PatientSex", repair_patient_sex))
        if fix(ds)
    ]
    repaired += blank_invalid_values(ds)
    return ds, repaired


def blank_invalid_values(ds: Dataset) -> list[str]:
    """Empty every top-level element whose value is invalid for its VR; returns their keywords.

    highdicom copies patient and study attributes from the source as they are; a malformed one (a
    PatientAge "81" instead of "081Y") would make the output invalid. Empty is allowed for the Type 2
    and Type 3 attributes copied. The values are never quoted (they may be patient data).
    """
    blanked = []
    for element in ds:
        if element.VR in ("SQ", "OB", "OW", "UN") or element.value in (None, ""):
            continue
        values = element.value if element.VM > 1 else [element.value]
        try:
            for value in values:
                if isinstance(value, str):  # numbers and names pydicom already converted are valid
                    validate_value(element.VR, value, pydicom_config.RAISE)
        except ValueError:
            element.value = None
            blanked.append(element.keyword or str(element.tag))
    if blanked:
        logger.warning("emptied source attribute(s) with values invalid for their VR: %s", blanked)
    return blanked
