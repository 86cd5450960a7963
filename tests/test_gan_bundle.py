"""The ``cxr_cyclegan`` bundle and ``cxr-monai synthesize`` end to end on tiny PNGs the test writes.

Training runs 3 iterations at 32 px (base_channels 4) through ``python -m monai.bundle run training``;
synthesis then writes synthetic COVID-19 items whose folds, labels and roles are checked, and the
classifier's ``fold_items`` keeps them out of validation. Test items point at files that do not exist,
so any attempt to read one fails. An interrupted run resumes from its checkpoint; both configs pass
MONAI's property check.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from ignite.engine import Events
from monai.bundle import ConfigWorkflow
from PIL import Image
from typer.testing import CliRunner

from cxr_monai.cli import app
from cxr_monai.constants import CLASS_NAMES
from cxr_monai.errors import BundleError, DatasetError
from cxr_monai.gan.data import domain_items, gan_side
from cxr_monai.gan.synthesize import synthesize_covid
from cxr_monai.training import fold_items

BUNDLE = Path(__file__).resolve().parent.parent / "bundles" / "cxr_cyclegan"
TINY = {"spatial_size": 32, "base_channels": 4, "disc_base_channels": 4, "n_residual_blocks": 1}
ONE_THREAD_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
NORMAL, COVID = CLASS_NAMES.index("Normal"), CLASS_NAMES.index("COVID-19")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def datalist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """6 Normal (folds 0,1,2,0,1,2), 3 COVID-19 (folds 0..2), 3 Pneumonia training PNGs; 3 test items
    whose files do not exist."""
    root = tmp_path_factory.mktemp("gan_data")
    rng = np.random.default_rng(0)
    training: list[dict[str, Any]] = []
    for i, label in enumerate([NORMAL] * 6 + [COVID] * 3 + [2] * 3):
        path = root / f"img_{i}.png"
        Image.fromarray((rng.random((40, 36)) * 80 + 60 * (label == COVID)).astype(np.uint8)).save(path)
        training.append(
            {
                "image": str(path),
                "label": label,
                "label_name": CLASS_NAMES[label],
                "patient_id": f"p{i}",
                "source": "made-up",
                "fold": i % 3,
            }
        )
    test = [
        {
            "image": str(root / f"missing_{label}.png"),
            "label": label,
            "patient_id": f"t{label}",
            "source": "x",
        }
        for label in range(3)
    ]
    document = {"class_names": list(CLASS_NAMES), "num_folds": 3, "training": training, "test": test}
    path = root / "datalist.json"
    path.write_text(json.dumps(document))
    return path


@pytest.fixture(scope="module")
def gan_dir(datalist: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("gan") / "run"
    args = [f"--{k}={v}" for k, v in {**TINY, "max_iterations": 3, "log_interval": 2}.items()]
    config = str(BUNDLE / "configs" / "train.json")
    command = [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", config]
    command += ["--datalist", str(datalist), "--output_dir", str(out), *args]
    done = subprocess.run(command, env=ONE_THREAD_ENV, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def test_domains_are_real_training_items_outside_the_fold(datalist: Path) -> None:
    content = json.loads(datalist.read_text())
    normal, covid = domain_items(content)
    assert (len(normal), len(covid)) == (6, 3)
    normal, covid = domain_items(content, fold=1)
    assert {item["fold"] for item in normal + covid} == {0, 2}
    assert all(item["label"] == NORMAL for item in normal) and all(item["label"] == COVID for item in covid)
    content["training"] = [item for item in content["training"] if item["label"] != COVID]
    with pytest.raises(DatasetError, match="no COVID-19 training items"):
        domain_items(content)


def test_bundle_training_writes_generator_log_and_samples(gan_dir: Path) -> None:
    state = torch.load(gan_dir / "models" / "generator_normal2covid.pt", weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    log = json.loads((gan_dir / "logs" / "gan_log.json").read_text())
    assert [entry["iteration"] for entry in log] == [2, 3]
    for entry in log:
        assert all(
            np.isfinite(entry[key]) and entry[key] > 0 for key in ("d_loss", "g_adv", "cycle", "identity")
        )
    with Image.open(gan_dir / "logs" / "samples.png") as grid:
        # batch size 1, yet 4 columns (Normal images) x 3 rows (real, fake, reconstructed), 2 px padding
        assert (grid.mode, grid.size) == ("L", (4 * 34 + 2, 3 * 34 + 2))
    synth_config = json.loads((gan_dir / "configs" / "inference.json").read_text())
    assert (synth_config["spatial_size"], synth_config["base_channels"]) == (32, 4)
    assert synth_config["bundle_root"] == str(gan_dir.resolve())
    assert json.loads((gan_dir / "configs" / "train.json").read_text())["max_iterations"] == 3
    assert sorted(p.name for p in (gan_dir / "models").iterdir()) == [
        "checkpoint_final_iteration=3.pt",
        "generator_normal2covid.pt",
    ]
    meta = json.loads((gan_dir / "configs" / "metadata.json").read_text())
    assert "Research use only" in meta["intended_use"]
    info = json.loads((gan_dir / "logs" / "run_info.json").read_text())
    assert (info["normal_images"], info["covid_images"], info["parameters"]["seed"]) == (6, 3, 0)
    assert info["iterations"] == 3


def test_synthesize_cli_writes_training_only_items_in_their_source_fold(
    gan_dir: Path, datalist: Path, tmp_path: Path
) -> None:
    out = tmp_path / "synth"
    cmd = ["synthesize", "--gan", str(gan_dir), "--datalist", str(datalist), "--n", "8", "--out", str(out)]
    result = CliRunner().invoke(app, cmd)
    assert result.exit_code == 0, result.output
    pngs = sorted((out / "images").glob("*.png"))
    assert len(pngs) == 8
    with Image.open(pngs[0]) as image:
        assert (image.mode, image.size) == ("L", (32, 32))

    original = json.loads(datalist.read_text())
    new = json.loads((out / "datalist.json").read_text())
    assert new["test"] == original["test"]
    assert new["training"][: len(original["training"])] == original["training"]
    synthetic = new["training"][len(original["training"]) :]
    assert len(synthetic) == 8 and all(item["synthetic"] for item in synthetic)
    sources = {item["image"]: item for item in original["training"]}
    for item in synthetic:
        source = sources[item["source_image"]]
        assert source["label"] == NORMAL
        assert item["fold"] == source["fold"]
        assert item["patient_id"] == f"synthetic:{source['patient_id']}"
        assert (item["label"], item["label_name"], item["source"]) == (COVID, "COVID-19", "cyclegan")
        assert Path(item["image"]).is_file()
    assert len({item["source_image"] for item in synthetic}) == 6  # 8 draws from 6 Normal images

    report = json.loads((out / "synthesize_report.json").read_text())
    assert (report["synthetic_images"], report["seed"], report["gan_dir"]) == (8, 0, str(gan_dir.resolve()))
    assert sum(report["synthetic_per_fold"].values()) == 8

    assert all(item["gan_fold"] == -1 for item in synthetic)  # this GAN saw every training fold

    new_path = str(out / "datalist.json")
    synthetic_images = {i["image"] for i in synthetic}
    for fold in range(3):
        validate = {item["image"] for item in fold_items(new_path, fold, "validate")}
        assert validate == {i["image"] for i in original["training"] if i["fold"] == fold}
        # the GAN has seen fold K's COVID-19 images: none of its images may train the fold-K model
        train = {item["image"] for item in fold_items(new_path, fold, "train")}
        assert not synthetic_images & train
        assert {i["image"] for i in original["training"] if i["fold"] != fold} <= train
    assert synthetic_images <= {item["image"] for item in fold_items(new_path, -1, "train")}


def test_a_fold_specific_gan_trains_its_own_fold_only(tmp_path: Path) -> None:
    """Synthetic items of a GAN trained without fold 1 train the fold-1 model, and no other fold's."""
    real = [
        {
            "image": f"r{i}.png",
            "label": i % 3,
            "label_name": CLASS_NAMES[i % 3],
            "patient_id": f"p{i}",
            "fold": i % 3,
        }
        for i in range(9)
    ]
    fake = {
        "image": "fake.png",
        "label": COVID,
        "label_name": "COVID-19",
        "patient_id": "synthetic:p0",
        "fold": 0,
        "synthetic": True,
        "gan_fold": 1,
    }
    path = tmp_path / "datalist.json"
    path.write_text(json.dumps({"class_names": list(CLASS_NAMES), "training": [*real, fake], "test": []}))
    trains = {fold: {i["image"] for i in fold_items(str(path), fold, "train")} for fold in range(3)}
    fake_path = str(tmp_path / "fake.png")  # relative paths resolve against the datalist's folder
    assert fake_path in trains[1]
    assert fake_path not in trains[0] and fake_path not in trains[2]


