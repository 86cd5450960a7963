"""``cxr-monai predict`` under torchrun on CPU (gloo): 2 ranks give the output of 1 process, byte for byte,
also when they resume an output a single process left half done."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from bundle_factory import make_trained_bundle, write_site_profile
from test_predict_archive import add_bad_films, make_archive, predict

pytestmark = pytest.mark.slow
TESTS = Path(__file__).resolve().parent


def torchrun(tmp_path: Path, ranks: int, *args: str | Path) -> subprocess.CompletedProcess[str]:
    """``python -m torch.distributed.run --standalone --nproc_per_node RANKS <cxr-monai> predict ARGS``."""
    entry = tmp_path / "cxr_monai_entry.py"  # what the cxr-monai console script runs
    entry.write_text("from cxr_monai.cli import app\n\napp()\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
    command += [str(entry), "predict", *(str(a) for a in args)]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)


def test_two_ranks_write_the_output_of_one_process(tmp_path):
    bundle = make_trained_bundle(tmp_path / "bundle", spatial_size=32)
    profiles = tmp_path / "sites"
    write_site_profile(profiles, bundle, "north", 2)
    root = make_archive(tmp_path / "archive", n=14)
    add_bad_films(root)
    options = ["--bundle", bundle, "--site-profiles", profiles, "--site", "north", "--batch-size", "3"]
    options += ["--threads", "1"]
    single = tmp_path / "single.csv"
    result = predict(root, *options, "--workers", "0", "--out", single)
    assert result.exit_code == 0, result.output

    two = tmp_path / "two" / "scores.csv"
    run = torchrun(tmp_path, 2, root, *options, "--workers", "1", "--out", two)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "scoring 18 of 18 films on 2 ranks" in run.stderr
    assert "15 of 18 films" in run.stderr and "3 failed" in run.stderr
    assert two.read_text() == single.read_text()
    assert sorted(p.name for p in two.parent.iterdir()) == ["scores.csv", "scores.csv.run.json"]

    # a single process scored two batches and was killed writing the third; 2 ranks finish the job (the
    # resumed batches are the single run's batches, so the numbers are the same bit for bit)
    resumed = tmp_path / "resumed.csv"
    lines = single.read_text().splitlines(keepends=True)
    resumed.write_text("".join(lines[:7]) + lines[7][:20])
    resumed.with_name("resumed.csv.run.json").write_text(single.with_name("single.csv.run.json").read_text())
    run = torchrun(tmp_path, 2, root, *options, "--workers", "0", "--out", resumed)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "scoring 12 of 18 films on 2 ranks (6 already in" in run.stderr
    assert resumed.read_text() == single.read_text()
