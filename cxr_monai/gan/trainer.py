"""The ``cxr_cyclegan`` bundle's trained-GAN directory and its checkpoints.

``train.json`` builds the networks, the data and a ``monai.engines.Trainer`` whose process function is
:class:`cxr_monai.gan.engine.CycleGANStep`; this module gives it the output layout and resume. A trained
GAN directory (``output_dir``) holds::

    configs/  metadata.json, train.json, inference.json (the run's parameters written in), logging.conf
    models/   generator_normal2covid.pt (plain state_dict of inference.json's ``network_def``) and
              checkpoint_iteration=N.pt / checkpoint_final_iteration=N.pt (every model, optimiser and
              the trainer's iteration: running train.json again resumes from the newest)
    logs/     gan_log.json (mean losses per log interval), run_info.json, samples.png
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ignite.engine import Engine, Events
from monai.handlers import CheckpointLoader

from cxr_monai.bundles import bundle_dir
from cxr_monai.errors import BundleError
from cxr_monai.gan.data import gan_side
from cxr_monai.networks import TORCH_LOAD_ERRORS
from cxr_monai.training.layout import write_run_layout

BUNDLE_NAME = "cxr_cyclegan"
GENERATOR_FILE = "generator_normal2covid.pt"
LOG_FILE = "gan_log.json"
SAMPLES_FILE = "samples.png"
CONFIG_FILES = ("metadata.json", "train.json", "inference.json", "logging.conf")
#: Parameters that synthesis needs to rebuild the generator and its input; written into inference.json.
INFERENCE_PARAMETERS = ("spatial_size", "base_channels", "n_residual_blocks")
#: Key of the trainer's state (iteration, epoch_length) in a resumable checkpoint.
TRAINER_KEY = "trainer"
_CHECKPOINT_NAME = re.compile(r"^checkpoint_(?:final_)?iteration=(\d+)\.pt$")


def default_bundle_root() -> str:
    """Directory of the shipped ``cxr_cyclegan`` bundle (package data of ``cxr_monai.bundles``)."""
    return str(bundle_dir(BUNDLE_NAME))


def checkpoints(ckpt_dir: str | Path) -> list[tuple[int, Path]]:
    """(iteration, path) of the resumable checkpoints MONAI's ``CheckpointSaver`` wrote, oldest first."""
    folder = Path(ckpt_dir)
    found = [
        (int(m.group(1)), p) for p in folder.glob("checkpoint_*.pt") if (m := _CHECKPOINT_NAME.match(p.name))
    ]
    return sorted(found)


def latest_checkpoint(ckpt_dir: str | Path) -> str:
    """Path of the newest resumable checkpoint in ``ckpt_dir``; ``""`` when there is none."""
    found = checkpoints(ckpt_dir)
    return str(found[-1][1]) if found else ""


def load_checkpoint(
    path: str | Path, objects: Mapping[str, Any], engine: Engine | None = None, map_location: Any = None
) -> None:
    """Load ``objects`` (modules, optimisers) from ``path`` with MONAI's ``CheckpointLoader``; with
    ``engine`` also its iteration (key :data:`TRAINER_KEY`). A file holding one plain state_dict fits a
    single object. BundleError naming ``path`` when it is missing, unreadable or does not fit (another
    architecture: the configs' parameters differ from those of the run that wrote it)."""
    path = Path(path)
    if not path.is_file():
        raise BundleError(f"checkpoint {path} not found; train the GAN first (bundle {BUNDLE_NAME})")
    load = dict(objects)
    if engine is not None:
        load[TRAINER_KEY] = engine
    loader = CheckpointLoader(load_path=str(path), load_dict=load, map_location=map_location)
    try:
        # CheckpointLoader restores through an engine; a bare one stands in when only weights are loaded.
        loader(engine if engine is not None else Engine(lambda _engine, _batch: None))
    except TORCH_LOAD_ERRORS as exc:  # raised by torch.load and by load_state_dict alike
        detail = " ".join(str(exc).split())[:300] or type(exc).__name__
        raise BundleError(
            f"checkpoint {path} is not a readable PyTorch file or does not fit this bundle's networks "
            f"({detail}); the configs' parameters must be those of the run that wrote it"
        ) from exc


class ResumeCheckpoint:
    """Resume an interrupted run at the trainer's ``STARTED``: :func:`load_checkpoint` restores
    ``objects`` and the trainer's iteration from ``path``, so the run goes on to ``max_iterations``.

    The configured length (``max_iterations``) wins over the checkpoint's, so a finished run can be
    extended; BundleError when the checkpoint is already past it. (A handler rather than MONAI's
    ``CheckpointLoader`` in the config because the config cannot name the trainer inside the trainer's
    own handler list; the trainer is added here.)
    """

    def __init__(self, path: str, objects: Mapping[str, Any], map_location: Any = None) -> None:
        self.path = path
        self.objects = dict(objects)
        self.map_location = map_location

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine: Engine) -> None:
        length = int(engine.state.epoch_length or 0)
        load_checkpoint(self.path, self.objects, engine, self.map_location)
        if engine.state.iteration > length:
            raise BundleError(
                f"checkpoint {self.path} is at iteration {engine.state.iteration}, past max_iterations "
                f"{length}; pass a larger --max_iterations or a new --output_dir"
            )
        engine.state.epoch_length = length
        engine.state.epoch = engine.state.iteration // length


def prepare_output_dir(bundle_root: str, output_dir: str, run_parameters: Mapping[str, Any]) -> str:
    """Make ``output_dir`` a trained GAN directory (module doc): ``configs/`` with the run's parameters
    (``train.json`` gets them all and ``bundle_root`` = ``output_dir``, so running the copy resumes;
    ``inference.json`` the generator's; ``metadata.json`` the image size), ``models/``, ``logs/`` and
    ``logs/run_info.json``. Returns ``output_dir`` as an absolute path.
    BundleError for a missing output_dir, one inside the source bundle, or a missing config."""
    if not output_dir:
        raise BundleError("no output directory given: pass --output_dir DIR")
    if not run_parameters.get("datalist"):
        raise BundleError("no datalist given: pass --datalist FILE (made by `cxr-monai prepare`)")
    out = Path(output_dir).resolve()
    root = Path(bundle_root).resolve()
    if out != root and (root in out.parents or out in root.parents):
        raise BundleError(f"output_dir {out} overlaps the bundle {root}; pass --output_dir DIR elsewhere")
    params = dict(run_parameters)
    params["spatial_size"] = gan_side(params["spatial_size"])
    write_run_layout(root / "configs", out, CONFIG_FILES, params, _with_run_values)
    return str(out)


def _with_run_values(name: str, config: dict[str, Any], params: dict[str, Any], out: Path) -> dict[str, Any]:
    if name == "train.json":
        config.update(params)
        config["bundle_root"] = str(out)
        config["output_dir"] = "@bundle_root"
    elif name == "inference.json":
        config.update({key: params[key] for key in INFERENCE_PARAMETERS})
        config["bundle_root"] = str(out)
    elif name == "metadata.json":
        shape = [params["spatial_size"]] * 2
        for section in ("inputs", "outputs"):
            for entry in config["network_data_format"][section].values():
                entry["spatial_shape"] = shape
    return config
