"""Which site a received film comes from: a JSON map of calling AE titles and InstitutionNames to sites.

The file (``cxr-monai gateway --site-map FILE``, ``cxr-monai explain --site-map FILE``)::

    {"MODALITY1": "ourhospital", "PACS_NORTH": "north",
     "institution_names": {"St Elsewhere Hospital": "ourhospital"}}

Top-level keys are calling AE titles (1-16 characters, no backslash or control characters; matched
without leading/trailing spaces); the optional ``institution_names`` maps a film's DICOM InstitutionName
(matched exactly, spaces at the ends ignored) to a site. Values are site names (profile file stems).
A film's site is its InstitutionName's when the map names it (a PACS may forward several hospitals'
films), else its calling AE title's, else unknown. The site always comes from this file, never from a
header value as such, so messages and logs may name it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cxr_monai.errors import CXRMonaiError, DatasetError
from cxr_monai.site.profile import check_site_name

#: The key of the InstitutionName table (17 characters: no AE title can take it).
INSTITUTION_NAMES = "institution_names"
_AE_TITLE_LENGTH = 16


@dataclass(frozen=True)
class SiteMap:
    """Calling AE title -> site and InstitutionName -> site (both may be empty)."""

    ae_titles: Mapping[str, str] = field(default_factory=dict)
    institution_names: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def read(cls, path: str | Path) -> SiteMap:
        """Read and check a site map file.

        Raises:
            CXRMonaiError: the file is unreadable, not a JSON object, or has a bad AE title or site name
                (one line naming the file and the entry).
        """
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
            raise CXRMonaiError(f"site map {path}: cannot be read ({reason})") from None
        try:
            return cls.from_dict(data)
        except (CXRMonaiError, ValueError) as exc:
            raise CXRMonaiError(f"site map {path}: {exc}") from None

    @classmethod
    def from_dict(cls, data: Any) -> SiteMap:
        """The map of a parsed JSON document; ValueError or CXRMonaiError naming the bad entry."""
        if not isinstance(data, dict):
            raise ValueError('expected a JSON object {"AE_TITLE": "site", ...}')
        institutions = data.get(INSTITUTION_NAMES, {})
        if not isinstance(institutions, dict):
            raise ValueError(f'"{INSTITUTION_NAMES}" must be an object {{"InstitutionName": "site", ...}}')
        ae_titles = {
            _ae_title(key): _site(value, f"AE title {key!r}")
            for key, value in data.items()
            if key != INSTITUTION_NAMES
        }
        names = {str(k).strip(): _site(value, f"institution {k!r}") for k, value in institutions.items()}
        if "" in names:
            raise ValueError(f'"{INSTITUTION_NAMES}" has an empty institution name')
        return cls(ae_titles, names)

    @property
    def sites(self) -> set[str]:
        """Every site the map names."""
        return set(self.ae_titles.values()) | set(self.institution_names.values())

    def site_for(self, calling_ae_title: str | None, institution_name: str | None) -> str | None:
        """The film's site: its InstitutionName's, else its calling AE title's, else None (unknown)."""
        if institution_name and institution_name.strip() in self.institution_names:
            return self.institution_names[institution_name.strip()]
        if calling_ae_title:
            return self.ae_titles.get(calling_ae_title.strip())
        return None


def _ae_title(key: str) -> str:
    title = key.strip()
    if not title or len(title) > _AE_TITLE_LENGTH or "\\" in title or any(ord(c) < 32 for c in title):
        raise ValueError(f"{key!r} is not an AE title (1-16 characters, no backslash or control characters)")
    return title


def _site(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{what}: the site must be a string, got {type(value).__name__}")
    try:
        return check_site_name(value)
    except DatasetError as exc:
        raise ValueError(f"{what}: {exc}") from None
