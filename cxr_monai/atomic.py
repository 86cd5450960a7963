"""Write output files so that nobody ever sees a partial one.

Each writer fills a temporary file in the target's folder and renames it over the target only when it
is complete (``os.replace`` is atomic within one file system); on any error the temporary file is
removed and the target is left as it was. The standard library has no such writer, hence this module.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

#: Attempts at a free temporary name before giving up (names are 64 random bits: a clash is a bug).
_NAME_ATTEMPTS = 8


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (parents created); on success it becomes ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _create_temporary(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _create_temporary(path: Path) -> Path:
    """Create an empty hidden file beside ``path`` with mode 0666 less the process umask, as open() would.

    (``tempfile.mkstemp`` creates 0600 files, and reading the umask to widen them means setting it, which
    races with other threads; creating the file with an explicit mode lets the kernel apply the umask.)
    """
    for _ in range(_NAME_ATTEMPTS):
        tmp = path.parent / f".{path.name}.{secrets.token_hex(8)}.tmp"
        try:
            os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
        except FileExistsError:
            continue
        return tmp
    raise FileExistsError(f"no free temporary name beside {path}")


def write_text_atomic(path: str | Path, text: str) -> None:
    """``text`` (UTF-8, newlines as given) to ``path``, atomically."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8", newline="") as handle:
        handle.write(text)


def write_json_atomic(path: str | Path, obj: Any, indent: int = 2) -> None:
    """``obj`` as indented UTF-8 JSON with a final newline to ``path``, atomically."""
    write_text_atomic(path, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")
