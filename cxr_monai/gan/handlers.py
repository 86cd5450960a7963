"""Ignite handlers of the ``cxr_cyclegan`` training engine: the loss log and the trained-GAN outputs.

MONAI's ``StatsHandler`` prints the losses and ``CheckpointSaver`` writes the resumable checkpoints;
these two write what ``cxr-monai synthesize`` and the docs read (``logs/gan_log.json``,
``models/generator_normal2covid.pt``, ``logs/samples.png``), which no MONAI handler writes.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from ignite.engine import Engine, Events
from PIL import Image
from torch import nn
from torchvision.utils import make_grid

from cxr_monai.atomic import atomic_path, write_json_atomic
from cxr_monai.gan.data import UnpairedDataset
from cxr_monai.gan.engine import LOSS_KEYS
from cxr_monai.gan.trainer import GENERATOR_FILE, SAMPLES_FILE, checkpoints
from cxr_monai.training.layout import RUN_INFO


class GANLossLog:
    """Keeps ``path`` (``logs/gan_log.json``): one entry per ``log_interval`` iterations and one at the
    last, ``{"iteration", "d_loss", "g_adv", "cycle", "identity", "seconds"}``, each loss the mean over the
    iterations since the previous entry, ``seconds`` the training time so far. A resumed run keeps the
    entries up to the iteration it resumed from."""

    def __init__(self, path: str, log_interval: int) -> None:
        self.path = Path(path)
        self.log_interval = int(log_interval)
        self.entries: list[dict[str, Any]] = []
        self.window: dict[str, list[float]] = {key: [] for key in LOSS_KEYS}
        self._start: float | None = None
        self._offset = 0.0

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        iteration = engine.state.iteration
        if self._start is None:  # first iteration of this run: the checkpoint (if any) is loaded by now
            self._start = time.perf_counter()
            if self.path.is_file():
                previous = json.loads(self.path.read_text(encoding="utf-8"))
                self.entries = [e for e in previous if e["iteration"] < iteration]
                self._offset = float(self.entries[-1]["seconds"]) if self.entries else 0.0
        output = cast(dict[str, float], engine.state.output)
        for key in LOSS_KEYS:
            self.window[key].append(float(output[key]))
        last = int(engine.state.epoch_length or 0) * int(engine.state.max_epochs or 0)
        if iteration % self.log_interval == 0 or iteration == last:
            entry: dict[str, Any] = {"iteration": iteration}
            entry.update({key: float(np.mean(values)) for key, values in self.window.items()})
            entry["seconds"] = round(self._offset + time.perf_counter() - self._start, 2)
            self.entries.append(entry)
            write_json_atomic(self.path, self.entries)
            self.window = {key: [] for key in LOSS_KEYS}


class GANExport:
    """At ``COMPLETED``: the Normal -> COVID-19 generator as a plain state_dict
    (``models/generator_normal2covid.pt``), ``logs/samples.png`` (one column per Normal image: real /
    synthetic COVID-19 / reconstructed Normal; ``samples`` images), the domain sizes and device in
    ``logs/run_info.json``; the periodic resumable checkpoints are deleted (``CheckpointSaver`` writes the
    final one after this handler)."""

    def __init__(
        self,
        output_dir: str,
        generator_ab: nn.Module,
        generator_ba: nn.Module,
        dataset: UnpairedDataset,
        samples: int = 4,
    ) -> None:
        self.out = Path(output_dir)
        self.g_ab, self.g_ba = generator_ab, generator_ba
        self.dataset = dataset
        self.samples = int(samples)
        self._start = 0.0

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._started)
        engine.add_event_handler(Events.COMPLETED, self)

    def _started(self, engine: Engine) -> None:
        self._start = time.perf_counter()

    def __call__(self, engine: Engine) -> None:
        with atomic_path(self.out / "models" / GENERATOR_FILE) as tmp:
            torch.save({k: v.detach().cpu() for k, v in self.g_ab.state_dict().items()}, tmp)
        self._write_samples(self.out / "logs" / SAMPLES_FILE)
        info_path = self.out / "logs" / RUN_INFO
        info = json.loads(info_path.read_text(encoding="utf-8")) if info_path.is_file() else {}
        info.update(
            {
                "normal_images": len(self.dataset.domain_a),
                "covid_images": len(self.dataset.domain_b),
                "iterations": engine.state.iteration,
                "device": str(next(self.g_ab.parameters()).device),
                "train_seconds": round(time.perf_counter() - self._start, 2),
            }
        )
        write_json_atomic(info_path, info)
        final = f"checkpoint_final_iteration={engine.state.iteration}.pt"  # CheckpointSaver's, next
        for _, path in checkpoints(self.out / "models"):
            if path.name != final:
                path.unlink()

    def _write_samples(self, path: Path) -> None:
        count = min(self.samples, len(self.dataset.domain_a))
        device = next(self.g_ab.parameters()).device
        real = torch.stack([self.dataset[i]["image_a"] for i in range(count)]).to(device)
        with torch.no_grad():
            self.g_ab.eval()
            self.g_ba.eval()
            fake = self.g_ab(real)
            rec = self.g_ba(fake)
        rows = torch.cat([real, fake, rec]).cpu()
        grid = make_grid((rows.clamp(-1, 1) + 1) / 2, nrow=count, padding=2, pad_value=1.0)
        pixels = (grid[0].numpy() * 255).round().astype(np.uint8)
        with atomic_path(path) as tmp:
            Image.fromarray(pixels).save(tmp, format="PNG")
