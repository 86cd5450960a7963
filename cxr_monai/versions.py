"""Installed versions of cxr-monai and the libraries whose versions change its results.

Recorded as ``versions`` in ``prepare_summary.json``, a trained bundle's ``logs/run_info.json``, a GAN
run's ``run_info.json`` and the evaluation's ``metrics.json``; cxr-monai's own version goes into the
DICOM objects it writes (``SoftwareVersions``).
"""

from __future__ import annotations

import platform
from importlib.metadata import PackageNotFoundError, version

#: Distribution names, in the order they are recorded.
RECORDED_PACKAGES: tuple[str, ...] = ("cxr-monai", "monai", "torch", "torchvision", "numpy", "scikit-learn")
UNKNOWN = "unknown"


def package_version(distribution: str) -> str:
    """The installed version of ``distribution`` (e.g. ``"cxr-monai"``), ``"unknown"`` when not installed
    (a source checkout run without ``pip install``)."""
    try:
        return version(distribution)
    except PackageNotFoundError:
        return UNKNOWN


def cxr_monai_version() -> str:
    """This package's version, ``"unknown"`` outside an installation."""
    return package_version("cxr-monai")


def package_versions() -> dict[str, str]:
    """``{distribution: version}`` for :data:`RECORDED_PACKAGES`, plus ``"python"``."""
    recorded = {name: package_version(name) for name in RECORDED_PACKAGES}
    recorded["python"] = platform.python_version()
    return recorded
