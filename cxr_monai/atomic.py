"""Write output files so that nobody ever sees a partial one.

Each writer fills a temporary file in the target's folder and renames it over the target only when it
is complete (``os.replace`` is atomic within one file system); on any error the temporary file is
removed and the target is left as it was. The standard library has no such writer, hence this module.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

# mkstemp creates files 0600; finished files get the permissions an ordinary open() would give them.
_UMASK = os.umask(0)
os.umask(_UMASK)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (parents created); on success it becomes ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def write_text_atomic(path: str | Path, text: str) -> None:
    """``text`` (UTF-8, newlines as given) to ``path``, atomically."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8", newline="") as handle:
        handle.write(text)


def write_json_atomic(path: str | Path, obj: Any, indent: int = 2) -> None:
    """``obj`` as indented UTF-8 JSON with a final newline to ``path``, atomically."""
    write_text_atomic(path, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")
