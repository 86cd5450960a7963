"""pyproject's explicit package list covers every package folder (server/ installs as cxr_monai.server)."""

from __future__ import annotations

from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]


#: Top-level folders installed as subpackages of cxr_monai (setuptools package-dir).
MAPPED = {"server": "cxr_monai.server", "bundles": "cxr_monai.bundles"}


def _folder_packages() -> set[str]:
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "cxr_monai").rglob("__init__.py")}
    for folder, package in MAPPED.items():
        found |= {
            ".".join((package, *p.parent.relative_to(ROOT / folder).parts))
            for p in (ROOT / folder).rglob("__init__.py")
        }
    return found


def test_every_package_folder_is_installed() -> None:
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert set(setuptools["packages"]) == _folder_packages()
    assert setuptools["package-dir"] == {package: folder for folder, package in MAPPED.items()}


def test_server_imports_as_a_subpackage() -> None:
    import cxr_monai.server.servicer as servicer

    assert Path(servicer.__file__).resolve().parent == ROOT / "server"