def test_synthesize_is_seeded_and_can_leave_a_fold_out(gan_dir: Path, datalist: Path, tmp_path: Path) -> None:
    first = synthesize_covid(gan_dir, datalist, tmp_path / "a", n=4, seed=3, fold=2)
    again = synthesize_covid(gan_dir, datalist, tmp_path / "b", n=4, seed=3, fold=2)
    assert set(first["synthetic_per_fold"]) <= {"0", "1"}
    items_a = json.loads((tmp_path / "a" / "datalist.json").read_text())["training"][-4:]
    items_b = json.loads((tmp_path / "b" / "datalist.json").read_text())["training"][-4:]
    assert [i["source_image"] for i in items_a] == [i["source_image"] for i in items_b]
    assert first["synthetic_images"] == again["synthetic_images"] == 4
    pixels_a = np.asarray(Image.open(tmp_path / "a" / "images" / "synthetic_covid_0001.png"))
    pixels_b = np.asarray(Image.open(tmp_path / "b" / "images" / "synthetic_covid_0001.png"))
    assert np.array_equal(pixels_a, pixels_b)


def test_missing_generator_weights_is_a_clear_error(gan_dir: Path, datalist: Path, tmp_path: Path) -> None:
    broken = tmp_path / "gan"
    (broken / "configs").mkdir(parents=True)
    for name in ("inference.json", "metadata.json"):
        config = json.loads((gan_dir / "configs" / name).read_text())
        config["bundle_root"] = str(broken)
        (broken / "configs" / name).write_text(json.dumps(config))
    with pytest.raises(BundleError, match=r"generator_normal2covid\.pt not found"):
        synthesize_covid(broken, datalist, tmp_path / "o")
    result = CliRunner().invoke(
        app, ["synthesize", "--gan", str(broken), "--datalist", str(datalist), "--out", str(tmp_path / "o")]
    )
    assert result.exit_code == 1
    assert "generator_normal2covid.pt" in result.output
    assert not (tmp_path / "o").exists()


