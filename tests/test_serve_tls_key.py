"""Issue 19, item 6 (last point): ``cxr-monai serve`` with a TLS key that does not match its certificate
stops with one line, not grpc's "Failed to bind" traceback (and its C-core error lines). The gateway has
no TLS; ``serve`` is where the key is used."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from bundle_factory import make_trained_bundle

from tests.test_server import _self_signed

TESTS = Path(__file__).resolve().parent


@pytest.mark.slow
def test_a_key_that_does_not_match_its_certificate_is_one_line(tmp_path: Path) -> None:
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
    cert, _ = _self_signed(tmp_path / "a")
    _, other_key = _self_signed(tmp_path / "b")
    bundle = make_trained_bundle(tmp_path / "bundle")
    env = dict(
        os.environ, COLUMNS="400", PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])
    )
    command = [sys.executable, "-c", "from cxr_monai.cli import app; app()", "serve", "--bundle", str(bundle)]
    command += [
        "--address",
        "127.0.0.1:0",
        "--device",
        "cpu",
        "--tls-cert",
        str(cert),
        "--tls-key",
        str(other_key),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=180, env=env)
    assert result.returncode == 1, result.stderr[-2000:]
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    errors = [line for line in lines if not line[:4].isdigit()]  # log lines start with the date
    assert len(errors) == 1, errors
    assert errors[0].startswith("error:") and "does not match" in errors[0] and "--tls-key" in errors[0]
    assert "Traceback" not in result.stderr and "Failed to bind" not in result.stderr
