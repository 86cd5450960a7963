"""An archive's films: a folder tree walked in sorted order, or a datalist JSON, as :class:`Film` entries.

Every entry has a *key*, its path relative to the archive root in POSIX form: the ``path`` column of the
output, what a rerun skips, and the order of the output. A folder that cannot be read (no permission)
becomes an entry of its own with the reason, so the run lists it and goes on.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from cxr_monai.errors import DatasetError

#: Files a folder walk skips besides hidden ones: documents and metadata kept beside images (as
#: ``cxr-monai explain`` skips them; the output CSV and its run record are skipped through this too).
NOT_IMAGES = frozenset({".json", ".txt", ".md", ".csv", ".xml", ".html", ".pdf", ".py"})


@dataclass(frozen=True)
class Film:
    """One archive entry.

    Attributes:
        key: the path relative to the archive root, POSIX separators (a folder's ends with ``/``).
        path: the file to read.
        error: why the entry cannot be read at all (an unreadable folder), else None.
    """

    key: str
    path: str
    error: str | None = None


def printable(key: str) -> str:
    """``key`` as the output writes it: bytes that are not UTF-8 (a file name from another system) as
    ``\\xNN`` and control characters (a line break in a file name) as ``\\xNN``, so a row stays one line."""
    try:
        raw = os.fsencode(key)
    except UnicodeEncodeError:  # a lone surrogate from a JSON datalist
        raw = key.encode("utf-8", errors="backslashreplace")
    text = raw.decode("utf-8", errors="backslashreplace")
    return "".join(f"\\x{ord(c):02x}" if ord(c) < 32 or ord(c) == 127 else c for c in text)


def list_archive(archive: Path) -> tuple[Path, list[Film]]:
    """(the archive root, its films): a folder walked, a ``.json`` datalist read, or one image file.

    Raises:
        DatasetError: the path does not exist, the folder holds no film, or the datalist is not one.
    """
    if archive.is_dir():
        return archive, list_folder(archive)
    if not archive.exists():
        raise DatasetError(f"no such file or directory: {archive}")
    if archive.suffix.lower() == ".json":
        return archive.parent, list_datalist(archive)
    return archive.parent, [Film(archive.name, str(archive))]


def list_folder(root: Path) -> list[Film]:
    """Every file under ``root`` (recursively; hidden files and folders and :data:`NOT_IMAGES` skipped),
    plus one entry per folder that could not be read, sorted by their path's parts.

    Raises:
        DatasetError: ``root`` cannot be read, or holds nothing to score.
    """
    films: list[Film] = []
    unreadable_root: list[OSError] = []

    def on_error(exc: OSError) -> None:
        folder = Path(exc.filename) if exc.filename else root
        if folder == root:
            unreadable_root.append(exc)
            return
        key = printable(folder.relative_to(root).as_posix() + "/")
        films.append(Film(key, str(folder), f"folder cannot be read ({exc.strerror or type(exc).__name__})"))

    for folder, subfolders, files in os.walk(root, onerror=on_error):
        subfolders[:] = [name for name in subfolders if not name.startswith(".")]
        relative = Path(folder).relative_to(root)
        for name in files:
            if name.startswith(".") or os.path.splitext(name)[1].lower() in NOT_IMAGES:
                continue
            films.append(Film(printable((relative / name).as_posix()), os.path.join(folder, name)))
    if unreadable_root:
        exc = unreadable_root[0]
        raise DatasetError(f"{root}: cannot be read ({exc.strerror or type(exc).__name__})")
    if not films:
        skipped = " ".join(sorted(NOT_IMAGES))
        raise DatasetError(f"no films found in {root} (hidden files and {skipped} are skipped)")
    films.sort(key=lambda film: PurePosixPath(film.key).parts)
    return films


def list_datalist(path: Path) -> list[Film]:
    """The ``image`` of every item of a datalist, in the document's order, each once.

    The document is a JSON list of items (or of image paths), or an object whose lists of items are read
    in turn (a MONAI datalist: ``training``, ``test``, ...). Relative paths are resolved against the
    datalist's folder, as ``cxr-monai prepare`` datalists are; a film's key is its path relative to that
    folder when it lies below it, else the absolute path.

    Raises:
        DatasetError: the file is not JSON, holds no items, or an item has no ``image`` path.
    """
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DatasetError(f"datalist {path} is not readable JSON ({type(exc).__name__})") from None
    if isinstance(document, list):
        groups: list[tuple[str, list[Any]]] = [("items", document)]
    elif isinstance(document, dict):
        groups = [
            (str(name), value)
            for name, value in document.items()
            if isinstance(value, list) and value and all(isinstance(item, dict) for item in value)
        ]
    else:
        groups = []
    base = path.parent
    films: dict[str, Film] = {}
    for name, items in groups:
        for number, item in enumerate(items):
            image = item.get("image") if isinstance(item, dict) else item
            if not isinstance(image, str) or not image:
                raise DatasetError(f"datalist {path}: {name} item {number} has no 'image' path")
            full = Path(image) if Path(image).is_absolute() else base / image
            try:
                key = full.relative_to(base).as_posix()
            except ValueError:
                key = str(full)
            films.setdefault(printable(key), Film(printable(key), str(full)))
    if not films:
        raise DatasetError(f"datalist {path} lists no images (expected items with an 'image' path)")
    return list(films.values())
