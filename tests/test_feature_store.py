"""The content-keyed feature store: found again after a move, missed after an edit, separate per spec,
resumed after a kill, and a damaged file rebuilt rather than trusted."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np

from cxr_monai.feature_store import FeatureStore


def film(path: Path, content: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


def test_arrays_follow_the_content_not_the_path(tmp_path):
    store = FeatureStore(tmp_path / "cache", "spec-a")
    a = film(tmp_path / "a.png", b"film one")
    store.put(a, np.arange(4, dtype=np.float32))
    (tmp_path / "elsewhere").mkdir()
    moved = shutil.copy(a, tmp_path / "elsewhere" / "renamed.png")
    np.testing.assert_array_equal(store.get(moved), np.arange(4, dtype=np.float32))
    edited = film(tmp_path / "b.png", b"film one, edited")
    assert store.get(edited) is None
    assert FeatureStore(tmp_path / "cache", "spec-b").get(a) is None  # another trunk or option: no hit
    assert store.get(tmp_path / "missing.png") is None
    assert len(store) == 1


def test_a_damaged_file_is_rebuilt_not_trusted(tmp_path):
    store = FeatureStore(tmp_path / "cache", "spec")
    a = film(tmp_path / "a.png", b"film")
    store.put(a, np.ones(1280, dtype=np.float32))
    (stored,) = (tmp_path / "cache" / "spec").rglob("*.npy")
    stored.write_bytes(stored.read_bytes()[:200])  # truncated on disk
    assert store.get(a) is None
    assert not stored.exists()
    store.put(a, np.ones(1280, dtype=np.float32))
    assert float(np.asarray(store.get(a)).sum()) == 1280.0


def test_a_killed_run_leaves_whole_files_and_a_rerun_computes_only_the_rest(tmp_path):
    """A child process stores films one by one and is killed midway; the stored ones read back whole and a
    second pass computes only the others."""
    films = [film(tmp_path / "films" / f"{i}.png", f"film {i}".encode()) for i in range(40)]
    script = textwrap.dedent(
        f"""
        import sys, time, numpy as np
        from cxr_monai.feature_store import FeatureStore
        store = FeatureStore({str(tmp_path / "cache")!r}, "spec")
        for i, path in enumerate(sys.argv[1:]):
            store.put(path, np.full(50_000, i, dtype=np.float32))
            print(i, flush=True)
            time.sleep(0.05)
        """
    )
    child = subprocess.Popen(
        [sys.executable, "-c", script, *map(str, films)], stdout=subprocess.PIPE, text=True
    )
    assert child.stdout is not None
    for line in child.stdout:
        if int(line) == 9:
            os.kill(child.pid, signal.SIGKILL)
            break
    child.wait()
    store = FeatureStore(tmp_path / "cache", "spec")
    done = [i for i, path in enumerate(films) if store.get(path) is not None]
    assert 10 <= len(done) < len(films)
    for i in done:
        assert float(np.asarray(store.get(films[i]))[0]) == i
    computed = 0
    for path in films:
        if store.get(path) is None:
            store.put(path, np.zeros(3, dtype=np.float32))
            computed += 1
    assert computed == len(films) - len(done)
