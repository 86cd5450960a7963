"""Bytes that are no image at all are refused before any parser walks them: 63 MiB of zeros used to parse
as two million empty raw DICOM elements (about 15 s of CPU per call in the server)."""

from __future__ import annotations

import time

import pytest

from cxr_monai.errors import InvalidImageError
from cxr_monai.io import read_cxr
from cxr_monai.io.dicom import starts_like_raw_dataset


@pytest.mark.parametrize("junk", [bytes(63 * 2**20), b"\xff" * (8 * 2**20), b"hello world" * 100_000])
def test_junk_is_refused_with_bounded_cpu(junk: bytes) -> None:
    started = time.process_time()
    with pytest.raises(InvalidImageError, match="not a DICOM, PNG, JPEG or NIfTI image"):
        read_cxr(junk)
    assert time.process_time() - started < 1.0


def test_raw_data_sets_still_start_like_one() -> None:
    identifying = (0x0008).to_bytes(2, "little") + (0x0000).to_bytes(2, "little") + bytes(4)
    assert starts_like_raw_dataset(identifying)
    assert starts_like_raw_dataset((0x0008).to_bytes(2, "big") + bytes(6))
    assert not starts_like_raw_dataset(bytes(8))
    assert not starts_like_raw_dataset(b"\x08\x00")
