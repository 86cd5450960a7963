"""``benchmarks/paper_grid.py --scale tiny``: the grid's CPU path end to end on a tiny datalist (one backbone,
v1 and v2), and the paper scale's settings."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import pytest
from test_augmentation_v2 import write_tiny_datalist

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "paper_grid.py"


def load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("paper_grid", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_paper_scale_is_the_papers() -> None:
    paper = load_script().SCALES["paper"]
    assert (paper["--spatial-size"], paper["--max-epochs"], paper["--folds"]) == ("224", "50", "all")
    assert (paper["--gan-iterations"], paper["--n-synthetic"]) == ("5000", "100")


def test_tiny_grid_trains_v1_and_v2_and_compares(tmp_path: Path) -> None:
    datalist = write_tiny_datalist(tmp_path, n_folds=2, per_class=3, test_per_class=2)
    out = tmp_path / "grid"
    grid = load_script()
    args = [
        "--datalist",
        str(datalist),
        "--out",
        str(out),
        "--scale",
        "tiny",
        "--backbones",
        "efficientnet_b0",
    ]
    grid.main([*args, "--bootstrap", "20", "--device", "cpu"])
    data = json.loads((out / "compare" / "compare.json").read_text())
    assert [(r["name"], r["augmentation"]) for r in data["runs"]] == [
        ("efficientnet_b0_v1", "v1"),
        ("efficientnet_b0_v2", "v2"),
    ]
    assert (out / "gan_cache").is_dir()
    results = (out / "paper_grid.md").read_text()
    assert "python benchmarks/paper_grid.py" in results and "| efficientnet_b0 | 0.968 |" in results
    assert "### compare's report" in results and "](compare/fig5_confusion_matrices.png)" in results
    with pytest.raises(SystemExit):
        grid.main([*args[:4], "--backbones", "alexnet"])


def test_v2_backbones_limit_which_backbones_run_v2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    grid = load_script()
    calls: list[list[str]] = []
    monkeypatch.setattr(grid, "_cli", lambda args, env: calls.append(args))
    backbones = ["vgg16", "efficientnet_b0"]
    runs = grid.run_grid(
        tmp_path / "d.json", tmp_path, "cpu", backbones, ["v1", "v2"], None, 10, ["efficientnet_b0"]
    )
    assert [run.name for run in runs] == ["vgg16_v1", "efficientnet_b0_v1", "efficientnet_b0_v2"]
    trained = [(c[c.index("--backbone") + 1], c[c.index("--augmentation") + 1]) for c in calls[:-1]]
    assert trained == [("vgg16", "v1"), ("efficientnet_b0", "v1"), ("efficientnet_b0", "v2")]
    assert calls[-1][0] == "compare" and calls[-1][1:4] == [str(run) for run in runs]
    assert "--gan-cache" in calls[2] and "--gan-cache" not in calls[1]