def test_generator_of_another_architecture_is_a_clear_error(
    gan_dir: Path, datalist: Path, tmp_path: Path
) -> None:
    other = tmp_path / "gan"
    (other / "configs").mkdir(parents=True)
    (other / "models").mkdir()
    (other / "models" / "generator_normal2covid.pt").write_bytes(
        (gan_dir / "models" / "generator_normal2covid.pt").read_bytes()
    )
    config = json.loads((gan_dir / "configs" / "inference.json").read_text())
    config.update(bundle_root=str(other), base_channels=8)  # the weights are of base_channels 4
    (other / "configs" / "inference.json").write_text(json.dumps(config))
    (other / "configs" / "metadata.json").write_text((gan_dir / "configs" / "metadata.json").read_text())
    with pytest.raises(BundleError, match=r"generator_normal2covid\.pt .* does not fit"):
        synthesize_covid(other, datalist, tmp_path / "o")


def test_spatial_size_forms() -> None:
    assert gan_side(64) == gan_side("64") == gan_side([64, 64]) == 64
    for bad in (30, 66, [64, 32]):
        with pytest.raises(BundleError, match="spatial_size"):
            gan_side(bad)


def _relative_datalist(datalist: Path, folder: Path) -> Path:
    """The fixture's datalist moved to ``folder`` next to copies of its images, paths relative to it."""
    content = json.loads(datalist.read_text())
    (folder / "png").mkdir(parents=True)
    for item in content["training"]:
        source = Path(item["image"])
        (folder / "png" / source.name).write_bytes(source.read_bytes())
        item["image"] = f"png/{source.name}"
    path = folder / "datalist.json"
    path.write_text(json.dumps(content))
    return path


def _workflow(config: Path, workflow_type: str, **override: Any) -> ConfigWorkflow:
    return ConfigWorkflow(
        config_file=str(config),
        meta_file=str(config.parent / "metadata.json"),
        logging_file=False,
        workflow_type=workflow_type,
        **override,
    )


