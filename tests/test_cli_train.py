"""``cxr-monai train`` with its output going to a file, as under CI, nohup or a scheduler: one log line per
epoch, no alarming noise, and the same model from two runs."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cxr_monai.constants import CLASS_NAMES
from tests.bundle_factory import make_items

pytestmark = pytest.mark.slow
ROOT = Path(__file__).parents[1]
EPOCH_LINE = re.compile(
    r"fold 0 epoch (\d)/2: train loss \d+\.\d{4}, val accuracy [01]\.\d{3}, \d+ s, ETA \d+ (s|min)$"
)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[Path, str]]:
    """Two identical 2-epoch runs of fold 0, stdout and stderr to a file: (output folder, file text)."""
    root = tmp_path_factory.mktemp("train")
    training = make_items(root / "a", 6, fold=0, size_tells_class=False) + make_items(
        root / "b", 6, fold=1, prefix="b", size_tells_class=False, seed=1
    )
    datalist = root / "datalist.json"
    test = make_items(root / "t", 3, prefix="t", seed=2)
    datalist.write_text(json.dumps({"class_names": list(CLASS_NAMES), "training": training, "test": test}))
    done = []
    for name in ("one", "two"):
        out, log = root / name, root / f"{name}.log"
        args = ["train", "--datalist", str(datalist), "--out", str(out), "--folds", "0", "--max-epochs", "2",
                "--spatial-size", "32", "--batch-size", "4", "--threads", "1"]  # fmt: skip
        with log.open("w") as stream:
            code = subprocess.run(
                [sys.executable, "-c", "from cxr_monai.cli import app; app()", *args],
                stdout=stream,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
                env={**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "100"},
                timeout=300,
            ).returncode
        text = log.read_text()
        assert code == 0, text
        done.append((out, text))
    return done


def test_each_epoch_is_a_log_line_when_output_is_a_file(runs) -> None:
    _, text = runs[0]
    epochs = [int(m.group(1)) for line in text.splitlines() if (m := EPOCH_LINE.search(line))]
    assert epochs == [1, 2], text


def test_a_short_run_prints_no_alarming_noise(runs) -> None:
    _, text = runs[0]
    assert "Current learning rate" not in text  # LrScheduleHandler's print, only with --verbose
    assert "worker processes" not in text  # DataLoader: more workers than the CPUs this process may use
    assert "PatientOrientation" not in text


def test_two_runs_give_the_same_model_and_figures(runs) -> None:
    (one, _), (two, _) = runs
    first, second = (
        torch.load(out / "fold_0" / "models" / "model.pt", weights_only=True) for out in (one, two)
    )
    assert first.keys() == second.keys()
    assert all(torch.equal(first[key], second[key]) for key in first), "weights differ between two runs"
    logs = [json.loads((out / "fold_0" / "logs" / "training_log.json").read_text()) for out in (one, two)]
    figures = ("train_loss", "train_accuracy", "val_loss", "val_accuracy")
    assert [[e[k] for k in figures] for e in logs[0]] == [[e[k] for k in figures] for e in logs[1]]
