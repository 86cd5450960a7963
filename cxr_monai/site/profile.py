"""Site profiles: one hospital's calibration of one trained model, as a JSON file the bundle carries.

A profile lives at ``<bundle>/sites/<site>.json`` (or in a folder given with ``--site-profiles``, for a
bundle mounted read-only). It names the model it was fitted for by the SHA-256 of ``models/model.pt``:
a profile of another model is refused when the bundle's profiles are loaded, since its calibration would
shift the wrong probabilities.

At run time :class:`SiteProfiles` resolves a film's site to a :class:`SiteStatus`: the profile's
calibration applied to the model's probabilities, or, for a site without a profile (or no site at all),
the probabilities unchanged and a flag saying so, or a :class:`SiteNotCalibratedError` under
``unknown_site="refuse"``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from cxr_monai.atomic import write_json_atomic
from cxr_monai.constants import CLASS_NAMES, RESEARCH_USE_NOTICE
from cxr_monai.errors import BundleError, CXRMonaiError, DatasetError
from cxr_monai.feature_store import file_digest
from cxr_monai.site.calibration import LogitCalibration

#: Folder of a bundle that holds its site profiles.
SITES_DIR = "sites"
PROFILE_FORMAT = "cxr-monai site profile"
PROFILE_VERSION = 1
#: What a site name may be: it becomes a file name, so no path characters.
_SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
UnknownSitePolicy = Literal["flag", "refuse"]
UNKNOWN_SITE_POLICIES: tuple[str, ...] = ("flag", "refuse")
#: What an output says of probabilities no site calibration touched.
UNCALIBRATED_NOTE = (
    "probabilities NOT calibrated for this hospital: at hospitals not in the training data the model "
    "called most normal adult films abnormal; calibrate with `cxr-monai site calibrate`"
)


class SiteNotCalibratedError(CXRMonaiError):
    """A film's site has no profile and the policy is ``refuse``."""


def check_site_name(name: str) -> str:
    """``name`` when it is a valid site name (letters, digits, ``.``, ``_``, ``-``; 1-64 characters, not
    starting with a dot or dash); DatasetError naming the rule otherwise."""
    if not isinstance(name, str) or not _SITE_NAME.match(name):
        raise DatasetError(
            f"site name {name!r} is not allowed: use 1-64 letters, digits, '.', '_' or '-', starting with "
            "a letter or digit (no path characters)"
        )
    return name


def model_digest(weights_file: str | Path) -> str:
    """SHA-256 (hex) of a trained bundle's ``models/model.pt``: what a profile is bound to."""
    return file_digest(weights_file)