def test_relative_image_paths_resolve_against_the_datalist_folder(datalist: Path, tmp_path: Path) -> None:
    relative = _relative_datalist(datalist, tmp_path / "site")
    normal, covid = domain_items(relative)
    assert all(Path(item["image"]).is_absolute() and Path(item["image"]).is_file() for item in normal + covid)
    assert Path(normal[0]["image"]).parent == tmp_path / "site" / "png"


def test_train_config_has_monai_training_properties_and_reads_relative_paths(
    datalist: Path, tmp_path: Path
) -> None:
    relative = _relative_datalist(datalist, tmp_path / "site")
    workflow = _workflow(
        BUNDLE / "configs" / "train.json",
        "train",
        datalist=str(relative),
        output_dir=str(tmp_path / "o"),
        **TINY,
    )
    workflow.initialize()
    assert workflow.check_properties() == []
    assert workflow.max_epochs == 1 and workflow.trainer.state.epoch_length == 5000
    sample = workflow.train_dataset[0]  # loads a PNG through its relative path
    assert sample["image_a"].shape == sample["image_b"].shape == (1, 32, 32)
    assert len(workflow.train_dataset) == 6  # the larger domain (Normal)


def test_inference_config_has_monai_inference_properties(
    gan_dir: Path, datalist: Path, tmp_path: Path
) -> None:
    workflow = _workflow(
        gan_dir / "configs" / "inference.json",
        "infer",
        datalist=str(datalist),
        output_dir=str(tmp_path / "s"),
        n=3,
    )
    workflow.initialize()
    assert workflow.check_properties() == []
    workflow.run()
    assert len(list((tmp_path / "s" / "images").glob("*.png"))) == 3


class _Interrupt(Exception):
    pass


def test_an_interrupted_run_resumes_and_reaches_max_iterations(datalist: Path, tmp_path: Path) -> None:
    """5 iterations, checkpoints every 2; the first session dies after iteration 3, the second resumes
    from the iteration-2 checkpoint and runs iterations 3, 4 and 5."""
    out = tmp_path / "run"
    settings = {**TINY, "max_iterations": 5, "checkpoint_interval": 2, "log_interval": 2}
    config = BUNDLE / "configs" / "train.json"

    def session(interrupt_at: int | None) -> tuple[ConfigWorkflow, list[int]]:
        workflow = _workflow(config, "train", datalist=str(datalist), output_dir=str(out), **settings)
        workflow.initialize()
        done: list[int] = []
        workflow.trainer.add_event_handler(
            Events.ITERATION_COMPLETED, lambda e: done.append(e.state.iteration)
        )
        if interrupt_at is not None:

            def stop(_engine: Any) -> None:
                raise _Interrupt

            workflow.trainer.add_event_handler(Events.ITERATION_COMPLETED(once=interrupt_at), stop)
        workflow.run()
        return workflow, done

    with pytest.raises(RuntimeError) as raised:  # MONAI's config parser wraps what the run raised
        session(interrupt_at=3)
    assert isinstance(raised.value.__cause__, _Interrupt)
    models = out / "models"
    assert sorted(p.name for p in models.iterdir()) == ["checkpoint_iteration=2.pt"]  # no generator yet

    workflow, done = session(interrupt_at=None)
    assert done == [3, 4, 5]
    assert workflow.trainer.state.iteration == 5
    assert sorted(p.name for p in models.iterdir()) == [
        "checkpoint_final_iteration=5.pt",
        "generator_normal2covid.pt",
    ]
    log = json.loads((out / "logs" / "gan_log.json").read_text())
    assert [entry["iteration"] for entry in log] == [2, 4, 5]
    saved = torch.load(models / "checkpoint_final_iteration=5.pt", weights_only=True)
    assert set(saved) == {
        "generator_ab",
        "generator_ba",
        "discriminator_a",
        "discriminator_b",
        "optimizer_g",
        "optimizer_d",
        "trainer",
    }
    assert saved["trainer"]["iteration"] == 5
    # the exported generator is the final state of generator_ab
    exported = torch.load(models / "generator_normal2covid.pt", weights_only=True)
    assert all(torch.equal(exported[k], v) for k, v in saved["generator_ab"].items())

    again, done = session(interrupt_at=None)  # a finished run has nothing left to do
    assert done == [] and again.trainer.state.iteration == 5
