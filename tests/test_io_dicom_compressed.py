"""read_cxr on compressed transfer syntaxes: RLE, JPEG 2000, JPEG baseline/extended/lossless, JPEG-LS.

Encoders: pydicom + pylibjpeg (RLE, JPEG 2000), Pillow + pydicom.encaps (JPEG baseline), dcmtk's
dcmcjpeg/dcmcjpls (JPEG extended 12-bit, JPEG lossless, JPEG-LS; skipped when dcmtk is missing).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydicom.uid import (
    JPEG2000,
    UID,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)

from cxr_monai.io import read_cxr
from tests.dicom_factory import (
    colour_gradient,
    dcmtk_encode,
    gradient,
    has_tool,
    jpeg_baseline,
    make_dataset,
    save,
    syntax_of,
)

LUMA = np.array([0.299, 0.587, 0.114])


@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
@pytest.mark.parametrize("syntax", [RLELossless, JPEG2000Lossless])
def test_lossless_pydicom_encoders(tmp_path: Path, syntax: UID, photometric: str) -> None:
    stored = gradient(12)
    ds = make_dataset(stored, photometric, bits_stored=12)
    ds.compress(syntax)
    image = read_cxr(save(ds, tmp_path / "a.dcm"))
    expected = 4095.0 - stored if photometric == "MONOCHROME1" else stored.astype(np.float32)
    np.testing.assert_array_equal(image.pixels, expected)
    assert image.extra["transfer_syntax"] == syntax.name


def test_jpeg2000_lossy(tmp_path: Path) -> None:
    stored = gradient(16)
    ds = make_dataset(stored, bits_stored=16)
    ds.compress(JPEG2000, j2k_psnr=[80])
    image = read_cxr(save(ds, tmp_path / "a.dcm"))
    assert np.abs(image.pixels - stored).max() < 0.01 * 65535


@pytest.mark.parametrize(("syntax", "photometric"), [(JPEG2000Lossless, "YBR_RCT"), (JPEG2000, "YBR_ICT")])
def test_jpeg2000_colour_transforms_become_luminance(tmp_path: Path, syntax: UID, photometric: str) -> None:
    rgb = colour_gradient()
    ds = make_dataset(rgb, "RGB")
    ds.PhotometricInterpretation = photometric  # the encoder applies the matching multi-component transform
    ds.compress(syntax, **({"j2k_psnr": [60]} if syntax == JPEG2000 else {}))
    image = read_cxr(save(ds, tmp_path / "a.dcm"))
    assert image.color_mode == photometric
    np.testing.assert_allclose(image.pixels, rgb @ LUMA, atol=2.0)


def test_jpeg_baseline_grayscale(tmp_path: Path) -> None:
    stored = gradient(8)
    path = save(jpeg_baseline(stored), tmp_path / "a.dcm")
    assert syntax_of(path) == JPEGBaseline8Bit
    image = read_cxr(path)
    assert image.shape == stored.shape
    assert np.abs(image.pixels - stored).mean() < 2.0


def test_jpeg_baseline_ybr_full_422_becomes_luminance(tmp_path: Path) -> None:
    rgb = colour_gradient()
    image = read_cxr(save(jpeg_baseline(rgb), tmp_path / "a.dcm"))
    assert image.color_mode == "YBR_FULL_422"
    assert np.abs(image.pixels - rgb @ LUMA).mean() < 2.0


DCMTK_CASES = [
    ("dcmcjpeg", ["+e1"], JPEGLosslessSV1, 16, 0.0),
    ("dcmcjpeg", ["+el", "+sv", "6"], UID("1.2.840.10008.1.2.4.57"), 12, 0.0),
    ("dcmcjpeg", ["+ee", "+q", "95"], JPEGExtended12Bit, 12, 0.02 * 4095),
    ("dcmcjpls", ["+el"], JPEGLSLossless, 16, 0.0),
    ("dcmcjpls", ["+en", "+md", "2"], JPEGLSNearLossless, 12, 2.0),
]


@pytest.mark.parametrize(("tool", "options", "syntax", "bits", "tolerance"), DCMTK_CASES)
@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
def test_dcmtk_jpeg_codecs(
    tmp_path: Path, tool: str, options: list[str], syntax: UID, bits: int, tolerance: float, photometric: str
) -> None:
    if not has_tool(tool):
        pytest.skip(f"dcmtk's {tool} is not installed")
    stored = gradient(bits)
    source = save(make_dataset(stored, photometric, bits_stored=bits), tmp_path / "native.dcm")
    path = dcmtk_encode(tool, options, source, tmp_path / "encoded.dcm")
    assert syntax_of(path) == syntax
    image = read_cxr(path)
    expected = (2.0**bits - 1) - stored if photometric == "MONOCHROME1" else stored.astype(np.float64)
    assert np.abs(image.pixels - expected).max() <= tolerance
    assert image.extra["transfer_syntax_uid"] == str(syntax)
