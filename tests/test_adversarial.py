"""The source-adversarial head: gradient reversal, the DANN ramp, source labels in the training items, a
bundle trained with it (whose model is still the plain classifier) and the ``--source-adversarial`` flag."""

from __future__ import annotations

import itertools
import json
import math
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch
from bundle_factory import TinyCNN, make_items, write_datalist
from monai.bundle import ConfigWorkflow
from monai.engines import SupervisedTrainer
from torch import nn
from typer.testing import CliRunner

from cxr_monai.cli import app
from cxr_monai.constants import CLASS_NAMES
from cxr_monai.errors import BundleError, DatasetError
from cxr_monai.networks import build_network
from cxr_monai.predictor import Predictor
from cxr_monai.training import crossval, fold_items, latest_checkpoint
from cxr_monai.training.adversarial import (
    SourceAdversarialIteration,
    build_adversary,
    ramped_weight,
    reverse_gradient,
)

CONFIGS = Path(__file__).resolve().parent.parent / "bundles" / "cxr_classifier" / "configs"
SOURCES = ("web", "clinic")  # sorted: clinic = 0, web = 1


def _datalist(root: Path, sources: tuple[str, ...] = SOURCES) -> Path:
    """Two folds; every source holds every class (12 items per source, 100 x 100 grey images)."""
    training = []
    for s, source in enumerate(sources):
        for item in make_items(root / source, 12, size_tells_class=False, prefix=source, seed=s):
            training.append({**item, "source": source, "fold": len(training) % 2})
    test = [
        {**item, "source": sources[0]}
        for item in make_items(root / "test", 3, size_tells_class=False, prefix="t", seed=9)
    ]
    return write_datalist(root / "datalist.json", training, test)


def test_the_reversal_negates_and_scales_the_gradient() -> None:
    x = torch.randn(4, 5, requires_grad=True)
    w = torch.randn(4, 5)
    y = reverse_gradient(x, 0.7)
    assert torch.equal(y, x)
    (y * w).sum().backward()
    assert torch.allclose(x.grad, -0.7 * w)


def test_the_ramp_rises_from_zero_to_the_weight() -> None:
    values = [ramped_weight(0.3, p / 10) for p in range(11)]
    assert values[0] == 0.0
    assert all(a < b for a, b in itertools.pairwise(values))
    assert values[5] == pytest.approx(0.3 * (2 / (1 + math.exp(-5)) - 1))
    assert 0.299 < values[-1] <= 0.3
    assert ramped_weight(0.3, 7.0) == values[-1]  # progress clipped to [0, 1]


def test_training_items_are_unchanged_without_the_option(tmp_path: Path) -> None:
    datalist = str(_datalist(tmp_path))
    for role in ("train", "validate", "test"):
        assert all(set(item) == {"image", "label"} for item in fold_items(datalist, 0, role))


def test_training_items_carry_their_source_index_with_the_option(tmp_path: Path) -> None:
    datalist = _datalist(tmp_path)
    source_of = {e["image"]: e["source"] for e in json.loads(datalist.read_text())["training"]}
    plain = fold_items(str(datalist), 0, "train")
    tagged = fold_items(str(datalist), 0, "train", with_source=True)
    assert [{"image": i["image"], "label": i["label"]} for i in tagged] == plain
    assert {i["source"] for i in tagged} == {0, 1}
    assert all(i["source"] == sorted(SOURCES).index(source_of[i["image"]]) for i in tagged)
    # The same index in another fold, and with a source left out.
    left = fold_items(str(datalist), 1, "train", ["clinic"], with_source=True)
    assert {i["source"] for i in left} == {sorted(SOURCES).index("web")}


def test_no_adversary_and_no_random_numbers_when_off(tmp_path: Path) -> None:
    datalist, network = str(_datalist(tmp_path)), TinyCNN()
    state = torch.get_rng_state()
    assert build_adversary(0.0, network, datalist) is None
    assert build_adversary(0, network, datalist) is None
    assert torch.equal(torch.get_rng_state(), state)
    assert build_adversary(0.1, network, datalist) is not None
    assert not torch.equal(torch.get_rng_state(), state)


def test_the_adversary_reads_the_pooled_features_and_predicts_each_source(tmp_path: Path) -> None:
    adversary = build_adversary(0.5, build_network("efficientnet_b0"), str(_datalist(tmp_path)))
    assert adversary is not None
    assert adversary(torch.zeros(2, 1280)).shape == (2, len(SOURCES))


@pytest.mark.parametrize("weight", [-0.1, float("nan"), "0.3", True])
def test_a_bad_weight_is_refused_by_name(tmp_path: Path, weight: Any) -> None:
    with pytest.raises(BundleError, match="source_adversarial_weight"):
        build_adversary(weight, TinyCNN(), str(_datalist(tmp_path)))


def test_one_source_is_refused(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"two or more sources.*has 1"):
        build_adversary(0.3, TinyCNN(), str(_datalist(tmp_path, ("web",))))


