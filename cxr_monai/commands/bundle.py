"""``cxr-monai bundle``: list the MONAI bundles that ship with cxr-monai and copy one out for editing."""

from __future__ import annotations

from pathlib import Path

import typer

from cxr_monai.commands import console, examples, user_errors

bundle_app = typer.Typer(
    name="bundle",
    help="The MONAI bundles shipped with cxr-monai (cxr_classifier, cxr_cyclegan).",
    no_args_is_help=True,
    rich_markup_mode=None,
)


@bundle_app.command("list", epilog=examples("cxr-monai bundle list"))
def list_bundles() -> None:
    """Print each shipped bundle's name and installed folder (stdout, one per line)."""
    from cxr_monai.bundles import BUNDLE_NAMES, bundle_dir

    with user_errors():
        for name in BUNDLE_NAMES:
            typer.echo(f"{name}\t{bundle_dir(name)}")


@bundle_app.command(
    "copy",
    epilog=examples(
        "cxr-monai bundle copy cxr_classifier my_bundle",
        "python -m monai.bundle run training \\\n"
        "    --config_file my_bundle/configs/train.json \\\n"
        "    --meta_file my_bundle/configs/metadata.json \\\n"
        "    --datalist out/prep/datalist.json --output_dir out/run",
    ),
)
def copy(
    name: str = typer.Argument(..., metavar="NAME", help="cxr_classifier | cxr_cyclegan"),
    destination: Path = typer.Argument(..., metavar="DESTINATION", help="New folder for the editable copy."),
) -> None:
    """Copy a shipped bundle into DESTINATION for editing and for `python -m monai.bundle run`."""
    from cxr_monai.bundles import copy_bundle

    with user_errors():
        target = copy_bundle(name, destination)
    console.print(f"Copied {name} to {target}")
