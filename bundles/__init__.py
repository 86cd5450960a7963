"""The MONAI bundles that ship with cxr-monai, installed as package data of ``cxr_monai.bundles``.

``bundles/`` stays at the top of the repository (the design card fixes it) and setuptools maps it to the
subpackage ``cxr_monai.bundles``, so a checkout, an editable install and a wheel all find the configs the
same way: through :func:`bundle_dir`, never through a path relative to a source file.
"""

from __future__ import annotations

import shutil
from importlib.resources import files
from pathlib import Path

from cxr_monai.errors import BundleError

#: The shipped bundles: the three-backbone classifier and the CycleGAN augmentation.
BUNDLE_NAMES: tuple[str, ...] = ("cxr_classifier", "cxr_cyclegan")


def bundles_root() -> Path:
    """The folder holding the shipped bundles (a real directory: wheels install unzipped)."""
    return Path(str(files(__name__)))


def bundle_dir(name: str) -> Path:
    """The shipped bundle ``name`` (a folder with ``configs/train.json``). Raises BundleError otherwise."""
    if name not in BUNDLE_NAMES:
        raise BundleError(f"unknown bundle {name!r}; the shipped bundles are {', '.join(BUNDLE_NAMES)}")
    root = bundles_root() / name
    if not (root / "configs" / "train.json").is_file():
        raise BundleError(f"the {name} bundle is incomplete in this installation ({root}): reinstall it")
    return root


def copy_bundle(name: str, destination: str | Path) -> Path:
    """Copy the shipped bundle ``name`` to ``destination`` (which must not exist) for editing and for
    ``python -m monai.bundle run ... --config_file DEST/configs/train.json``. Returns the copy's path."""
    source, target = bundle_dir(name), Path(destination)
    if target.exists():
        raise BundleError(f"{target} already exists; choose a new folder for the copy of {name}")
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return target
