"""A fresh virtual environment that sees the running interpreter's installed packages.

``python -m venv --system-site-packages`` is not that: run from inside a venv it gives the *base*
interpreter's packages, not the venv's, so a test built on it passes with the system Python and fails for
a user working in a venv. Here the new venv gets a ``.pth`` file listing every site-packages folder on the
running interpreter's path. A ``.pth`` line only adds a folder to ``sys.path``: the ``.pth`` hooks inside it
(e.g. an editable install of cxr-monai) do not run, so what the new venv installs itself comes first.

Run as a script (``python venv_tools.py DEST``) to make one with another interpreter.
"""

from __future__ import annotations

import subprocess
import sys
import sysconfig
from pathlib import Path

PTH_NAME = "_running_environment.pth"


def site_folders() -> list[str]:
    """The site-packages / dist-packages folders on this interpreter's path, in path order."""
    return [p for p in dict.fromkeys(sys.path) if p.rstrip("/").endswith(("site-packages", "dist-packages"))]


def make_venv(destination: Path) -> Path:
    """Create a venv at ``destination`` seeing this interpreter's packages; returns its ``bin`` folder."""
    subprocess.run([sys.executable, "-m", "venv", str(destination)], check=True, capture_output=True)
    purelib = subprocess.run(
        [
            str(destination / "bin" / "python"),
            "-c",
            "import sysconfig; print(sysconfig.get_paths()['purelib'])",
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    (Path(purelib) / PTH_NAME).write_text("\n".join(site_folders()) + "\n")
    return destination / "bin"


def own_site_packages() -> Path:
    """This interpreter's own purelib folder (a venv's, when run in one)."""
    return Path(sysconfig.get_paths()["purelib"])


if __name__ == "__main__":
    make_venv(Path(sys.argv[1]))
