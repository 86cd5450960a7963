"""``cxr-monai``: the command-line interface (typer). Each command lives in :mod:`cxr_monai.commands`."""

from __future__ import annotations

import typer

from cxr_monai.commands import configure_logging
from cxr_monai.commands.bundle import bundle_app
from cxr_monai.commands.compare import compare
from cxr_monai.commands.evaluate import evaluate
from cxr_monai.commands.explain import explain
from cxr_monai.commands.export import export
from cxr_monai.commands.gateway import gateway
from cxr_monai.commands.prepare import prepare
from cxr_monai.commands.progression import progression
from cxr_monai.commands.serve import serve
from cxr_monai.commands.synthesize import synthesize
from cxr_monai.commands.train import train
from cxr_monai.constants import RESEARCH_USE_NOTICE

app = typer.Typer(
    name="cxr-monai",
    help=f"Chest X-ray triage (COVID-19 / Normal / Pneumonia) with MONAI. {RESEARCH_USE_NOTICE}.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Log debug messages.")) -> None:
    """Chest X-ray triage with MONAI. Research use only - not for clinical use."""
    configure_logging(verbose)


# Commands are registered below, one line each.
app.command("prepare")(prepare)
app.command("explain")(explain)
app.command("progression")(progression)
app.command("evaluate")(evaluate)
app.command("serve")(serve)
app.command("gateway")(gateway)
app.command("train")(train)
app.command("synthesize")(synthesize)
app.command("compare")(compare)
app.command("export")(export)
app.add_typer(bundle_app)
