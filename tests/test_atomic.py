"""Atomic writers: a failed write leaves the previous file and no temporary file; permissions are usual."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from cxr_monai.atomic import atomic_path, write_json_atomic


def test_json_written_and_previous_file_kept_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "deep" / "out.json"
    write_json_atomic(target, {"a": 1})
    assert json.loads(target.read_text()) == {"a": 1}
    with pytest.raises(TypeError):
        write_json_atomic(target, {"a": object()})  # not serialisable
    assert json.loads(target.read_text()) == {"a": 1}, "the previous file is untouched"
    assert sorted(p.name for p in target.parent.iterdir()) == ["out.json"], "no temp file left"


def test_failure_inside_the_block_leaves_nothing(tmp_path: Path) -> None:
    target = tmp_path / "image.png"
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_bytes(b"half a PNG")
        raise RuntimeError("encoder failed")
    assert list(tmp_path.iterdir()) == []


def test_finished_file_has_the_usual_permissions(tmp_path: Path) -> None:
    umask = os.umask(0o027)
    try:
        with atomic_path(tmp_path / "x.bin") as tmp:
            tmp.write_bytes(b"1")
    finally:
        os.umask(umask)
    assert stat.S_IMODE((tmp_path / "x.bin").stat().st_mode) == 0o640  # 0666 less the umask, not 0600


def test_the_umask_is_never_read_or_set(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Setting the umask to read it races with other threads' file creation."""

    def forbidden(mask: int) -> int:
        raise AssertionError("os.umask called")

    monkeypatch.setattr(os, "umask", forbidden)
    write_json_atomic(tmp_path / "a.json", [1])
    assert json.loads((tmp_path / "a.json").read_text()) == [1]