def _one_step(adversary: nn.Module, weight: float, iteration: int) -> tuple[TinyCNN, dict[str, Any]]:
    """One adversarial iteration on TinyCNN whose class loss is 0 (only the adversary's gradient flows),
    ``iteration`` of 10 (one epoch of 10 steps); returns the network and the engine output."""
    torch.manual_seed(0)
    network = TinyCNN()
    params = list(network.parameters()) + list(adversary.parameters())
    trainer = SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=1,
        train_data_loader=[],
        network=network,
        optimizer=torch.optim.SGD(params, lr=0.0),
        loss_function=lambda pred, _label: pred.sum() * 0.0,
        decollate=False,
    )
    trainer.state.iteration, trainer.state.epoch_length, trainer.state.max_epochs = iteration, 10, 1
    batch = {"image": torch.randn(6, 3, 16, 16), "label": torch.zeros(6, dtype=torch.long)}
    batch["source"] = torch.tensor([0, 1, 0, 1, 1, 0])
    output = SourceAdversarialIteration(adversary, weight)(trainer, batch)
    return network, {**output, "batch": batch}


def test_the_trunk_gets_the_adversarys_gradient_reversed_and_the_adversary_its_own() -> None:
    torch.manual_seed(1)
    adversary = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    network, output = _one_step(adversary, 0.5, iteration=6)
    lambda_p = ramped_weight(0.5, 0.5)
    assert output["source_weight"] == pytest.approx(lambda_p)
    trunk_grads = [p.grad.clone() for p in network.features.parameters()]
    adversary_grads = [p.grad.clone() for p in adversary.parameters()]
    # The same source loss without reversal, by hand: trunk -> pooled features -> adversary.
    network.zero_grad()
    adversary.zero_grad()
    batch = output["batch"]
    pooled = network.features(batch["image"]).mean(dim=(2, 3))
    plain = nn.functional.cross_entropy(adversary(pooled), batch["source"])
    assert output["source_loss"] == pytest.approx(plain.item())
    plain.backward()
    assert all(g.abs().sum() > 0 for g in trunk_grads)
    for reversed_grad, p in zip(trunk_grads, network.features.parameters(), strict=True):
        assert torch.allclose(reversed_grad, -lambda_p * p.grad, atol=1e-7)
    for own, p in zip(adversary_grads, adversary.parameters(), strict=True):
        assert torch.allclose(own, p.grad, atol=1e-7)
    assert network.head[-1].weight.grad is None or not network.head[-1].weight.grad.any()


def test_the_first_step_leaves_the_trunk_alone() -> None:
    adversary = nn.Sequential(nn.Linear(4, 2))
    network, output = _one_step(adversary, 0.5, iteration=1)
    assert output["source_weight"] == 0.0
    assert all(not p.grad.any() for p in network.features.parameters())
    assert all(p.grad.any() for p in adversary.parameters())


def _train(datalist: Path, out: Path, **options: Any) -> ConfigWorkflow:
    workflow = ConfigWorkflow(
        config_file=str(CONFIGS / "train.json"),
        meta_file=str(CONFIGS / "metadata.json"),
        logging_file=False,
        workflow_type="train",
        datalist=str(datalist),
        output_dir=str(out),
        spatial_size=32,
        batch_size=4,
        num_workers=0,
        verbose=False,
        **{"max_epochs": 1, **options},
    )
    workflow.initialize()
    return workflow


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(out / "models" / "model.pt", weights_only=True, map_location="cpu")


@pytest.mark.usefixtures("one_torch_thread")
def test_off_trains_exactly_as_without_the_option(tmp_path: Path) -> None:
    datalist = _datalist(tmp_path)
    runs = {}
    for name, options in (("without", {}), ("off", {"source_adversarial_weight": 0.0})):
        workflow = _train(datalist, tmp_path / name, fold=-1, **options)
        assert workflow.parser.get_parsed_content("adversary") is None
        trainer = workflow.parser.get_parsed_content("train#trainer")
        assert trainer._process_function.__func__ is SupervisedTrainer._iteration  # MONAI's own step
        assert all(set(item) == {"image", "label"} for item in trainer.data_loader.dataset.data)
        assert "adversary" not in workflow.parser.get_parsed_content("resume_objects")
        workflow.run()
        workflow.finalize()
        runs[name] = _weights(tmp_path / name)
    assert runs["off"].keys() == runs["without"].keys()
    assert all(torch.equal(runs["off"][k], runs["without"][k]) for k in runs["off"])


