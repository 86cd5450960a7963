"""Per-film arrays computed once and kept on disk, keyed by the film's content: trunk features, the
shortcut baseline's thumbnails.

Layout: ``<root>/<spec>/<kk>/<key>.npy``. ``spec`` names what the arrays depend on besides the film (a
digest of the trunk's weights and the pre-processing, or the baseline's feature version), so another
trunk or option never reads stale arrays; ``key`` is the SHA-256 of the film's bytes, so a film moved,
renamed or copied is found again, and an edited one is not; ``kk`` (the key's first two hex digits)
shards the files over 256 folders. Each file is written atomically (a killed run leaves whole files
only, and a rerun computes only the rest) and read memory-mapped, so memory does not grow with the
number of films. A file that cannot be read back as an array (damaged on disk) is removed and counted as
missing: it is rebuilt, never trusted.

MONAI's ``PersistentDataset`` keys entries by the data item (a path), not by content, and caches the
whole transformed item; hence this small store.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from pathlib import Path

import numpy as np

from cxr_monai.atomic import atomic_path

logger = logging.getLogger(__name__)

_BLOCK = 1 << 20


def file_digest(path: str | os.PathLike[str]) -> str:
    """SHA-256 (hex) of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


class FeatureStore:
    """Arrays of one kind (``spec``) under ``root``, one file per film content.

    Thread-safe; content digests are remembered per (path, size, modification time) for the life of the
    store, so a film is read for hashing once per process.
    """

    def __init__(self, root: str | os.PathLike[str], spec: str) -> None:
        self.folder = Path(root) / spec
        self._digests: dict[tuple[str, int, int], str] = {}
        self._lock = threading.Lock()

    def key(self, path: str | os.PathLike[str]) -> str | None:
        """The film's content digest; None when it is not a readable file (the reader names the problem)."""
        try:
            stat = os.stat(path)
            marker = (os.fspath(path), stat.st_size, stat.st_mtime_ns)
            with self._lock:
                known = self._digests.get(marker)
            if known is None:
                known = file_digest(path)
                with self._lock:
                    self._digests[marker] = known
            return known
        except OSError:
            return None

    def _file(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.npy"

    def get(self, path: str | os.PathLike[str]) -> np.ndarray | None:
        """The stored array of the film at ``path`` (memory-mapped, read-only), or None when absent."""
        key = self.key(path)
        if key is None:
            return None
        file = self._file(key)
        if not file.is_file():
            return None
        try:
            return np.load(file, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError, EOFError) as exc:
            logger.warning("feature file %s is damaged (%s); it is rebuilt", file.name, type(exc).__name__)
            file.unlink(missing_ok=True)
            return None

    def put(self, path: str | os.PathLike[str], array: np.ndarray) -> None:
        """Store ``array`` for the film at ``path`` (atomically); nothing when the file cannot be read."""
        key = self.key(path)
        if key is None:
            return
        with atomic_path(self._file(key)) as tmp, open(tmp, "wb") as handle:
            # not np.ascontiguousarray: it turns a 0-d (structured) array into a 1-d one
            np.save(handle, np.asarray(array).copy(order="C"), allow_pickle=False)

    def __len__(self) -> int:
        """Films stored (files in the store)."""
        return sum(1 for _ in self.folder.glob("*/*.npy")) if self.folder.is_dir() else 0
