"""A built wheel works on its own: installed (not editable) into a fresh virtual environment, run from a
folder outside the source tree, it finds its bundles, trains one tiny epoch, evaluates and explains."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from bundle_factory import make_items, write_datalist
from venv_tools import make_venv

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def _run(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{' '.join(args[:3])} exited {done.returncode}:\n{done.stderr[-3000:]}"
    return done


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """(the venv's bin folder, an environment without the checkout on any path)."""
    work = tmp_path_factory.mktemp("wheel")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["OMP_NUM_THREADS"] = "1"
    pip_wheel = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
    _run([*pip_wheel, "-w", str(work / "dist"), str(ROOT)], work, env)
    wheel = next((work / "dist").glob("cxr_monai-*.whl"))
    # The venv sees this interpreter's packages (torch, MONAI ...) but gets cxr-monai from the wheel alone.
    bin_dir = make_venv(work / "venv")
    _run(
        [str(bin_dir / "python"), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
        work,
        env,
    )
    return bin_dir, env


def test_the_installed_package_is_the_wheel_not_the_checkout(installed: tuple[Path, dict[str, str]]) -> None:
    bin_dir, env = installed
    code = (
        "import cxr_monai.bundles as b, cxr_monai.server.app as s; print(b.bundles_root()); print(s.__file__)"
    )
    out = _run([str(bin_dir / "python"), "-c", code], bin_dir, env).stdout.split()
    venv = bin_dir.parent
    assert all(Path(p).is_relative_to(venv) for p in out), out
    assert (Path(out[0]) / "cxr_classifier" / "configs" / "train.json").is_file()
    listing = _run([str(bin_dir / "cxr-monai"), "bundle", "list"], bin_dir, env).stdout
    assert "cxr_cyclegan" in listing
    assert "Chest X-ray triage" in _run([str(bin_dir / "cxr-monai"), "--help"], bin_dir, env).stdout


def test_train_evaluate_and_explain_through_the_installed_bundle(
    installed: tuple[Path, dict[str, str]], tmp_path: Path
) -> None:
    bin_dir, env = installed
    cli = str(bin_dir / "cxr-monai")
    training = make_items(tmp_path / "img", 6, size_tells_class=False, fold=0) + make_items(
        tmp_path / "img", 6, size_tells_class=False, fold=1, prefix="b", seed=1
    )
    test = make_items(tmp_path / "test", 3, size_tells_class=False, prefix="t", seed=2)
    datalist = write_datalist(tmp_path / "datalist.json", training, test)
    run_dir, eval_dir, explain_dir = tmp_path / "run", tmp_path / "eval", tmp_path / "explain"
    tiny = ["--folds", "0", "--max-epochs", "1", "--spatial-size", "32", "--batch-size", "4"]
    tiny += ["--num-workers", "0", "--threads", "1"]
    _run([cli, "train", "--datalist", str(datalist), "--out", str(run_dir), *tiny], tmp_path, env)
    assert (run_dir / "final" / "models" / "model.pt").is_file()
    split = ["--split", "test", "--out", str(eval_dir)]
    _run(
        [cli, "evaluate", "--bundle", str(run_dir / "final"), "--datalist", str(datalist), *split],
        tmp_path,
        env,
    )
    metrics = json.loads((eval_dir / "metrics.json").read_text())
    assert metrics["model_metrics"]["n_images"] == 3
    with (eval_dir / "predictions.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert sorted(Path(row["image"]).name for row in rows) == sorted(Path(t["image"]).name for t in test)
    right = [row["predicted_class"] == row["true_class"] for row in rows]
    assert metrics["model_metrics"]["accuracy"]["value"] == pytest.approx(sum(right) / len(right))
    _run([cli, "explain", test[0]["image"], "--bundle", str(run_dir / "final"), "--out", str(explain_dir)],
         tmp_path, env)  # fmt: skip
    assert sorted(p.suffix for p in explain_dir.iterdir()) == [".json", ".png"]


def test_a_venv_made_from_inside_a_venv_sees_that_venv_s_packages(tmp_path: Path) -> None:
    """What the wheel check's venv needs when the suite runs in a user's venv: a package installed only in
    the outer venv (not in the base interpreter) is importable in a venv made from it."""
    outer = make_venv(tmp_path / "outer")
    outer_site = _run(
        [str(outer / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        tmp_path,
        dict(os.environ),
    ).stdout.strip()
    (Path(outer_site) / "only_in_the_outer_venv.py").write_text("MARK = 1\n")
    tools = str(Path(__file__).with_name("venv_tools.py"))
    _run([str(outer / "python"), tools, str(tmp_path / "inner")], tmp_path, dict(os.environ))
    code = "import only_in_the_outer_venv, grpc, typer, torch; print(only_in_the_outer_venv.MARK)"
    out = _run([str(tmp_path / "inner" / "bin" / "python"), "-c", code], tmp_path, dict(os.environ))
    assert out.stdout.strip() == "1"