@pytest.mark.usefixtures("one_torch_thread")
def test_a_bundle_trained_with_the_adversary_keeps_the_plain_classifier(tmp_path: Path) -> None:
    datalist, out = _datalist(tmp_path), tmp_path / "on"
    workflow = _train(datalist, out, fold=0, source_adversarial_weight=0.5, max_epochs=2)
    adversary = workflow.parser.get_parsed_content("adversary")
    before = [p.detach().clone() for p in adversary.parameters()]
    optimizer = workflow.parser.get_parsed_content("optimizer")
    assert {id(p) for p in adversary.parameters()} <= {
        id(p) for g in optimizer.param_groups for p in g["params"]
    }
    trainer = workflow.parser.get_parsed_content("train#trainer")
    workflow.run()
    workflow.finalize()
    assert any(not torch.equal(a, p) for a, p in zip(before, adversary.parameters(), strict=True))
    last = trainer.state.output[0]  # decollated: one dict per item of the last batch
    assert math.isfinite(last["source_loss"]) and last["source_loss"] > 0
    assert last["source_weight"] == pytest.approx(ramped_weight(0.5, 1 - 1 / trainer.state.epoch_length / 2))
    log = json.loads((out / "logs" / "training_log.json").read_text())
    assert [e["epoch"] for e in log] == [1, 2] and all(0 <= e["train_accuracy"] <= 1 for e in log)
    # models/model.pt is the plain classifier's state_dict, which the unchanged inference config loads.
    plain = build_network("efficientnet_b0")
    plain.load_state_dict(_weights(out), strict=True)
    inference = json.loads((out / "configs" / "inference.json").read_text())
    assert inference["network_def"] == json.loads((CONFIGS / "inference.json").read_text())["network_def"]
    assert json.loads((out / "configs" / "train.json").read_text())["source_adversarial_weight"] == 0.5
    predictor = Predictor.from_bundle(out, device="cpu")
    assert predictor.predict_tensors(torch.zeros(1, 3, 32, 32)).shape == (1, len(CLASS_NAMES))
    # The resumable checkpoint keeps the adversary, so an interrupted run resumes it too.
    resume = torch.load(latest_checkpoint(str(out / "models")), weights_only=True, map_location="cpu")
    assert resume["adversary"].keys() == adversary.state_dict().keys()


def test_the_cli_flag_reaches_the_bundle(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    datalist = _datalist(tmp_path)
    seen: list[dict[str, Any]] = []

    def fake(datalist: Path, out: Path, folds: Any, final: str, parameters: Any, **_: Any) -> dict[str, Any]:
        seen.append(dict(parameters))
        raise DatasetError("stop after the parameters")

    monkeypatch.setattr(crossval, "cross_validate", fake)
    base = ["train", "--datalist", str(datalist), "--out", str(tmp_path / "out"), "--folds", "0"]
    CliRunner().invoke(app, [*base, "--source-adversarial", "0.3"])
    CliRunner().invoke(app, base)
    bundle_options = json.loads((CONFIGS / "train.json").read_text())
    assert [p["source_adversarial_weight"] for p in seen] == [
        0.3,
        bundle_options["source_adversarial_weight"],
    ]
    refused = CliRunner().invoke(app, [*base, "--source-adversarial", "-1"])
    assert refused.exit_code != 0 and "--source-adversarial" in refused.output


@pytest.mark.slow
def test_multi_gpu_training_runs_with_the_adversary(tmp_path: Path) -> None:
    """multi_gpu_train.json on the CPU (torchrun, gloo, 2 ranks) trains with the adversary; model.pt is
    still the plain classifier and the resumable checkpoint keeps the adversary."""
    torchrun = shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun not installed")
    datalist, out = _datalist(tmp_path), tmp_path / "ddp"
    configs = f"['{CONFIGS / 'train.json'}','{CONFIGS / 'multi_gpu_train.json'}']"
    command = [torchrun, "--standalone", "--nproc_per_node", "2", "-m", "monai.bundle", "run"]
    command += ["--config_file", configs, "--backend", "gloo", "--datalist", str(datalist)]
    command += ["--output_dir", str(out), "--max_epochs", "1", "--spatial_size", "32", "--batch_size", "2"]
    command += ["--num_workers", "0", "--verbose", "False", "--source_adversarial_weight", "0.5"]
    result = subprocess.run(
        command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300
    )
    # gloo may abort a rank while the process exits, after the run (see test_bundle_training.py).
    if result.returncode != 0:
        assert "terminate called without an active exception" in result.stderr, result.stderr[-3000:]
    build_network("efficientnet_b0").load_state_dict(_weights(out), strict=True)
    resume = torch.load(latest_checkpoint(str(out / "models")), weights_only=True, map_location="cpu")
    assert {key.split(".")[0] for key in resume["adversary"]} == {"0", "2"}  # ignite saves DDP unwrapped


def test_under_torch_distributed_the_adversary_is_distributed(tmp_path: Path) -> None:
    """Each rank's adversary gets the gradients of all ranks (DistributedDataParallel), as the network does
    in multi_gpu_train.json; here a one-process gloo group."""
    datalist, network = str(_datalist(tmp_path)), TinyCNN()
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'group'}", rank=0, world_size=1
    )
    try:
        adversary = build_adversary(0.5, network, datalist)
    finally:
        torch.distributed.destroy_process_group()
    assert isinstance(adversary, nn.parallel.DistributedDataParallel)
    assert adversary.module[-1].out_features == len(SOURCES)