@dataclass(frozen=True)
class SiteProfile:
    """One site's calibration of one model.

    Attributes:
        site: the site's name (a valid file stem).
        model: ``{"name", "version", "digest"}`` of the model it was fitted for.
        calibration: the map applied to that model's probabilities at this site.
        report: everything else the profile records (films per class, digest of films and labels, dates,
            metrics before and after with intervals, acceptance verdict), as written.
    """

    site: str
    model: dict[str, str]
    calibration: LogitCalibration
    report: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The JSON document (format, version, site, model, calibration, then the report's keys)."""
        return {
            "format": PROFILE_FORMAT,
            "version": PROFILE_VERSION,
            "site": self.site,
            "model": dict(self.model),
            "calibration": self.calibration.to_dict(),
            "intended_use": RESEARCH_USE_NOTICE,
            **self.report,
        }

    def summary(self) -> str:
        """One line for outputs: ``site X calibrated (bias, 10 films, 2026-12-02)``."""
        films = self.report.get("films", {}).get("total")
        created = str(self.report.get("created", ""))[:10]
        details = ", ".join(str(x) for x in (self.calibration.method, f"{films} films", created) if x)
        return f"site {self.site} calibrated ({details})"


def profile_path(directory: str | Path, site: str) -> Path:
    """Where ``site``'s profile lives in a profiles folder."""
    return Path(directory) / f"{check_site_name(site)}.json"


def write_profile(directory: str | Path, profile: SiteProfile) -> Path:
    """Write ``profile`` to ``directory/<site>.json`` atomically (a reader never sees half a file)."""
    path = profile_path(directory, profile.site)
    write_json_atomic(path, profile.to_dict())
    return path


def read_profile(path: str | Path, expected_digest: str | None = None) -> SiteProfile:
    """Read one profile; with ``expected_digest``, check it was fitted for that model.

    Raises:
        BundleError: the file is unreadable or damaged (names the file and what is wrong), or it belongs to
            another model.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(
            f"site profile {path}: cannot be read ({type(exc).__name__}); recalibrate"
        ) from None
    if not isinstance(data, dict) or data.get("format") != PROFILE_FORMAT:
        raise BundleError(f"site profile {path}: not a cxr-monai site profile")
    if data.get("version") != PROFILE_VERSION:
        raise BundleError(f"site profile {path}: version {data.get('version')!r}, expected {PROFILE_VERSION}")
    try:
        site = check_site_name(str(data["site"]))
        model = {key: str(data["model"][key]) for key in ("name", "version", "digest")}
        calibration = LogitCalibration.from_dict(data["calibration"], len(CLASS_NAMES))
    except (KeyError, TypeError, ValueError, DatasetError) as exc:
        raise BundleError(f"site profile {path}: damaged ({exc})") from None
    if path.stem != site:
        raise BundleError(f"site profile {path}: holds site {site!r}, not {path.stem!r}")
    if expected_digest is not None and model["digest"] != expected_digest:
        raise BundleError(
            f"site profile {path}: fitted for another model ({model['name']} {model['version']}, weights "
            f"{model['digest'][:12]}), not this bundle's (weights {expected_digest[:12]}); recalibrate the "
            "site with this bundle"
        )
    skip = {"format", "version", "site", "model", "calibration", "intended_use"}
    return SiteProfile(site, model, calibration, {k: v for k, v in data.items() if k not in skip})


@dataclass(frozen=True)
class SiteStatus:
    """What one film's outputs say about its site.

    Attributes:
        site: the site's name, or None when nobody said which site the film is from.
        profile: the site's profile, or None (uncalibrated).
    """

    site: str | None
    profile: SiteProfile | None

    @property
    def calibrated(self) -> bool:
        return self.profile is not None

    @property
    def calibration(self) -> LogitCalibration | None:
        return None if self.profile is None else self.profile.calibration

    def apply(self, probabilities: np.ndarray) -> np.ndarray:
        """The model's probabilities (K,) or (N, K) as the site should read them (uncalibrated: unchanged)."""
        if self.profile is None:
            return np.asarray(probabilities, dtype=np.float64)
        return self.profile.calibration.apply(probabilities)

    def message(self) -> str:
        """One line for outputs a person reads (overlay, SR, gRPC, JSON)."""
        if self.profile is not None:
            return self.profile.summary()
        where = f"site {self.site}" if self.site else "site unknown"
        return f"{where}: {UNCALIBRATED_NOTE}"

    def to_record(self) -> dict[str, Any]:
        """The ``site`` block of a JSON record."""
        record: dict[str, Any] = {"name": self.site, "calibrated": self.calibrated, "message": self.message()}
        if self.profile is not None:
            record["calibration"] = self.profile.calibration.to_dict()
            record["profile_created"] = self.profile.report.get("created")
            record["acceptance"] = self.profile.report.get("acceptance", {}).get("verdict")
        return record


class SiteProfiles:
    """The site profiles of one model, resolved per film.

    Args:
        profiles: site name -> profile (all fitted for the same model).
        unknown_site: ``flag`` (outputs say the probabilities are uncalibrated) or ``refuse``
            (:meth:`resolve` raises :class:`SiteNotCalibratedError`).
    """

    def __init__(self, profiles: Mapping[str, SiteProfile], unknown_site: str = "flag") -> None:
        if unknown_site not in UNKNOWN_SITE_POLICIES:
            raise CXRMonaiError(f"unknown-site policy {unknown_site!r}; expected flag or refuse")
        self.profiles = dict(profiles)
        self.unknown_site = unknown_site

    @classmethod
    def load(cls, directory: str | Path, digest: str, unknown_site: str = "flag") -> SiteProfiles:
        """Every ``*.json`` profile in ``directory`` (none when it does not exist), checked against the model
        ``digest``. BundleError for a damaged profile or one of another model."""
        folder = Path(directory)
        found = sorted(folder.glob("*.json")) if folder.is_dir() else []
        profiles = [read_profile(path, digest) for path in found]
        return cls({p.site: p for p in profiles}, unknown_site)

    def resolve(self, site: str | None) -> SiteStatus:
        """The status of a film from ``site`` (None or "" when unknown).

        Raises:
            SiteNotCalibratedError: the site has no profile and the policy is ``refuse``.
        """
        name = site or None
        profile = self.profiles.get(name) if name else None
        if profile is None and self.unknown_site == "refuse":
            which = f"site {name!r} has" if name else "the film's site is unknown and has"
            raise SiteNotCalibratedError(
                f"{which} no calibration profile for this model (--unknown-site refuse); calibrate it with "
                "`cxr-monai site calibrate` or name a calibrated site"
            )
        return SiteStatus(name, profile)
