"""The committed generated modules (cxr_monai/api/v1) are exactly what grpcio-tools makes from protos/."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROTO = Path("protos/cxr_monai/api/v1/cxr_triage.proto")
GENERATED = ("cxr_triage_pb2.py", "cxr_triage_pb2.pyi", "cxr_triage_pb2_grpc.py")


def test_generated_modules_match_the_proto(tmp_path: Path) -> None:
    subprocess.run(
        [
            sys.executable, "-m", "grpc_tools.protoc", "-Iprotos",
            f"--python_out={tmp_path}", f"--pyi_out={tmp_path}", f"--grpc_python_out={tmp_path}", str(PROTO),
        ],
        cwd=ROOT,
        check=True,
    )  # fmt: skip
    for name in GENERATED:
        fresh = (tmp_path / "cxr_monai" / "api" / "v1" / name).read_text()
        committed = (ROOT / "cxr_monai" / "api" / "v1" / name).read_text()
        assert committed == fresh, (
            f"cxr_monai/api/v1/{name} is stale: regenerate it (see cxr_monai/api/v1/__init__.py)"
        )
