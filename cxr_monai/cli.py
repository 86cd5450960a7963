"""``cxr-monai``: the command-line interface (typer). Each command lives in :mod:`cxr_monai.commands`.

Importing this module loads no torch, MONAI, scikit-learn, pydicom or matplotlib (each command imports
what it needs when it runs), so ``cxr-monai --help`` is quick. Help is click's plain layout
(``rich_markup_mode=None``): it wraps to the terminal and never cuts an option name at 80 columns, where
the rich panels do; each command's example is its ``epilog``, printed after the options.
"""

from __future__ import annotations

from types import ModuleType

import typer

from cxr_monai.commands import (
    bundle,
    compare,
    configure_logging,
    evaluate,
    explain,
    export,
    gateway,
    predict,
    prepare,
    progression,
    serve,
    site,
    synthesize,
    train,
)
from cxr_monai.constants import RESEARCH_USE_NOTICE

app = typer.Typer(
    name="cxr-monai",
    help=f"Chest X-ray triage (COVID-19 / Normal / Pneumonia) with MONAI. {RESEARCH_USE_NOTICE}.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


@app.callback()
def main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Log debug messages.")) -> None:
    """Chest X-ray triage with MONAI. Research use only - not for clinical use."""
    configure_logging(verbose)


#: Command -> (its module, whose function of the same name it runs; the line `cxr-monai --help` lists).
_COMMANDS: dict[str, tuple[ModuleType, str]] = {
    "prepare": (prepare, "Build the patient-disjoint datalist from datasets and site CSVs."),
    "train": (train, "Cross-validate the classifier bundle over the folds, keep one."),
    "evaluate": (evaluate, "Score a trained bundle, with the shortcut check beside it."),
    "predict": (predict, "Score an archive of films into one CSV: resumable, sharded by torchrun."),
    "explain": (explain, "Grad-CAM overlay (PNG), report (JSON) and DICOM per film."),
    "progression": (progression, "One patient's studies over time, maps on one scale."),
    "serve": (serve, "The gRPC service: classification and Grad-CAM."),
    "gateway": (gateway, "DICOM C-STORE gateway: films in, Grad-CAM SC and SR out."),
    "synthesize": (synthesize, "Synthetic COVID-19 training images from a CycleGAN."),
    "compare": (compare, "Trained runs side by side: the paper's table and figures."),
    "export": (export, "Export a trained bundle to ONNX or TorchScript, checked against eager."),
}
for _name, (_module, _summary) in _COMMANDS.items():
    app.command(_name, short_help=_summary, epilog=_module.EPILOG)(getattr(_module, _name))
app.add_typer(bundle.bundle_app, short_help="List or copy the MONAI bundles shipped with cxr-monai.")
app.add_typer(site.site_app, short_help="Calibrate the model for a hospital from its labelled films.")
