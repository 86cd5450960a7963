"""Typer commands of ``cxr-monai``, one module each; :mod:`cxr_monai.cli` registers them."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import typer
from rich.console import Console

from cxr_monai.errors import CXRMonaiError

#: Human-facing output (tables, progress) goes to stderr so stdout stays machine-readable.
console = Console(stderr=True)


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn a :class:`CXRMonaiError` into a one-line message and exit code 1 (2 stays typer's usage error)."""
    try:
        yield
    except CXRMonaiError as exc:
        console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(code=1) from exc


def examples(*commands: str) -> str:
    """Typer ``epilog=`` text: the example command lines after the options, printed as written (``\\b``
    stops click from rewrapping them; keep each line within 76 columns so help fits 80)."""
    title = "Example:" if len(commands) == 1 else "Examples:"
    lines = (line for command in commands for line in command.splitlines())
    return "\b\n" + title + "\n" + "\n".join(f"  {line}" for line in lines)


def configure_logging(verbose: bool) -> None:
    """Standard logging at INFO (or DEBUG with ``--verbose``); messages never carry patient data."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
