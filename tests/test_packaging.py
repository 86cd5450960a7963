"""pyproject's explicit package list covers every package folder (server/ installs as cxr_monai.server)."""

from __future__ import annotations

from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]


def _folder_packages() -> set[str]:
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "cxr_monai").rglob("__init__.py")}
    found |= {
        ".".join(("cxr_monai", "server", *p.parent.relative_to(ROOT / "server").parts))
        for p in (ROOT / "server").rglob("__init__.py")
    }
    return found


def test_every_package_folder_is_installed() -> None:
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert set(setuptools["packages"]) == _folder_packages()
    assert setuptools["package-dir"] == {"cxr_monai.server": "server"}


def test_server_imports_as_a_subpackage() -> None:
    import cxr_monai.server.servicer as servicer

    assert Path(servicer.__file__).resolve().parent == ROOT / "server"
